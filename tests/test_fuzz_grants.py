"""Grant rules as untrusted input: arbitrary JSON → EffectiveGrant or Refusal, never an
exception; properties of what comes out; and the whole pure path a connection takes
(whois JSON → Identity → grant → raw SQL validation).

test_grants_rules.py and test_grants_evaluate.py hold the worked examples; here the
rules are generated: rule-shaped documents in which any field may be replaced by an
arbitrary JSON value, so that both deep valid structures and every kind of wrong type
at every depth are reached.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from waypoint.config.model import LimitsConfig
from waypoint.errors import Refusal
from waypoint.grants.evaluate import evaluate, evaluate_rules
from waypoint.grants.model import EffectiveGrant, Preset
from waypoint.grants.rules import RuleError, parse_rules
from waypoint.identity.localapi import MalformedResponse
from waypoint.identity.model import Identity
from waypoint.identity.tailscale import identity_from_whois
from waypoint.provision.dialect import PostgresDialect
from waypoint.provision.rawsql import RawSqlError, render_and_validate

LISTENER = "pg-main"
DATABASE = "app"
ADMIN_DATABASE = "postgres"
DEFAULTS = LimitsConfig(max_conns_per_user=4, max_conn_duration=7200.0)
CAPABILITY = "example.com/cap/waypoint"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid shape, sometimes any JSON value in its place."""
    return st.one_of(valid, valid, valid, json_values)


preset_names = st.sampled_from(
    ["readonly", "readwrite", "admin", "ReadOnly", " admin ", "root", ""]
)
duration_values = st.one_of(
    st.sampled_from(["1h", "30m", "1h30m", "0s", "-1s", "1x", "", "1e400h"]),
    st.integers(-5, 10**6),
    st.floats(allow_nan=False),
)
size_values = st.one_of(
    st.sampled_from(["10GB", "1KiB", "0", "-1B", "1.5B", "huge"]), st.integers(-5, 10**12)
)
limits_st = st.fixed_dictionaries(
    {},
    optional={
        "max_conns": maybe(st.integers(-1, 20)),
        "max_conn_duration": maybe(duration_values),
        "max_bytes_per_conn": maybe(size_values),
    },
)
sql_st = st.sampled_from(
    [
        "GRANT SELECT ON public.t TO {{.Role}}",
        "GRANT SELECT ON public.t TO PUBLIC",
        "DROP TABLE public.t",
        "GRANT TEMP ON DATABASE {{.Database}} TO {{.Role}}",
        "  ",
        "{{.User}}",
    ]
)
entry_st = st.fixed_dictionaries(
    {},
    optional={
        "permissions": maybe(st.lists(maybe(preset_names), max_size=3)),
        "schemas": maybe(
            st.lists(maybe(st.sampled_from(["public", "app", "", "Odd Name"])), max_size=3)
        ),
        "sql": maybe(st.lists(maybe(sql_st), max_size=2)),
        "permission": st.just(["readonly"]),  # a typo: an unknown field
    },
)
databases_st = st.dictionaries(
    st.sampled_from([DATABASE, "*", "other", ""]), maybe(entry_st), max_size=3
)
backend_st = st.fixed_dictionaries(
    {},
    optional={
        "pg": maybe(st.fixed_dictionaries({"databases": maybe(databases_st)})),
        "limits": maybe(limits_st),
    },
)
rule_st = st.fixed_dictionaries(
    {},
    optional={
        "backends": maybe(
            st.dictionaries(
                st.sampled_from([LISTENER, "pg-other", ""]), maybe(backend_st), max_size=2
            )
        ),
        "limits": maybe(limits_st),
        "extra": json_values,
    },
)
# Well-formed rules for this listener (so that grants come out often), mixed with the
# noisy ones above.
valid_limits_st = st.fixed_dictionaries(
    {},
    optional={
        "max_conns": st.integers(0, 20),
        "max_conn_duration": st.sampled_from(["1h", "30m", 600, 0]),
        "max_bytes_per_conn": st.sampled_from(["10GB", 1024, 0]),
    },
)
valid_entry_st = st.one_of(
    st.fixed_dictionaries(
        {
            "permissions": st.lists(
                st.sampled_from(["readonly", "readwrite", "admin"]), min_size=1, max_size=3
            )
        },
        optional={
            "schemas": st.lists(
                st.sampled_from(["public", "app", "Odd Name"]), min_size=1, max_size=2
            )
        },
    ),
    st.fixed_dictionaries(
        {"sql": st.lists(sql_st.filter(str.strip), min_size=1, max_size=2)},
        optional={
            "permissions": st.lists(
                st.sampled_from(["readonly", "readwrite"]), min_size=1, max_size=2
            )
        },
    ),
)
valid_rule_st = st.fixed_dictionaries(
    {
        "backends": st.fixed_dictionaries(
            {
                LISTENER: st.fixed_dictionaries(
                    {
                        "pg": st.fixed_dictionaries(
                            {
                                "databases": st.dictionaries(
                                    st.sampled_from([DATABASE, "*", "other"]),
                                    valid_entry_st,
                                    min_size=1,
                                    max_size=2,
                                )
                            }
                        )
                    },
                    optional={"limits": valid_limits_st},
                )
            }
        )
    },
    optional={"limits": valid_limits_st},
)
rules_st = st.lists(st.one_of(valid_rule_st, maybe(rule_st)), max_size=4)
caps_st = st.sampled_from([None, Preset.READONLY, Preset.READWRITE, Preset.ADMIN])


def _as_json(value: Any) -> Any:
    """Only what a JSON decoder produces (no tuples, keys as strings)."""
    return json.loads(json.dumps(value))


def check_result(result: EffectiveGrant | Refusal, cap: Preset | None, allow_raw_sql: bool) -> None:
    if isinstance(result, Refusal):
        assert len(result.sqlstate) == 5 and result.message
        return
    assert isinstance(result, EffectiveGrant)
    assert (result.listener, result.database) == (LISTENER, DATABASE)
    assert result.privileges or result.custom
    if cap is not None:
        assert not result.custom and all(p.preset <= cap for p in result.privileges)
    if not allow_raw_sql:
        assert not any(c.sql for c in result.custom)
    lim = result.limits
    assert min(lim.max_conns_user, lim.max_conns_listener, lim.max_bytes_per_conn) >= 0
    assert lim.max_conn_duration >= 0 and math.isfinite(lim.max_conn_duration)
    # Defaults are a ceiling: a rule may tighten, never loosen them.
    assert 0 < lim.max_conns_user <= DEFAULTS.max_conns_per_user
    assert 0 < lim.max_conn_duration <= DEFAULTS.max_conn_duration


@given(rules=rules_st, cap=caps_st, allow_raw_sql=st.booleans())
def test_arbitrary_rules_give_a_grant_or_a_refusal(
    rules: list[Any], cap: Preset | None, allow_raw_sql: bool
) -> None:
    rules = _as_json(rules)
    evaluation = evaluate_rules(
        rules, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, preset_cap=cap, allow_raw_sql=allow_raw_sql
    )
    check_result(evaluation.result, cap, allow_raw_sql)
    assert all(isinstance(w, str) for w in evaluation.warnings)


@given(doc=json_values)
def test_any_json_document_as_rules_never_raises(doc: Any) -> None:
    for rules in (doc, [doc]):
        try:
            parse_rules(rules)
        except RuleError as exc:
            assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        if isinstance(rules, list):
            check_result(
                evaluate_rules(
                    rules, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, allow_raw_sql=True
                ).result,
                None,
                True,
            )


@given(rules=rules_st, other=rules_st, cap=caps_st)
def test_rules_for_other_listeners_change_nothing(
    rules: list[Any], other: list[Any], cap: Preset | None
) -> None:
    rules = _as_json(rules)
    # Rules whose backends do not name this listener (and that parse) add nothing.
    unrelated = [
        r
        for r in _as_json(other)
        if isinstance(r, dict)
        and isinstance(r.get("backends"), dict)
        and LISTENER not in r["backends"]
    ]
    try:
        parse_rules(unrelated)
    except RuleError:
        return
    before = evaluate_rules(
        rules, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, preset_cap=cap, allow_raw_sql=True
    )
    after = evaluate_rules(
        rules + unrelated, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, preset_cap=cap, allow_raw_sql=True
    )
    if isinstance(before.result, EffectiveGrant):
        assert after.result == before.result
    else:
        assert type(after.result) is type(before.result)
        assert after.result.sqlstate == before.result.sqlstate


@given(rules=rules_st, cap=caps_st)
def test_a_preset_cap_never_grants_more_than_no_cap(rules: list[Any], cap: Preset) -> None:
    rules = _as_json(rules)
    uncapped = evaluate_rules(
        rules, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, allow_raw_sql=True
    ).result
    capped = evaluate_rules(
        rules, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, preset_cap=cap, allow_raw_sql=True
    ).result
    if not isinstance(capped, EffectiveGrant):
        return
    assert isinstance(uncapped, EffectiveGrant), "a cap turned a refusal into a grant"
    granted = {(p.schema, p.preset) for p in uncapped.privileges}
    for c in uncapped.custom:
        granted |= {(p.schema, p.preset) for p in c.privileges}
    for p in capped.privileges:
        assert any(schema == p.schema and preset >= p.preset for schema, preset in granted)


ROLE = "wp_grp_fuzz_0123456789abcdef_app"
DIALECT = PostgresDialect("PostgreSQL 18.0", 18)

whois_st = st.fixed_dictionaries(
    {
        "Node": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "Name": maybe(st.sampled_from(["laptop.tail.ts.net.", ".", ""])),
                    "ComputedName": maybe(st.sampled_from(["laptop", ""])),
                    "Tags": maybe(st.lists(maybe(st.just("tag:ci")), max_size=2)),
                },
            )
        ),
        "UserProfile": maybe(
            st.fixed_dictionaries({}, optional={"LoginName": maybe(st.just("alice@example.com"))})
        ),
    },
    optional={"CapMap": maybe(st.fixed_dictionaries({}, optional={CAPABILITY: maybe(rules_st)}))},
)


@given(body=whois_st, cap=caps_st, allow_raw_sql=st.booleans())
def test_whois_to_grant_to_raw_sql_never_crashes(
    body: dict[str, Any], cap: Preset | None, allow_raw_sql: bool
) -> None:
    try:
        identity = identity_from_whois(_as_json(body), CAPABILITY)
    except MalformedResponse as exc:
        assert exc.refusal.sqlstate == "08004"
        return
    assert isinstance(identity, Identity)
    result = evaluate(
        identity, LISTENER, DATABASE, admin_database=ADMIN_DATABASE, defaults=DEFAULTS, preset_cap=cap, allow_raw_sql=allow_raw_sql
    )
    check_result(result, cap, allow_raw_sql)
    if isinstance(result, EffectiveGrant):
        for custom in result.custom:
            try:
                out = render_and_validate(custom.sql, role=ROLE, database=DATABASE, dialect=DIALECT)
            except RawSqlError:
                continue
            assert len(out) == len(custom.sql)
