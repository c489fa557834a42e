"""atheris target: a LocalAPI whois answer, end to end through the pure layers.

Bytes → ``decode_json_object`` (the LocalAPI client's JSON decoding) →
``identity_from_whois`` → ``evaluate_rules`` on the identity's capability rules →
``render_and_validate`` on any raw SQL the grant carries. Allowed: MalformedResponse
from the first two steps, RawSqlError from the last; the evaluation itself never
raises (see fuzz_grants.py for its properties).

    python tests/fuzz/fuzz_whois.py -max_total_time=600 tests/fuzz/corpus/whois
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from fuzz_grants import check

    from waypoint.grants.model import EffectiveGrant
    from waypoint.identity.localapi import MalformedResponse, decode_json_object
    from waypoint.identity.model import Identity
    from waypoint.identity.tailscale import identity_from_whois
    from waypoint.provision.dialect import PostgresDialect
    from waypoint.provision.rawsql import RawSqlError, render_and_validate

CAPABILITY = "example.com/cap/waypoint"
ROLE = "wp_grp_fuzz_0123456789abcdef_app"
DIALECT = PostgresDialect("PostgreSQL 18.0", 18)


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    try:
        body = decode_json_object(chunks.payload, "fuzz whois")
        identity = identity_from_whois(body, CAPABILITY)
    except MalformedResponse as exc:
        assert exc.refusal.sqlstate == "08004"
        return
    assert isinstance(identity, Identity)
    assert identity.login and identity.node
    assert all(isinstance(t, str) for t in identity.tags)
    assert all(isinstance(r, dict) for r in identity.rules)
    result = check(list(identity.rules), chunks.control).result
    if not isinstance(result, EffectiveGrant):
        return
    for custom in result.custom:
        with contextlib.suppress(RawSqlError):
            render_and_validate(custom.sql, role=ROLE, database=result.database, dialect=DIALECT)


if __name__ == "__main__":
    fuzz(test_one_input)
