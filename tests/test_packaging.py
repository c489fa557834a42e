"""The package alone gives a working program, as a new user installs it.

- ``pip install .`` into a fresh venv, no extras: every module of ``waypoint`` imports there
  (so every runtime import is declared in pyproject.toml), and ``waypoint check`` and
  ``waypoint demo`` run.
- ``pip wheel .`` gives a wheel with the compiled relay extension, repaired by ``auditwheel``
  to a manylinux tag, with the SPDX license metadata; it installs and runs with no C compiler
  on the PATH.

Everything is built from a copy of the source tree in a temporary directory (the tree itself
gets no ``build/`` or ``*.egg-info``); pip reaches the package index as configured.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 300.0  # dependencies from the index (pip's cache makes it ~15 s)
RUN_TIMEOUT = 60.0
DEMO_READY_TIMEOUT = 120.0  # initdb on a busy machine
DEMO_EXIT_TIMEOUT = 60.0


def _clean_env(path: str, **extra: str) -> dict[str, str]:
    """The environment a user's shell would give: nothing that points at this checkout or at
    the test run's own venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PG")}
    env["PATH"] = path
    env.update(extra)
    return env


def _run(
    args: list[str | Path], env: Mapping[str, str], cwd: Path, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def _source_files() -> list[str]:
    """The tree's files as a fresh clone has them (tracked, plus new files not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    assert "pyproject.toml" in files and "setup.py" in files, files[:20]
    return files


def _copy_source(dest: Path) -> Path:
    for name in _source_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


def _expected_modules() -> set[str]:
    """Every module of the package, from the source tree (the C extension included)."""
    names = set()
    for path in (ROOT / "waypoint").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names.add("waypoint.proxy.relay._pump")
    return names


@attrs.frozen
class Venv:
    root: Path
    source: Path

    @property
    def bin(self) -> Path:
        return self.root / "venv" / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """The venv first on the PATH, then the system's (a C compiler among it)."""
        return _clean_env(f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", **extra)

    def run(self, *args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return _run(list(args), self.env(**extra), self.root)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with ``pip install <the project>`` and nothing else."""
    root = tmp_path_factory.mktemp("pip-install")
    source = _copy_source(root / "src")
    env = _clean_env(os.environ.get("PATH", ""))
    _run([sys.executable, "-m", "venv", root / "venv"], env, root, timeout=120)
    venv = Venv(root, source)
    _run(
        [venv.python, "-m", "pip", "install", "--quiet", source], venv.env(), root, INSTALL_TIMEOUT
    )
    return venv


def test_every_module_imports_from_a_plain_pip_install(installed: Venv) -> None:
    script = (
        "import importlib, pkgutil, sys, waypoint\n"
        "names = ['waypoint'] + [m.name for m in pkgutil.walk_packages("
        "waypoint.__path__, 'waypoint.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(waypoint.__file__)\n"
        "print('\\n'.join(sorted(names)))\n"
    )
    out = installed.run(installed.python, "-c", script).stdout.splitlines()
    location, modules = Path(out[0]), set(out[1:])
    assert installed.root / "venv" in location.parents  # the installed copy, not this checkout
    assert modules == _expected_modules()


def test_waypoint_check_runs_from_a_plain_pip_install(installed: Venv) -> None:
    config = installed.root / "waypoint.toml"
    shutil.copy(ROOT / "tests" / "data" / "spec_example.toml", config)
    out = installed.run(
        installed.bin / "waypoint", "check", "-c", config, PG_ADMIN_PASSWORD="pw-from-env"
    ).stdout
    assert "[[listeners]]" in out
    assert 'admin_password = "********"' in out
    assert "pw-from-env" not in out


def test_waypoint_demo_runs_from_a_plain_pip_install(installed: Venv) -> None:
    """The demo starts (a throwaway PostgreSQL: the system's, as no extra is installed),
    prints its walkthrough, and stops cleanly on Ctrl-C."""
    proc = subprocess.Popen(
        [str(installed.bin / "waypoint"), "demo", "--port", "0"],
        env=installed.env(),
        cwd=installed.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(DEMO_READY_TIMEOUT) and proc.poll() is None, "\n".join(lines[-60:])
        assert any(re.search(r"\bpsql\b", line) for line in lines), "\n".join(lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEMO_EXIT_TIMEOUT) == 0, "\n".join(lines[-60:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)


# ----------------------------------------------------------------------------- the wheel


@attrs.frozen
class Wheels:
    plain: Path  # what ``pip wheel .`` made (linux_x86_64)
    repaired: Path  # auditwheel's manylinux one


@pytest.fixture(scope="module")
def wheels(installed: Venv) -> Wheels:
    out = installed.root / "wheelhouse"
    installed.run(
        installed.python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, installed.source
    )
    (plain,) = out.glob("waypoint-*.whl")
    repaired_dir = installed.root / "repaired"
    _run(
        [sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", repaired_dir, plain],
        installed.env(),
        installed.root,
        timeout=120,
    )
    (repaired,) = repaired_dir.glob("waypoint-*.whl")
    return Wheels(plain, repaired)


def test_wheel_has_the_relay_extension_a_manylinux_tag_and_spdx_license(wheels: Wheels) -> None:
    assert re.search(r"-cp3\d+-cp3\d+-linux_x86_64\.whl$", wheels.plain.name), wheels.plain
    assert re.search(r"manylinux_2_\d+_x86_64\.whl$", wheels.repaired.name), wheels.repaired
    with zipfile.ZipFile(wheels.repaired) as whl:
        names = whl.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
    assert any(re.fullmatch(r"waypoint/proxy/relay/_pump\.cpython-3\d+-.*\.so", n) for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta
    assert "Requires-Dist: cryptography" in meta


def test_wheel_installs_and_runs_without_a_c_compiler(installed: Venv, wheels: Wheels) -> None:
    """Only the venv on the PATH (no cc, gcc or anything else), and CC pointing nowhere: the
    wheel installs, the compiled relay loads and the program runs."""
    no_compiler = _clean_env(str(installed.bin), CC="/nonexistent/cc", LDSHARED="/nonexistent/ld")
    assert shutil.which("cc", path=no_compiler["PATH"]) is None
    assert shutil.which("gcc", path=no_compiler["PATH"]) is None
    _run(
        [
            installed.python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--force-reinstall",
            wheels.repaired,
        ],
        no_compiler,
        installed.root,
        INSTALL_TIMEOUT,
    )
    script = (
        "import waypoint.proxy.relay._pump as pump, importlib.metadata as md\n"
        "print(pump.__file__)\n"
        "print(md.distribution('waypoint').read_text('WHEEL'))\n"
    )
    out = _run([installed.python, "-c", script], no_compiler, installed.root).stdout
    assert "/venv/lib/" in out.splitlines()[0] and out.splitlines()[0].endswith(".so")
    assert "manylinux" in out
    config = installed.root / "wheel.toml"
    shutil.copy(ROOT / "tests" / "data" / "spec_example.toml", config)
    no_compiler["PG_ADMIN_PASSWORD"] = "pw"
    _run([installed.bin / "waypoint", "check", "-c", config], no_compiler, installed.root)


@pytest.fixture(autouse=True, scope="module")
def _no_leftovers_in_the_tree() -> Iterator[None]:
    """Building from the copy leaves nothing in this checkout."""
    before = {p.name for p in ROOT.glob("*.egg-info")}
    yield
    assert {p.name for p in ROOT.glob("*.egg-info")} == before
