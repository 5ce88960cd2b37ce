"""The CPU engine caps OpenMP spin-waiting before torch loads (services/engine/openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import {module}, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def probe(module: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("module", ["services.engine", "services.cli.main"])
def test_importing_the_engine_or_the_command_caps_spins_before_torch_loads(module):
    assert probe(module) == "10000 None"


def test_a_wait_policy_the_user_chose_is_kept():
    assert probe("services.engine", OMP_WAIT_POLICY="ACTIVE") == "None ACTIVE"
    assert probe("services.engine", GOMP_SPINCOUNT="500") == "500 None"


def test_too_late_once_torch_is_loaded():
    assert probe("torch, services.engine") == "None None"
