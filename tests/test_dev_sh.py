"""``./dev.sh``'s setup is quiet: one progress line per step, and a tool's full output only
when its step fails. Driven with a stand-in venv whose ``python`` and ``just`` are scripts,
and a stand-in ``npm`` first on PATH (the real install is what CI's ``./dev.sh setup``
does), system packages skipped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = [f"noisy tool line {i}" for i in range(50)]


def _stand_in_venv(venv: Path, *, fail_on: str | None) -> None:
    """``python`` prints 50 lines to stdout and stderr for every call and exits 1 when its
    arguments contain ``fail_on``; ``just`` says which recipe it was asked for."""
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    noise = "\n".join(NOISE)
    fail = (
        f'case "$*" in *{fail_on}*) echo "the real error" >&2; exit 3;; esac\n' if fail_on else ""
    )
    python = bin_dir / "python"
    python.write_text(
        f"#!/bin/sh\ncat <<'X'\n{noise}\nX\ncat >&2 <<'X'\n{noise}\nX\n{fail}exit 0\n"
    )
    just = bin_dir / "just"
    just.write_text('#!/bin/sh\necho "just ran: $*"\n')
    # npm: as noisy, and it records its arguments (dev.sh must not touch the real tests/node).
    npm = venv / "npm-bin" / "npm"
    npm.parent.mkdir()
    npm.write_text(f'#!/bin/sh\necho "$*" >> "{venv}/npm-calls"\ncat <<\'X\'\n{noise}\nX\nexit 0\n')
    for script in (python, just, npm):
        script.chmod(0o755)


def _dev_sh(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WAYPOINT_VENV=str(venv), WAYPOINT_NO_SYSTEM_PACKAGES="1")
    env["PATH"] = f"{venv / 'npm-bin'}:{env['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "dev.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_setup_prints_one_line_per_step_and_no_tool_output(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _stand_in_venv(venv, fail_on=None)
    proc = _dev_sh(venv, "setup")
    assert proc.returncode == 0, proc.stderr
    assert "noisy tool line" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 4, proc.stderr
    assert lines[0] == f"dev.sh: upgrading pip in {venv} ... ok"
    assert lines[1].startswith("dev.sh: installing Waypoint") and lines[1].endswith("s)")
    assert lines[2].startswith("dev.sh: checking the install ... ok (")
    assert lines[3].startswith("dev.sh: installing node-postgres for the tests (npm ci in tests/node) ... ok (")
    # exactly the lock file, into tests/node
    assert (venv / "npm-calls").read_text() == "ci --no-audit --no-fund --prefix tests/node\n"
    assert proc.stdout == f"dev.sh: ready ({venv})\n"
    # the second run finds the venv up to date and runs the recipe
    again = _dev_sh(venv, "demo", "--port", "0")
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == [
        f"dev.sh: {venv} is up to date",
        "dev.sh: just demo --port 0",
    ]
    assert again.stdout == "just ran: demo --port 0\n"


def test_a_failing_step_shows_the_tools_full_output_and_stops(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _stand_in_venv(venv, fail_on="dev,bench")
    proc = _dev_sh(venv, "test")
    assert proc.returncode == 3
    err = proc.stderr
    assert "dev.sh: installing Waypoint" in err
    assert "failed (exit 3); its output:" in err
    assert "the real error" in err
    assert all(line in err for line in NOISE)  # the full output, not a tail
    assert "just ran" not in proc.stdout
    assert not list(venv.glob(".installed-*"))  # the next run tries again
