"""atheris target: capability rules → ``evaluate_rules`` (parser and evaluator).

The input is the control byte (listener, database, preset cap, allow_raw_sql) and a
JSON document taken as the rules list. Nothing may escape: every input gives an
EffectiveGrant or a Refusal. Properties of a grant: it is for the asked listener and
database; under a preset cap no pair exceeds the cap and no raw SQL is left; with
allow_raw_sql off no raw SQL is left; limits are non-negative and finite.

    python tests/fuzz/fuzz_grants.py -max_total_time=600 tests/fuzz/corpus/grants
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.config.model import LimitsConfig
    from waypoint.errors import Refusal
    from waypoint.grants.evaluate import Evaluation, evaluate_rules
    from waypoint.grants.model import EffectiveGrant, Preset

LISTENERS = ("pg-main", "pg", "*")
DATABASES = ("app", "*", "postgres")
CAPS = (None, Preset.READONLY, Preset.READWRITE, Preset.ADMIN)
DEFAULTS = LimitsConfig(max_conns_per_user=5, max_conn_duration=3600.0)


def _reject_constant(name: str) -> object:
    raise ValueError(name)


def check(rules: object, control: int) -> Evaluation:
    """Evaluate ``rules`` under the settings ``control`` picks; check the properties."""
    listener = LISTENERS[control % 3]
    database = DATABASES[(control // 3) % 3]
    cap = CAPS[(control // 9) % 4]
    allow_raw_sql = bool(control & 0x80)
    evaluation = evaluate_rules(
        rules if isinstance(rules, list) else [rules],
        listener,
        database,
        admin_database="postgres",
        defaults=DEFAULTS,
        preset_cap=cap,
        allow_raw_sql=allow_raw_sql,
    )
    result = evaluation.result
    assert all(isinstance(w, str) for w in evaluation.warnings)
    if database == "postgres":  # the admin database: never granted, whatever the rules say
        assert isinstance(result, Refusal)
    if isinstance(result, Refusal):
        assert len(result.sqlstate) == 5 and result.message
        return evaluation
    assert isinstance(result, EffectiveGrant)
    assert (result.listener, result.database) == (listener, database)
    assert result.privileges or result.custom
    if cap is not None:
        assert not result.custom
        assert all(p.preset <= cap for p in result.privileges)
    if not allow_raw_sql:
        assert not any(c.sql for c in result.custom)
    limits = result.limits
    assert limits.max_conns_user >= 0 and limits.max_conns_listener >= 0
    assert limits.max_bytes_per_conn >= 0
    assert limits.max_conn_duration >= 0 and math.isfinite(limits.max_conn_duration)
    return evaluation


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    try:
        rules = json.loads(chunks.payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    check(rules, chunks.control)


if __name__ == "__main__":
    fuzz(test_one_input)
