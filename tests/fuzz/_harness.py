"""Plumbing shared by the atheris targets in this folder.

Each ``fuzz_<name>.py`` target is a script::

    python tests/fuzz/fuzz_first_packet.py -max_total_time=600 tests/fuzz/corpus/first_packet

and also a module: ``test_one_input(data)`` is importable without atheris, so the
default test suite replays every committed corpus file through it
(tests/test_fuzz_atheris.py). A target lets through only the exceptions its parser
documents; anything else escapes and atheris reports it as a crash.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"

# The packages whose Python code coverage guides the fuzzer.
INSTRUMENTED = ("waypoint", "tomlkit", "cattrs")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def instrumentation(active: bool) -> AbstractContextManager[Any]:
    """``atheris.instrument_imports`` when running as a fuzzer script, else nothing.

    Only modules first imported inside the block are instrumented, so targets import
    the code under test inside it.
    """
    if not active:
        return contextlib.nullcontext()
    import atheris  # type: ignore[import-untyped]

    hook: AbstractContextManager[Any] = atheris.instrument_imports(include=list(INSTRUMENTED))
    return hook


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer on ``test_one_input`` with the command line's arguments."""
    import atheris  # type: ignore[import-untyped]

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


class Chunks:
    """Deterministic split of fuzz input into a control part and a payload.

    The first byte (if any) is a seed for chunk sizes; it keeps targets free of
    atheris' FuzzedDataProvider so that corpus replay works without atheris.
    """

    def __init__(self, data: bytes) -> None:
        self.control = data[0] if data else 0
        self.payload = data[1:]

    def split(self) -> list[bytes]:
        """The payload cut into chunks of 1..16 bytes, sizes driven by the control byte."""
        out: list[bytes] = []
        pos = 0
        state = self.control or 1
        while pos < len(self.payload):
            state = (state * 73 + 41) % 251
            size = 1 + state % 16
            out.append(self.payload[pos : pos + size])
            pos += size
        return out
