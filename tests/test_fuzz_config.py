"""The configuration loader as untrusted-input parser: structured documents (every known
key given valid, wrong-typed, out-of-range or environment-referencing values, keys
added, tables dropped) → Config or ConfigError, never another exception; problems
point at lines of the text; secrets referenced from their own fields never show in a
problem message.

test_config_load.py covers arbitrary text and a damaged example config (data/spec_example.toml); this file
generates well-formed TOML so that the validation behind the TOML parser is reached.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import tomlkit
from hypothesis import given
from hypothesis import strategies as st

from waypoint.config.load import ConfigError, load_config_text
from waypoint.config.model import Config

SECRET = "s3cr3t-admin-pw-4b1d"
REDIS_SECRET = "r3dis-pw-77e0"
ENVIRON = {
    "PG_ADMIN_PASSWORD": SECRET,
    "REDIS_URL": f"redis://:{REDIS_SECRET}@127.0.0.1:6379/0",
    "EMPTY": "",
}


def base_document() -> dict[str, Any]:
    return {
        "identity": {"provider": "tailscale", "capability": "example.com/cap/waypoint"},
        "state": {"backend": "memory"},
        "defaults": {"limits": {"max_conns_total": 100}},
        "listeners": [
            {
                "name": "pg-main",
                "listen": "127.0.0.1:5432",
                "backend": "127.0.0.1:5433",
                "postgres": {
                    "admin_user": "waypoint_admin",
                    "admin_password": "${PG_ADMIN_PASSWORD}",
                },
            }
        ],
    }


# (table path, key): None is the root; ("listeners", 0) the first listener.
KEYS: list[tuple[tuple[Any, ...], str]] = [
    ((), "handshake_timeout"),
    ((), "drain_timeout"),
    (("identity",), "provider"),
    (("identity",), "socket"),
    (("identity",), "capability"),
    (("identity",), "timeout"),
    (("revalidation",), "interval"),
    (("provisioning",), "allow_raw_sql"),
    (("defaults", "limits"), "max_conns_total"),
    (("defaults", "limits"), "max_conns_per_user"),
    (("defaults", "limits"), "max_conn_duration"),
    (("defaults", "limits"), "max_bytes_per_conn"),
    (("state",), "backend"),
    (("state",), "url"),
    (("state",), "key_prefix"),
    (("state",), "lease"),
    (("metrics",), "listen"),
    (("listeners", 0), "name"),
    (("listeners", 0), "listen"),
    (("listeners", 0), "mode"),
    (("listeners", 0), "backend"),
    (("listeners", 0), "tls_mode"),
    (("listeners", 0), "use_tailscale_tls"),
    (("listeners", 0), "backend_tls"),
    (("listeners", 0), "cert_file"),
    (("listeners", 0, "postgres"), "admin_user"),
    (("listeners", 0, "postgres"), "admin_database"),
    (("listeners", 0, "postgres"), "user_prefix"),
    (("listeners", 0, "postgres"), "user_ttl"),
    (("listeners", 0, "postgres"), "allow_raw_sql"),
    (("listeners", 0, "postgres"), "password_encryption"),
    (("listeners", 0, "postgres"), "reap_interval"),
    (("listeners", 0, "postgres"), "reassign_to"),
    (("listeners", 0, "postgres"), "no_such_key"),
    (("no_such_table",), "x"),
]

values = st.one_of(
    st.sampled_from(
        ["1s", "15s", "1h30m", "0s", "-1s", "1x", "", "redis", "memory", "static", "tailscale",
         "postgres", "off", "optional", "require", "verify-full", "md5", "auto", "scram-sha-256",
         "127.0.0.1:5432", "[::1]:5432", "host:99999", "wp_", "pg_", "Wp-", "10GB", "1e400s",
         "${NOPE}", "${EMPTY}", "${REDIS_URL}", "$${PG_ADMIN_PASSWORD}", "${", "redis://x",
         "unix:///tmp/redis.sock", "/nonexistent/cert.pem"]
    ),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "name"]), st.integers(0, 3), max_size=2),
    st.just(dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)),
    st.text(max_size=15),
)  # fmt: skip


def _table(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = doc
    for part in path:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node if isinstance(node, dict) else None


edits_st = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), values),
        st.tuples(st.just("drop"), st.sampled_from(KEYS), st.none()),
    ),
    max_size=5,
)


def build(edits: list[tuple[str, tuple[tuple[Any, ...], str], Any]], second_listener: bool) -> str:
    doc = base_document()
    if second_listener:
        doc["listeners"].append(dict(doc["listeners"][0], name="pg-two", listen="127.0.0.1:5442"))
    for action, (path, key), value in edits:
        table = _table(doc, path)
        if table is None:
            continue
        if action == "set":
            table[key] = value
        else:
            table.pop(key, None)
    return tomlkit.dumps(doc)


def check_load(text: str, *, redis_secret_only_in_url: bool = True) -> Config | None:
    try:
        cfg = load_config_text(text, source="gen.toml", environ=ENVIRON)
    except ConfigError as exc:
        assert exc.problems
        # tomlkit numbers lines as str.splitlines() does, the key locator by LF.
        lines = max(text.count("\n") + 1, len(text.splitlines()))
        for problem in exc.problems:
            assert problem.line is None or 1 <= problem.line <= lines
            rendered = str(problem)
            assert rendered.startswith("gen.toml")
            if redis_secret_only_in_url:
                assert REDIS_SECRET not in rendered
        return None
    assert isinstance(cfg, Config)
    return cfg


@given(edits=edits_st, second_listener=st.booleans())
def test_generated_documents_give_config_or_config_error(
    edits: list[tuple[str, tuple[tuple[Any, ...], str], Any]], second_listener: bool
) -> None:
    text = build(edits, second_listener)
    only_in_url = all(
        "REDIS_URL" not in str(value) or spot == (("state",), "url") for _, spot, value in edits
    )
    cfg = check_load(text, redis_secret_only_in_url=only_in_url)
    if cfg is not None:
        assert cfg.listeners and all(lst.postgres.admin_password for lst in cfg.listeners)


@given(edits=edits_st)
def test_the_admin_password_never_appears_in_a_config_error_when_only_admin_password_names_it(
    edits: list[tuple[str, tuple[tuple[Any, ...], str], Any]],
) -> None:
    # Only admin_password references ${PG_ADMIN_PASSWORD}: other values that would expand
    # to the secret are left out here (the test below covers that case).
    edits = [e for e in edits if "PG_ADMIN_PASSWORD" not in str(e[2])]
    text = build(edits, False)
    try:
        load_config_text(text, source="gen.toml", environ=ENVIRON)
    except ConfigError as exc:
        assert SECRET not in str(exc)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (("listeners", 0), "listen"),
        (("listeners", 0), "backend"),
        (("listeners", 0), "tls_mode"),
        (("listeners", 0, "postgres"), "user_prefix"),
        (("listeners", 0, "postgres"), "user_ttl"),
        (("listeners", 0, "postgres"), "password_encryption"),
    ],
)
def test_a_secret_referenced_from_a_wrong_field_is_not_echoed(
    table: tuple[Any, ...], key: str
) -> None:
    text = build([("set", (table, key), "${PG_ADMIN_PASSWORD}")], False)
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="gen.toml", environ=ENVIRON)
    assert SECRET not in str(info.value)
    assert "${PG_ADMIN_PASSWORD}" in str(info.value)
