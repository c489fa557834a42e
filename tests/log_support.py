"""Waypoint's log lines in a buffer, in a given format, for one block: ``configure`` replaces
the handlers of Waypoint's logger and its library handler on the root logger; both are put
back as they were afterwards (a reload may also switch the format meanwhile)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from waypoint.observability.log import LOGGER_NAME, Format, configure


@contextlib.contextmanager
def configured_log(fmt: Format = "human") -> Iterator[io.StringIO]:
    loggers = [logging.getLogger(LOGGER_NAME), logging.getLogger()]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    buffer = io.StringIO()
    configure(fmt, stream=buffer)
    try:
        yield buffer
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            for handler in list(lg.handlers):
                lg.removeHandler(handler)
            for handler in handlers:
                lg.addHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def parse_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every JSON line written to ``buffer`` (at least one)."""
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]
