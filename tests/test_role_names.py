"""Role and group names, pinned vectors and properties (docs/design.md)."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.grants.model import CustomGrant, Preset, SchemaPrivilege
from waypoint.grants.naming import (
    RoleOwner,
    collision_role_name,
    custom_group_comment,
    custom_group_name,
    fit_identifier,
    group_comment,
    group_name,
    parse_group_comment,
    parse_role_comment,
    role_comment,
    role_name,
    role_owner,
    sanitize,
    sanitize_node,
    validate_prefix,
)
from waypoint.identity.model import Identity

NAME_RE = re.compile(r"[a-z0-9_]+")


def nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


# -- pinned vectors -------------------------------------------------------------------


def test_fit_identifier_pinned_vector() -> None:
    assert fit_identifier("z" * 120) == "z" * 52 + "_46aaf07558"


def test_fit_identifier_hash_is_over_the_dropped_remainder() -> None:
    name = "a" * 52 + "b" * 30
    assert fit_identifier(name) == "a" * 52 + "_" + hashlib.sha256(b"b" * 30).hexdigest()[:10]


def test_fit_identifier_keeps_63_bytes_and_cuts_64() -> None:
    assert fit_identifier("x" * 63) == "x" * 63
    assert nbytes(fit_identifier("x" * 64)) == 63
    assert fit_identifier("x" * 64).startswith("x" * 52 + "_")


def test_fit_identifier_never_splits_a_multibyte_character() -> None:
    name = "a" * 51 + "é" * 20  # 'é' is 2 bytes: byte 52 is inside the first 'é'
    fitted = fit_identifier(name)
    assert fitted == "a" * 51 + "_" + hashlib.sha256(("é" * 20).encode()).hexdigest()[:10]


def test_role_name_pinned_example() -> None:
    assert (
        role_name("wp_", "pg-main", "alice@example.com", "alice-laptop", "app_db", None)
        == "wp_pg_main_alice_example_com_alice_laptop_app_db"
    )


def test_role_name_with_preset_cap_suffix() -> None:
    assert (
        role_name("wp_", "pg-main", "bob@example.com", "bob-pc", "app", Preset.READONLY)
        == "wp_pg_main_bob_example_com_bob_pc_app_preset_readonly"
    )


def test_role_name_with_preset_cap_over_63_bytes_is_fitted() -> None:
    # The full name is 64 bytes: the 12 bytes after the first 52 are hashed.
    full = "wp_pg_main_alice_example_com_alice_laptop_app_db_preset_readonly"
    assert len(full) == 64
    expected = full[:52] + "_" + hashlib.sha256(full[52:].encode()).hexdigest()[:10]
    assert (
        role_name("wp_", "pg-main", "alice@example.com", "alice-laptop", "app_db", Preset.READONLY)
        == expected
    )


def test_role_name_uses_first_dns_label_of_node() -> None:
    assert (
        role_name("wp_", "l", "Bob", "Bob-PC.tail1234.ts.net", "DB", None) == "wp_l_bob_bob_pc_db"
    )


def test_long_role_name_is_fitted() -> None:
    name = role_name("wp_", "pg-main", "a.very.long.login@example.com", "node", "d" * 40, None)
    assert nbytes(name) == 63
    assert name.startswith("wp_pg_main_a_very_long_login_example_com_node_dddddd")


def test_sanitize() -> None:
    assert sanitize("John.Doe@X") == "john_doe_x"
    assert sanitize("Zoë-1") == "zo__1"
    assert sanitize_node("alice-laptop.tail1.ts.net") == "alice_laptop"


def test_group_name_pinned_vector_and_hash_over_exact_values() -> None:
    h = hashlib.sha256(b"readonly\0public\0app_db").hexdigest()[:8]
    assert (
        group_name("wp_", Preset.READONLY, "public", "app_db")
        == f"wp_grp_readonly_public_app_db_{h}"
    )


def test_group_names_differ_for_schemas_that_sanitize_alike() -> None:
    a = group_name("wp_", Preset.READWRITE, "App", "db")
    b = group_name("wp_", Preset.READWRITE, "app", "db")
    c = group_name("wp_", Preset.READWRITE, "a.b", "db")
    d = group_name("wp_", Preset.READWRITE, "a_b", "db")
    assert len({a, b}) == 2
    assert len({c, d}) == 2


def test_custom_group_name_is_content_addressed() -> None:
    g1 = CustomGrant(frozenset({SchemaPrivilege(Preset.READONLY, "public")}), ("GRANT x",))
    g2 = CustomGrant(frozenset({SchemaPrivilege(Preset.READONLY, "public")}), ("GRANT y",))
    name = custom_group_name("wp_", g1, "app")
    assert re.fullmatch(r"wp_grp_perms_[0-9a-f]{16}_app", name)
    assert name == custom_group_name("wp_", g1, "app")
    assert name != custom_group_name("wp_", g2, "app")
    # The exact database is part of the content: App and app sanitize alike but differ.
    assert custom_group_name("wp_", g1, "App") != custom_group_name("wp_", g1, "app")


def test_custom_group_name_ignores_privilege_set_order() -> None:
    pairs = [SchemaPrivilege(Preset.ADMIN, "b"), SchemaPrivilege(Preset.READONLY, "a")]
    g1 = CustomGrant(frozenset(pairs), ("s",))
    g2 = CustomGrant(frozenset(reversed(pairs)), ("s",))
    assert custom_group_name("wp_", g1, "d") == custom_group_name("wp_", g2, "d")


# -- collisions and ownership ---------------------------------------------------------


def test_collision_fallback_is_deterministic_distinct_and_fits() -> None:
    base = role_name("wp_", "pg-main", "john.doe@x", "n", "db", None)
    assert base == role_name("wp_", "pg-main", "john_doe@x", "n", "db", None)
    k1 = RoleOwner("john.doe@x", "n", "pg-main", "db").key()
    k2 = RoleOwner("john_doe@x", "n", "pg-main", "db").key()
    f1, f2 = collision_role_name(base, k1), collision_role_name(base, k2)
    assert f1 == collision_role_name(base, k1)
    assert len({base, f1, f2}) == 3
    assert f1 == base + "_" + hashlib.sha256(k1.encode()).hexdigest()[:10]
    long_base = "z" * 63
    assert nbytes(collision_role_name(long_base, k1)) == 63


def test_role_comment_round_trips_exactly() -> None:
    ident = Identity(login="John.Doe@x", node="n1", tags=("tag:a",))
    text = role_comment(ident, "pg-main", "App", Preset.READONLY)
    assert text.startswith("waypoint:v1 {")
    owner = parse_role_comment(text)
    assert owner == RoleOwner("John.Doe@x", "n1", "pg-main", "App", "readonly")
    assert owner == role_owner(ident, "pg-main", "App", Preset.READONLY)
    assert parse_role_comment(role_comment(ident, "pg-main", "app")) != owner


@pytest.mark.parametrize(
    "text",
    [
        "",
        "managed by hand",
        "waypoint:v1 not json",
        "waypoint:v1 []",
        'waypoint:v1 {"login":"a"}',
        'waypoint:v1 {"database":"d","listener":"l","login":1,"node":"n","preset":null}',
        'waypoint:v1 group {"database":"d","digest":null,"kind":"preset","preset":"readonly","schema":"s"}',
    ],
)
def test_parse_role_comment_rejects_foreign_comments(text: str) -> None:
    assert parse_role_comment(text) is None


def test_group_comments_round_trip_and_are_not_role_comments() -> None:
    text = group_comment(Preset.ADMIN, "Sch", "db")
    owner = parse_group_comment(text)
    assert owner is not None
    assert (owner.kind, owner.preset, owner.schema, owner.database) == (
        "preset",
        "admin",
        "Sch",
        "db",
    )
    assert parse_role_comment(text) is None
    custom = CustomGrant(frozenset(), ("GRANT x",))
    ctext = custom_group_comment(custom, "db")
    cowner = parse_group_comment(ctext)
    assert cowner is not None and cowner.kind == "perms" and cowner.digest is not None
    assert cowner.digest in custom_group_name("wp_", custom, "db")
    assert parse_group_comment("waypoint:v1 group {}") is None


@pytest.mark.parametrize("prefix", ["", "WP_", "wp-", "pg_", "x" * 41])
def test_invalid_prefixes_are_rejected(prefix: str) -> None:
    assert validate_prefix(prefix) is not None
    with pytest.raises(ValueError):
        role_name(prefix, "l", "a", "n", "d", None)


# -- properties -----------------------------------------------------------------------

parts = st.text(max_size=80)
presets = st.none() | st.sampled_from(list(Preset))
prefixes = st.from_regex(r"[a-z][a-z0-9_]{0,10}_", fullmatch=True).filter(
    lambda p: not p.startswith("pg_")
)


@given(prefixes, parts, parts, parts, parts, presets)
def test_role_name_is_short_ascii_and_deterministic(
    prefix: str, listener: str, login: str, node: str, db: str, cap: Preset | None
) -> None:
    name = role_name(prefix, listener, login, node, db, cap)
    assert nbytes(name) <= 63
    assert NAME_RE.fullmatch(name)
    assert name.startswith(prefix)
    assert name == role_name(prefix, listener, login, node, db, cap)


@given(prefixes, st.sampled_from(list(Preset)), parts, parts)
def test_group_name_is_short_ascii(prefix: str, preset: Preset, schema: str, db: str) -> None:
    name = group_name(prefix, preset, schema, db)
    assert nbytes(name) <= 63
    assert NAME_RE.fullmatch(name)


@given(st.text(max_size=120))
def test_fit_identifier_never_splits_utf8(name: str) -> None:
    fitted = fit_identifier(name)
    encoded = fitted.encode("utf-8")  # would raise on a lone surrogate half
    assert len(encoded) <= 63
    if len(name.encode("utf-8")) <= 63:
        assert fitted == name
    else:
        head = fitted[:-11]
        assert name.startswith(head)
        assert 52 - 3 <= len(head.encode("utf-8")) <= 52
        rest = name[len(head) :].encode("utf-8")
        assert fitted[-11:] == "_" + hashlib.sha256(rest).hexdigest()[:10]
