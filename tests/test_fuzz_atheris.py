"""The atheris targets in tests/fuzz/.

1. Default suite: every committed corpus file replays through its target's
   ``test_one_input`` in this process (no atheris needed, a few seconds for all targets): the
   seeds and every crash regression stay green.
2. ``slow`` (``just slow``, ``just scheduled``): each target runs under libFuzzer for a short,
   bounded time (``-max_total_time``), two at a time, on a scratch copy of its corpus; a crash
   (an exception the parser does not document, or a failed property) fails that target's test
   and shows the libFuzzer output with the crashing input's path.

The long runs (10 minutes each) are manual; see docs/security.md.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import attrs
import pytest

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
CORPUS_DIR = FUZZ_DIR / "corpus"
TARGETS = (
    "first_packet",
    "framing",
    "login",
    "grants",
    "whois",
    "rawsql",
    "client_hello",
    "config",
)
# Per-target fuzzing time of the slow runs; two run at once (about 45 s in all).
SHORT_RUN_SECONDS = int(os.environ.get("WAYPOINT_FUZZ_SECONDS", "10"))
# Start-up (instrumenting imports) plus the run, with slack for a loaded machine.
RUN_TIMEOUT = SHORT_RUN_SECONDS + 90


def _load_target(name: str) -> ModuleType:
    path = FUZZ_DIR / f"fuzz_{name}.py"
    spec = importlib.util.spec_from_file_location(f"waypoint_fuzz_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus_cases() -> list[tuple[str, Path]]:
    return [(name, f) for name in TARGETS for f in sorted((CORPUS_DIR / name).iterdir())]


def test_every_target_has_a_seed_corpus() -> None:
    for name in TARGETS:
        assert (FUZZ_DIR / f"fuzz_{name}.py").is_file(), name
        assert len(list((CORPUS_DIR / name).iterdir())) >= 3, f"corpus of {name} is too small"
    # and no target is left out of this list
    found = {p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py")}
    assert found == set(TARGETS)


_loaded: dict[str, Callable[[bytes], None]] = {}


@pytest.mark.parametrize(
    ("target", "path"), _corpus_cases(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_corpus_file_replays_without_crash(target: str, path: Path) -> None:
    if target not in _loaded:
        _loaded[target] = _load_target(target).test_one_input
    _loaded[target](path.read_bytes())


@attrs.frozen
class _Run:
    returncode: int | None
    output: str


def _run_target(name: str, scratch: Path) -> _Run:
    corpus = scratch / name / "corpus"
    artifacts = scratch / name / "artifacts"
    shutil.copytree(CORPUS_DIR / name, corpus)
    artifacts.mkdir()
    cmd = [
        sys.executable,
        str(FUZZ_DIR / f"fuzz_{name}.py"),
        f"-max_total_time={SHORT_RUN_SECONDS}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode()
        return _Run(None, out[-4000:])
    return _Run(proc.returncode, (proc.stdout + proc.stderr)[-6000:])


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Run]]:
    if importlib.util.find_spec("atheris") is None:  # a missing tool fails, never skips
        pytest.fail("atheris is not installed: it is in the dev extras (./dev.sh installs them)")
    scratch = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_target, name, scratch) for name in TARGETS}
        yield {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_no_crash(target: str, short_runs: dict[str, _Run]) -> None:
    run = short_runs[target]
    assert run.returncode is not None, (
        f"fuzz_{target} did not finish in {RUN_TIMEOUT}s:\n{run.output}"
    )
    assert "Uncaught Python exception" not in run.output, run.output
    assert run.returncode == 0, run.output
    # libFuzzer's closing line: proof that it really ran (not an import error that exited 0).
    assert "Done " in run.output and " runs in " in run.output, run.output
