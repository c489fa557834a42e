"""atheris target: the configuration loader (``load_config_text``).

Bytes are decoded as UTF-8 (as ``load_config`` does; undecodable input is that
function's ConfigError and not interesting here) and loaded with a fixed
environment. Allowed: a Config, or ConfigError with at least one problem, each
naming the source and a line inside the text (or none). Property: the admin
password from the environment never appears in a problem message.

    python tests/fuzz/fuzz_config.py -max_total_time=600 tests/fuzz/corpus/config
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.config.load import ConfigError, load_config_text
    from waypoint.config.model import Config

SECRET = "s3cr3t-admin-pw-4b1d"
ENVIRON = {"PG_ADMIN_PASSWORD": SECRET, "REDIS_URL": "redis://:pw@127.0.0.1:6379/0", "EMPTY": ""}


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        cfg = load_config_text(text, source="fuzz.toml", environ=ENVIRON)
    except ConfigError as exc:
        assert exc.problems
        # tomlkit numbers lines as str.splitlines() does (a lone CR, U+2028, ... end a
        # line); the key locator numbers them by LF. Either is inside the text.
        lines = max(text.count("\n") + 1, len(text.splitlines()))
        for problem in exc.problems:
            assert problem.line is None or 1 <= problem.line <= lines, problem
            rendered = str(problem)
            assert rendered.startswith("fuzz.toml")
            assert SECRET not in rendered, "the admin password leaked into a config error"
        return
    assert isinstance(cfg, Config)


if __name__ == "__main__":
    fuzz(test_one_input)
