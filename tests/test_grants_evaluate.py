"""Grant evaluation (docs/policy.md): table-driven, one behaviour per case."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from waypoint.config.model import LimitsConfig
from waypoint.errors import Refusal
from waypoint.grants.evaluate import evaluate, evaluate_rules
from waypoint.grants.model import CustomGrant, EffectiveGrant, Limits, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.lru import LRU

#: The module (the package's ``evaluate`` is the function of that name).
evaluate_module = importlib.import_module("waypoint.grants.evaluate")

RO, RW, AD = Preset.READONLY, Preset.READWRITE, Preset.ADMIN
NO_DEFAULTS = LimitsConfig(max_conns_total=1000, max_conns_per_user=0)


def P(preset: Preset, schema: str) -> SchemaPrivilege:
    return SchemaPrivilege(preset, schema)


def db_rule(listener: str, databases: dict[str, Any], **extra: Any) -> dict[str, Any]:
    backend: dict[str, Any] = {"pg": {"databases": databases}}
    backend.update(extra)
    return {"backends": {listener: backend}}


def run(
    rules: list[Any],
    database: str = "app",
    *,
    listener: str = "pg-main",
    cap: Preset | None = None,
    allow_raw_sql: bool = True,
    defaults: LimitsConfig = NO_DEFAULTS,
    admin_database: str = "postgres",
) -> EffectiveGrant | Refusal:
    identity = Identity(login="alice@example.com", node="alice-laptop", rules=tuple(rules))
    return evaluate(
        identity,
        listener,
        database,
        admin_database=admin_database,
        defaults=defaults,
        preset_cap=cap,
        allow_raw_sql=allow_raw_sql,
    )


def granted(result: EffectiveGrant | Refusal) -> EffectiveGrant:
    assert isinstance(result, EffectiveGrant), result
    return result


def refused(result: EffectiveGrant | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# -- (preset, schema) pairs ---------------------------------------------------------

PAIR_CASES: list[tuple[str, list[Any], str, frozenset[SchemaPrivilege]]] = [
    (
        "readwrite_on_app_and_readonly_on_public_stay_paired",
        [
            db_rule("pg-main", {"app": {"permissions": ["readwrite"], "schemas": ["app"]}}),
            db_rule("pg-main", {"app": {"permissions": ["readonly"], "schemas": ["public"]}}),
        ],
        "app",
        frozenset({P(RW, "app"), P(RO, "public")}),
    ),
    (
        "every_permission_pairs_with_every_schema_of_its_entry",
        [
            db_rule(
                "pg-main", {"app": {"permissions": ["readonly", "admin"], "schemas": ["a", "b"]}}
            )
        ],
        "app",
        frozenset({P(RO, "a"), P(RO, "b"), P(AD, "a"), P(AD, "b")}),
    ),
    (
        "schemas_absent_means_public",
        [db_rule("pg-main", {"app": {"permissions": ["ReadWrite"]}})],
        "app",
        frozenset({P(RW, "public")}),
    ),
    (
        "exact_entry_hides_the_same_rules_wildcard",
        [
            db_rule(
                "pg-main",
                {"app": {"permissions": ["readonly"]}, "*": {"permissions": ["admin"]}},
            )
        ],
        "app",
        frozenset({P(RO, "public")}),
    ),
    (
        "wildcard_applies_to_databases_not_listed",
        [
            db_rule(
                "pg-main",
                {"app": {"permissions": ["readonly"]}, "*": {"permissions": ["admin"]}},
            )
        ],
        "other",
        frozenset({P(AD, "public")}),
    ),
    (
        "another_rules_wildcard_still_applies_next_to_an_exact_entry",
        [
            db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            db_rule("pg-main", {"*": {"permissions": ["readwrite"], "schemas": ["s"]}}),
        ],
        "app",
        frozenset({P(RO, "public"), P(RW, "s")}),
    ),
    (
        "rules_for_other_listeners_contribute_nothing",
        [
            db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            db_rule("pg-other", {"app": {"permissions": ["admin"]}}),
        ],
        "app",
        frozenset({P(RO, "public")}),
    ),
    (
        "weaker_and_stronger_pairs_on_one_schema_are_both_kept",
        [
            db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            db_rule("pg-main", {"app": {"permissions": ["readwrite"]}}),
        ],
        "app",
        frozenset({P(RO, "public"), P(RW, "public")}),
    ),
]


@pytest.mark.parametrize(
    ("rules", "database", "expected"),
    [c[1:] for c in PAIR_CASES],
    ids=[c[0] for c in PAIR_CASES],
)
def test_pairs(rules: list[Any], database: str, expected: frozenset[SchemaPrivilege]) -> None:
    grant = granted(run(rules, database))
    assert grant.privileges == expected
    assert grant.custom == ()
    assert grant.listener == "pg-main"
    assert grant.database == database


def test_flattening_bug_does_not_leak_readwrite_onto_public() -> None:
    grant = granted(
        run(
            [
                db_rule("pg-main", {"app": {"permissions": ["readwrite"], "schemas": ["app"]}}),
                db_rule("pg-main", {"app": {"permissions": ["readonly"], "schemas": ["public"]}}),
            ]
        )
    )
    assert P(RW, "public") not in grant.privileges


# -- refusals -----------------------------------------------------------------------


def test_no_rule_for_listener_is_refused_28000() -> None:
    r = refused(run([db_rule("pg-other", {"app": {"permissions": ["admin"]}})]))
    assert r.sqlstate == "28000"
    assert '"pg-main"' in r.message


def test_no_rules_at_all_is_refused_28000() -> None:
    assert refused(run([])).sqlstate == "28000"


def test_listener_without_database_entry_is_refused_42501() -> None:
    r = refused(run([db_rule("pg-main", {"other": {"permissions": ["admin"]}})], "app"))
    assert r.sqlstate == "42501"
    assert '"app"' in r.message


def test_listener_without_pg_section_is_refused_42501() -> None:
    r = refused(run([{"backends": {"pg-main": {"limits": {"max_conns": 2}}}}]))
    assert r.sqlstate == "42501"


def test_malformed_rules_are_refused_28000_with_path_in_detail() -> None:
    r = refused(run([db_rule("pg-main", {"app": {"permissions": ["readonly", 7]}})]))
    assert r.sqlstate == "28000"
    assert "invalid Waypoint grant" in r.message
    assert "rules[0].backends.pg-main.pg.databases.app.permissions[1]: expected a string" in (
        r.detail
    )


def test_misspelled_field_refusal_detail_mentions_the_unknown_field() -> None:
    r = refused(run([db_rule("pg-main", {"app": {"permission": ["readonly"]}})]))
    assert r.sqlstate == "28000"
    assert "grants nothing" in r.detail
    assert 'unknown field "permission"' in r.detail
    assert 'did you mean "permissions"' in r.detail


# -- raw SQL ------------------------------------------------------------------------

SQL = "GRANT INSERT ON public.audit_log TO {{.Role}}"


def test_sql_entry_becomes_custom_grant_and_its_pairs_are_not_also_plain() -> None:
    grant = granted(
        run(
            [
                db_rule(
                    "pg-main",
                    {"app": {"permissions": ["readwrite"], "schemas": ["public"], "sql": [SQL]}},
                ),
                db_rule("pg-main", {"app": {"permissions": ["readonly"], "schemas": ["s"]}}),
            ]
        )
    )
    assert grant.custom == (CustomGrant(frozenset({P(RW, "public")}), (SQL,)),)
    assert grant.privileges == frozenset({P(RO, "s")})
    assert grant.has_raw_sql


def test_raw_sql_refused_when_listener_disallows_it() -> None:
    r = refused(run([db_rule("pg-main", {"app": {"sql": [SQL]}})], allow_raw_sql=False))
    assert r.sqlstate == "42501"
    assert "allow_raw_sql" in r.message


def test_raw_sql_for_another_database_does_not_block_this_one() -> None:
    rules = [db_rule("pg-main", {"other": {"sql": [SQL]}, "app": {"permissions": ["readonly"]}})]
    grant = granted(run(rules, "app", allow_raw_sql=False))
    assert grant.privileges == frozenset({P(RO, "public")})


def test_preset_cap_drops_raw_sql_and_keeps_capped_pairs() -> None:
    rules = [db_rule("pg-main", {"app": {"permissions": ["admin"], "sql": [SQL]}})]
    grant = granted(run(rules, cap=RO, allow_raw_sql=False))
    assert grant.custom == ()
    assert not grant.has_raw_sql
    assert grant.privileges == frozenset({P(RO, "public")})
    assert grant.preset_cap is RO


def test_preset_cap_on_sql_only_grant_leaves_nothing_and_is_refused_42501() -> None:
    r = refused(run([db_rule("pg-main", {"app": {"sql": [SQL]}})], cap=AD))
    assert r.sqlstate == "42501"
    assert "cap" in r.detail


def test_identical_custom_grants_across_rules_are_deduplicated_and_sorted() -> None:
    entry = {"permissions": ["readonly"], "sql": [SQL]}
    other = {"permissions": ["admin"], "schemas": ["a"], "sql": [SQL]}
    grant = granted(
        run(
            [
                db_rule("pg-main", {"app": other}),
                db_rule("pg-main", {"app": entry}),
                db_rule("pg-main", {"app": entry}),
            ]
        )
    )
    assert len(grant.custom) == 2
    # Determinism: same input in another order gives the same grant.
    again = granted(
        run(
            [
                db_rule("pg-main", {"app": entry}),
                db_rule("pg-main", {"app": other}),
            ]
        )
    )
    assert again == grant


# -- preset caps --------------------------------------------------------------------

CAP_CASES = [
    ("cap_lowers_admin_to_readonly", ["admin"], RO, RO),
    ("cap_lowers_readwrite_to_readonly", ["readwrite"], RO, RO),
    ("cap_never_elevates_readonly", ["readonly"], AD, RO),
    ("cap_never_elevates_readwrite", ["readwrite"], AD, RW),
    ("cap_equal_to_grant_keeps_it", ["readwrite"], RW, RW),
]


@pytest.mark.parametrize(
    ("permissions", "cap", "expected"),
    [c[1:] for c in CAP_CASES],
    ids=[c[0] for c in CAP_CASES],
)
def test_preset_cap(permissions: list[str], cap: Preset, expected: Preset) -> None:
    grant = granted(run([db_rule("pg-main", {"app": {"permissions": permissions}})], cap=cap))
    assert grant.privileges == frozenset({P(expected, "public")})


# -- limits -------------------------------------------------------------------------

LIMIT_CASES: list[tuple[str, list[Any], LimitsConfig, Limits]] = [
    (
        "nothing_set_means_unset",
        [db_rule("pg-main", {"app": {"permissions": ["readonly"]}})],
        NO_DEFAULTS,
        Limits(),
    ),
    (
        "rule_and_listener_level_scopes_are_separate",
        [
            {
                "limits": {"max_conns": 10},
                **db_rule(
                    "pg-main", {"app": {"permissions": ["readonly"]}}, limits={"max_conns": 3}
                ),
            }
        ],
        NO_DEFAULTS,
        Limits(max_conns_user=10, max_conns_listener=3),
    ),
    (
        "defaults_per_user_is_a_ceiling_on_rule_max_conns",
        [
            {
                "limits": {"max_conns": 10},
                **db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            }
        ],
        LimitsConfig(max_conns_per_user=4),
        Limits(max_conns_user=4),
    ),
    (
        "rule_max_conns_stricter_than_defaults_wins",
        [
            {
                "limits": {"max_conns": 2},
                **db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            }
        ],
        LimitsConfig(max_conns_per_user=4),
        Limits(max_conns_user=2),
    ),
    (
        "strictest_across_rules_rule_listener_and_defaults",
        [
            {
                "limits": {"max_conn_duration": "2h", "max_bytes_per_conn": "10GB"},
                **db_rule(
                    "pg-main",
                    {"app": {"permissions": ["readonly"]}},
                    limits={"max_conn_duration": 5400, "max_conns": 5},
                ),
            },
            {
                "limits": {"max_conn_duration": "1h30m", "max_bytes_per_conn": "512MiB"},
                **db_rule("pg-main", {"*": {"permissions": ["readonly"]}}, limits={"max_conns": 7}),
            },
        ],
        LimitsConfig(max_conn_duration=8 * 3600.0, max_bytes_per_conn=10**12),
        Limits(
            max_conns_listener=5,
            max_conn_duration=5400.0,
            max_bytes_per_conn=512 * 1024**2,
        ),
    ),
    (
        "defaults_stricter_than_every_rule_win",
        [
            {
                "limits": {"max_conn_duration": "2h", "max_bytes_per_conn": 5000},
                **db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            }
        ],
        LimitsConfig(max_conn_duration=60.0, max_bytes_per_conn=100),
        Limits(max_conn_duration=60.0, max_bytes_per_conn=100),
    ),
    (
        "zero_means_unset_not_strictest",
        [
            {
                "limits": {"max_conns": 0, "max_conn_duration": 0, "max_bytes_per_conn": "0"},
                **db_rule(
                    "pg-main", {"app": {"permissions": ["readonly"]}}, limits={"max_conns": 0}
                ),
            }
        ],
        LimitsConfig(max_conns_per_user=3, max_conn_duration=0.0, max_bytes_per_conn=0),
        Limits(max_conns_user=3),
    ),
    (
        "rules_for_other_listeners_contribute_no_limits",
        [
            db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            {
                "limits": {"max_conns": 1, "max_conn_duration": "1s", "max_bytes_per_conn": 1},
                **db_rule(
                    "pg-other", {"app": {"permissions": ["readonly"]}}, limits={"max_conns": 1}
                ),
            },
        ],
        NO_DEFAULTS,
        Limits(),
    ),
    (
        "rule_for_this_listener_without_this_database_still_limits",
        [
            db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),
            {
                "limits": {"max_conns": 2},
                **db_rule("pg-main", {"other": {"permissions": ["admin"]}}),
            },
        ],
        NO_DEFAULTS,
        Limits(max_conns_user=2),
    ),
]


@pytest.mark.parametrize(
    ("rules", "defaults", "expected"),
    [c[1:] for c in LIMIT_CASES],
    ids=[c[0] for c in LIMIT_CASES],
)
def test_limits(rules: list[Any], defaults: LimitsConfig, expected: Limits) -> None:
    assert granted(run(rules, defaults=defaults)).limits == expected


def test_evaluate_rules_returns_unknown_field_warnings_once_per_name() -> None:
    rule = db_rule("pg-main", {"app": {"permissions": ["readonly"], "colour": "red"}})
    rule["note"] = "x"
    evaluation = evaluate_rules(
        [rule, rule],
        "pg-main",
        "app",
        admin_database="postgres",
        defaults=NO_DEFAULTS,
        allow_raw_sql=False,
    )
    assert isinstance(evaluation.result, EffectiveGrant)
    assert len(evaluation.warnings) == 2
    assert any('"colour"' in w for w in evaluation.warnings)
    assert any('"note"' in w for w in evaluation.warnings)


# -- reserved databases and over-long names -----------------------------------------------


@pytest.mark.parametrize("database", ["template0", "template1", "postgres", "wp_admin"])
@pytest.mark.parametrize("admin_database", ["postgres", "wp_admin"])
def test_the_wildcard_never_covers_the_templates_or_the_admin_database(
    database: str, admin_database: str
) -> None:
    rules = [db_rule("pg-main", {"*": {"permissions": ["readonly"]}})]
    result = run(rules, database, admin_database=admin_database)
    if database in ("template0", "template1", admin_database):
        assert isinstance(result, Refusal), result
        assert result.sqlstate == "42501"
        assert "reserves" in result.message and f'"{database}"' in result.message
        assert '"*" never covers it' in result.detail
    else:
        assert granted(result).privileges == {P(RO, "public")}


@pytest.mark.parametrize("database", ["template0", "template1", "postgres"])
def test_a_rule_naming_a_reserved_database_is_refused_with_the_reason(database: str) -> None:
    rules = [
        db_rule("pg-main", {database: {"permissions": ["admin"]}}),
        db_rule("pg-main", {"*": {"permissions": ["readonly"]}}),
    ]
    result = run(rules, database, admin_database="postgres")
    assert isinstance(result, Refusal), result
    assert result.sqlstate == "42501"
    what = "the admin database" if database == "postgres" else "a template database"
    assert what in result.message
    assert "names it explicitly" in result.detail


def test_a_reserved_database_still_answers_28000_for_a_listener_without_a_rule() -> None:
    result = run([db_rule("other", {"*": {"permissions": ["readonly"]}})], "template1")
    assert isinstance(result, Refusal) and result.sqlstate == "28000"


@pytest.mark.parametrize(
    ("database", "ok"),
    [
        ("a" * 63, True),
        ("a" * 64, False),
        ("é" * 31 + "a", True),  # 63 bytes
        ("é" * 32, False),  # 64 bytes: PostgreSQL would cut it
        ("a" * 62 + "é", False),  # 64 bytes; a cut on the character boundary gives 62
    ],
)
def test_a_database_name_over_63_bytes_is_refused_never_evaluated(database: str, ok: bool) -> None:
    # With the exact name readonly and "*" readwrite, the over-long name PostgreSQL would cut
    # to ``long`` must not get readwrite there.
    long = database.encode()[:63].decode("utf-8", "ignore")
    rules = [
        db_rule(
            "pg-main",
            {long: {"permissions": ["readonly"]}, "*": {"permissions": ["readwrite"]}},
        )
    ]
    result = run(rules, database)
    if ok:
        assert granted(result).privileges == {P(RO, "public")}
    else:
        assert isinstance(result, Refusal), result
        assert result.sqlstate == "42622"
        assert "63 bytes" in result.message


# -- an identity's rules are parsed once -------------------------------------------------


def _evaluate(identity: Identity, database: str = "app") -> EffectiveGrant | Refusal:
    return evaluate(
        identity, "pg-main", database, admin_database="postgres", defaults=NO_DEFAULTS,
        allow_raw_sql=True,
    )  # fmt: skip


def test_the_same_identity_rules_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[object] = []
    real = evaluate_module.parse_rules

    def counting(raw: object, **kw: Any) -> Any:
        parses.append(raw)
        return real(raw, **kw)

    monkeypatch.setattr(evaluate_module, "parse_rules", counting)
    identity = Identity("alice@example.com", "a", rules=(db_rule("pg-main", {"app": {"permissions": ["readonly"]}}),))
    first, again = _evaluate(identity), _evaluate(identity)
    assert isinstance(first, EffectiveGrant) and first == again
    assert len(parses) == 1
    bad = Identity("bob@example.com", "b", rules=({"backends": []},))
    assert isinstance(_evaluate(bad), Refusal) and isinstance(_evaluate(bad), Refusal)
    assert len(parses) == 2  # a malformed grant is refused each time, parsed once


def test_kept_parses_never_answer_for_other_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rule tuples made and dropped one after another (their ids come back); each is judged on
    # its own content, also once the kept parses are evicted.
    monkeypatch.setattr(evaluate_module, "_parsed", LRU(3))
    for n in range(40):
        database = "app" if n % 2 else "other"
        rules = (db_rule("pg-main", {database: {"permissions": ["readonly"]}}),)
        result = _evaluate(Identity("alice@example.com", "a", rules=rules))
        assert isinstance(result, EffectiveGrant) == (database == "app"), n
        del rules, result
    assert len(evaluate_module._parsed) <= 3
