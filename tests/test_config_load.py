"""Loading and validating the TOML configuration (docs/configuration.md)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from config_support import LISTENER, SOURCE, load_text, problems_of
from hypothesis import given
from hypothesis import strategies as st

from waypoint.config import (
    ConfigError,
    ConfigProblem,
    load_config,
    load_config_text,
    render_config,
)
from waypoint.config.env import expand_env
from waypoint.config.keys import KeyLocator, format_key_path

DATA = Path(__file__).parent / "data"


def line_no(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line containing ``needle`` (the n-th such line)."""
    seen = 0
    for i, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return i
    raise AssertionError(f"{needle!r} not in text")


def one_problem(
    text: str,
    path: str,
    fragment: str,
    *,
    needle: str | None,
    environ: dict[str, str] | None = None,
) -> ConfigProblem:
    """Assert that loading fails with exactly one problem at ``path``; check file, line, message."""
    found = problems_of(text, environ)
    assert len(found) == 1, [str(p) for p in found]
    (p,) = found
    assert p.source == SOURCE
    assert format_key_path(p.path) == path
    assert fragment in p.message, str(p)
    expected_line = None if needle is None else line_no(text, needle)
    assert p.line == expected_line, str(p)
    rendered = str(p)
    prefix = SOURCE if expected_line is None else f"{SOURCE}:{expected_line}"
    assert rendered.startswith(f"{prefix}: {path}: "), rendered
    return p


def with_listener_key(line: str) -> str:
    """:data:`LISTENER` with the TOML ``line`` added to its ``[[listeners]]`` table."""
    return LISTENER.replace('name = "pg-main"', f'name = "pg-main"\n{line}')


def with_postgres_key(line: str) -> str:
    """:data:`LISTENER` with the TOML ``line`` added to its ``[listeners.postgres]`` table."""
    return LISTENER.replace('admin_password = "pw"', f'admin_password = "pw"\n{line}')


STATIC = """\
[identity]
provider = "static"

[[identity.static]]
cidr = "127.0.0.0/8"
login = "alice@example.com"
node = "laptop"
"""


# --------------------------------------------------------------------------- one problem each


def rejected(
    text: str, path: str, fragment: str, needle: str | None, *also: str, id: str
) -> object:
    """A text that fails to load with exactly one problem: at key ``path``, whose message
    holds ``fragment`` and every one of ``also``, reported on the line that holds ``needle``
    (None: no line). ``id`` names the case; a ``pytest.param`` for the table."""
    return pytest.param(text, path, fragment, needle, also, id=id)


REJECTED = [
    # strictness
    rejected(
        '[provisioning]\nallow_raw_sql = "false"\n' + LISTENER,
        "provisioning.allow_raw_sql",
        "expected a boolean",
        'allow_raw_sql = "false"',
        id="string_false_for_allow_raw_sql_is_rejected",
    ),
    rejected(
        '[defaults.limits]\nmax_conns_total = "10"\n' + LISTENER,
        "defaults.limits.max_conns_total",
        'expected an integer, got string "10"',
        "max_conns_total",
        id="string_for_max_conns_total_is_rejected",
    ),
    rejected(
        "handshake_timeout = 15\n" + LISTENER,
        "handshake_timeout",
        "durations are strings",
        "handshake_timeout",
        "integer 15",
        id="bare_integer_duration_is_rejected",
    ),
    rejected(
        "[defaults.limits]\nmax_conns_per_user = true\n" + LISTENER,
        "defaults.limits.max_conns_per_user",
        "expected an integer, got boolean true",
        "max_conns_per_user",
        id="boolean_is_not_an_integer",
    ),
    rejected(
        LISTENER.replace('admin_user = "admin"', "admin_user = 5"),
        "listeners[0].postgres.admin_user",
        "expected a string, got integer 5",
        "admin_user",
        id="integer_is_not_a_string",
    ),
    rejected(
        "[defaults.limits]\nmax_conns_total = 10.0\n" + LISTENER,
        "defaults.limits.max_conns_total",
        "expected an integer",
        "max_conns_total",
        id="float_is_not_an_integer",
    ),
    rejected(
        LISTENER + STATIC + 'tags = "tag:dev"\n',
        "identity.static[0].tags",
        "expected an array, got string",
        "tags =",
        id="string_is_not_an_array_of_tags",
    ),
    rejected(
        '[listeners]\nname = "x"\n',
        "listeners",
        "expected an array, got a table",
        "[listeners]",
        id="listeners_as_single_table_is_rejected",
    ),
    rejected(
        '[defaults.limits]\nmax_bytes_per_conn = "10XB"\n' + LISTENER,
        "defaults.limits.max_bytes_per_conn",
        "unknown size unit",
        "max_bytes_per_conn",
        id="bad_size_unit_is_rejected",
    ),
    rejected(
        "[defaults.limits]\nmax_bytes_per_conn = -1\n" + LISTENER,
        "defaults.limits.max_bytes_per_conn",
        "negative size",
        "max_bytes_per_conn",
        id="negative_size_is_rejected",
    ),
    rejected(
        '[defaults.limits]\nmax_conn_duration = "-1h"\n' + LISTENER,
        "defaults.limits.max_conn_duration",
        "negative duration",
        "max_conn_duration",
        id="negative_duration_is_rejected",
    ),
    rejected(
        "[defaults.limits]\nmax_conns_per_user = -3\n" + LISTENER,
        "defaults.limits.max_conns_per_user",
        "must not be negative",
        "max_conns_per_user",
        id="negative_max_conns_per_user_is_rejected",
    ),
    rejected(
        "[defaults.limits]\nmax_conns_total = 0\n" + LISTENER,
        "defaults.limits.max_conns_total",
        "greater than 0",
        "max_conns_total",
        id="zero_max_conns_total_is_rejected",
    ),
    rejected(
        'handshake_timeout = "0s"\n' + LISTENER,
        "handshake_timeout",
        "greater than 0s",
        "handshake_timeout",
        id="zero_handshake_timeout_is_rejected",
    ),
    # unknown keys
    rejected(
        with_postgres_key('admin_pasword = "x"'),
        "listeners[0].postgres.admin_pasword",
        'did you mean "admin_password"?',
        "admin_pasword",
        id="unknown_key_suggests_the_close_match",
    ),
    rejected(
        'handshake_timout = "5s"\n' + LISTENER,
        "handshake_timout",
        'did you mean "handshake_timeout"?',
        "handshake_timout",
        id="unknown_root_key_suggests_and_lists",
    ),
    rejected(
        '[metrics]\nzzz = "1"\n' + LISTENER,
        "metrics.zzz",
        "valid keys here: listen",
        "zzz",
        id="unknown_key_without_close_match_lists_valid_keys",
    ),
    rejected(
        "[provisionng]\nallow_raw_sql = true\n" + LISTENER,
        "provisionng",
        'did you mean "provisioning"?',
        "[provisionng]",
        id="unknown_table_is_rejected_with_suggestion",
    ),
    rejected(
        'source = "x"\n' + LISTENER,
        "source",
        "unknown key",
        "source",
        id="source_is_not_a_toml_key",
    ),
    # ${VAR}
    rejected(
        LISTENER.replace('"pw"', '"${PG_ADMIN_PASSWORD}"'),
        "listeners[0].postgres.admin_password",
        "environment variable PG_ADMIN_PASSWORD is not set",
        "admin_password",
        id="missing_env_variable_names_variable_key_and_line",
    ),
    rejected(
        LISTENER.replace('"pw"', '"${OOPS"'),
        "listeners[0].postgres.admin_password",
        "unterminated ${",
        "admin_password",
        id="unterminated_env_reference_is_an_error",
    ),
    rejected(
        LISTENER + STATIC + 'tags = ["tag:a", "${TAG}"]\n',
        "identity.static[0].tags[1]",
        "environment variable TAG is not set",
        "tags =",
        id="missing_env_variable_in_an_array_points_at_its_key",
    ),
    # listeners
    rejected(
        'handshake_timeout = "15s"\n',
        "listeners",
        "at least one [[listeners]]",
        None,
        id="no_listener_is_an_error",
    ),
    rejected(
        LISTENER.replace('"pg-main"', '""'),
        "listeners[0].name",
        "must not be empty",
        "name =",
        id="empty_listener_name_is_rejected",
    ),
    rejected(
        with_listener_key('mode = "mysql"'),
        "listeners[0].mode",
        'must be one of "postgres", got string "mysql"',
        "mode =",
        id="mode_other_than_postgres_is_rejected",
    ),
    rejected(
        with_listener_key('tls_mode = "requir"'),
        "listeners[0].tls_mode",
        'did you mean "require"?',
        "tls_mode",
        id="bad_tls_mode_is_rejected_with_hint",
    ),
    rejected(
        with_listener_key('backend_tls = "verify"'),
        "listeners[0].backend_tls",
        "must be one of",
        "backend_tls",
        '"verify-full"',
        id="bad_backend_tls_is_rejected",
    ),
    rejected(
        with_listener_key('cert_file = "/c.pem"'),
        "listeners[0].cert_file",
        "key_file is missing",
        "cert_file",
        id="cert_file_without_key_file_is_rejected",
    ),
    rejected(
        with_listener_key('key_file = "/k.pem"'),
        "listeners[0].key_file",
        "cert_file is missing",
        "key_file",
        id="key_file_without_cert_file_is_rejected",
    ),
    rejected(
        with_listener_key('tls_mode = "require"'),
        "listeners[0].tls_mode",
        "needs a certificate",
        "tls_mode",
        id="tls_require_without_certificate_source_is_rejected",
    ),
    rejected(
        '[[listeners]]\nname = "a"\nlisten = "127.0.0.1:1"\nbackend = "h:2"\n',
        "listeners[0].postgres",
        "required table [listeners.postgres] is missing",
        "[[listeners]]",
        id="missing_postgres_table_is_rejected",
    ),
    rejected(
        LISTENER.replace('admin_user = "admin"\n', ""),
        "listeners[0].postgres.admin_user",
        "required key is missing",
        "[listeners.postgres]",
        id="missing_admin_user_is_rejected",
    ),
    rejected(
        LISTENER.replace('admin_password = "pw"\n', ""),
        "listeners[0].postgres.admin_password",
        "required key is missing",
        "[listeners.postgres]",
        id="missing_admin_password_is_rejected",
    ),
    rejected(
        LISTENER.replace('"pw"', '""'),
        "listeners[0].postgres.admin_password",
        "must not be empty",
        "admin_password",
        id="empty_admin_password_is_rejected",
    ),
    rejected(
        LISTENER.replace('"127.0.0.1:5432"', '"5432"'),
        "listeners[0].listen",
        "is not host:port",
        "listen =",
        id="listen_not_host_port_is_rejected",
    ),
    rejected(
        LISTENER.replace('"10.0.0.1:5432"', '"db:99999"'),
        "listeners[0].backend",
        "no valid port",
        "backend =",
        id="backend_without_valid_port_is_rejected",
    ),
    rejected(
        LISTENER.replace('"10.0.0.1:5432"', '"db:0"'),
        "listeners[0].backend",
        "port 0",
        "backend =",
        id="backend_port_zero_is_rejected",
    ),
    rejected(
        with_postgres_key('user_prefix = "WP_"'),
        "listeners[0].postgres.user_prefix",
        "lowercase letters",
        "user_prefix",
        id="uppercase_user_prefix_is_rejected",
    ),
    rejected(
        with_postgres_key('user_prefix = "pg_x_"'),
        "listeners[0].postgres.user_prefix",
        "PostgreSQL reserves",
        "user_prefix",
        id="reserved_pg_user_prefix_is_rejected",
    ),
    rejected(
        with_postgres_key('user_prefix = "waypoint_users_x_"'),
        "listeners[0].postgres.user_prefix",
        "at most 16 bytes",
        "user_prefix",
        id="long_user_prefix_is_rejected",
    ),
    rejected(
        with_postgres_key('user_ttl = "0s"'),
        "listeners[0].postgres.user_ttl",
        "greater than 0s",
        "user_ttl",
        id="zero_user_ttl_is_rejected",
    ),
    rejected(
        'handshake_timeout = "20s"\n' + with_postgres_key('user_ttl = "30s"'),
        "listeners[0].postgres.user_ttl",
        "at least twice handshake_timeout (40s)",
        "user_ttl",
        id="user_ttl_below_twice_handshake_timeout_is_rejected",
    ),
    rejected(
        with_postgres_key('password_encryption = "sha1"'),
        "listeners[0].postgres.password_encryption",
        "must be one of",
        "password_encryption",
        '"scram-sha-256"',
        id="bad_password_encryption_is_rejected",
    ),
    rejected(
        with_postgres_key('reap_interval = "0s"'),
        "listeners[0].postgres.reap_interval",
        "greater than 0s",
        "reap_interval",
        id="zero_reap_interval_is_rejected",
    ),
    # identity
    rejected(
        '[identity]\nprovider = "static"\n' + LISTENER,
        "identity.static",
        "at least one [[identity.static]]",
        "[identity]",
        id="static_provider_without_entries_is_rejected",
    ),
    rejected(
        '[identity]\nprovider = "statik"\n' + LISTENER,
        "identity.provider",
        'did you mean "static"?',
        "provider",
        id="bad_provider_is_rejected",
    ),
    rejected(
        STATIC.replace("127.0.0.0/8", "localhost") + LISTENER,
        "identity.static[0].cidr",
        'invalid network "localhost"',
        "cidr",
        id="static_cidr_must_be_a_network",
    ),
    rejected(
        STATIC.replace("127.0.0.0/8", "10.1.2.3/24") + LISTENER,
        "identity.static[0].cidr",
        "did you mean 10.1.2.0/24?",
        "cidr",
        id="static_cidr_with_host_bits_suggests_the_network",
    ),
    rejected(
        STATIC.replace('login = "alice@example.com"\n', "") + LISTENER,
        "identity.static[0].login",
        "required key is missing",
        "[[identity.static]]",
        id="static_entry_needs_login",
    ),
    rejected(
        STATIC.replace('"laptop"', '""') + LISTENER,
        "identity.static[0].node",
        "must not be empty",
        "node =",
        id="static_entry_needs_non_empty_node",
    ),
    rejected(
        STATIC + '\n[[identity.static]]\ncidr = "::1/128"\nlogin = "bob"\nnode = ""\n' + LISTENER,
        "identity.static[1].node",
        "must not be empty",
        'node = ""',
        id="second_static_entry_error_has_its_line",
    ),
    rejected(
        STATIC + """grants_json = '[{"backends": '\n""" + LISTENER,
        "identity.static[0].grants_json",
        "invalid JSON",
        "grants_json",
        id="grants_json_invalid_json_is_rejected",
    ),
    rejected(
        STATIC + """grants_json = '"readonly"'\n""" + LISTENER,
        "identity.static[0].grants_json",
        "must be a JSON array",
        "grants_json",
        id="grants_json_scalar_is_rejected",
    ),
    rejected(
        STATIC + "grants = [{ backends = {} }]\ngrants_json = '[]'\n" + LISTENER,
        "identity.static[0].grants_json",
        "not both",
        "grants_json",
        id="grants_and_grants_json_together_are_rejected",
    ),
    rejected(
        STATIC + 'grants = ["readonly"]\n' + LISTENER,
        "identity.static[0].grants[0]",
        "must be a table",
        "grants =",
        id="grant_rule_that_is_not_a_table_is_rejected",
    ),
    # state and metrics
    rejected(
        '[state]\nbackend = "redis"\n' + LISTENER,
        "state.url",
        "requires url",
        "[state]",
        id="redis_backend_requires_url",
    ),
    rejected(
        '[state]\nbackend = "redis"\nurl = "http://x"\n' + LISTENER,
        "state.url",
        "redis://",
        "url =",
        id="redis_url_must_be_a_redis_url",
    ),
    rejected(
        '[state]\nbackend = "etcd"\n' + LISTENER,
        "state.backend",
        'must be one of "memory", "redis"',
        "backend =",
        id="bad_state_backend_is_rejected",
    ),
    rejected(
        '[metrics]\nlisten = "9187"\n' + LISTENER,
        "metrics.listen",
        "is not host:port",
        "listen =",
        id="metrics_listen_must_be_host_port",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment", "needle", "also"), REJECTED)
def test_text_with_one_problem_is_rejected(
    text: str, path: str, fragment: str, needle: str | None, also: tuple[str, ...]
) -> None:
    p = one_problem(text, path, fragment, needle=needle)
    for more in also:
        assert more in p.message, str(p)


# --------------------------------------------------------------------------- defaults and the example config


def test_minimal_config_gets_spec_defaults() -> None:
    c = load_text(LISTENER)
    assert c.handshake_timeout == 15.0
    assert c.drain_timeout == 30.0
    assert c.identity.provider == "tailscale"
    assert c.identity.socket == "/var/run/tailscale/tailscaled.sock"
    assert c.identity.capability == "redo.com/cap/waypoint"
    assert c.identity.timeout == 5.0
    assert c.revalidation.interval == 60.0
    assert c.provisioning.allow_raw_sql is False
    lim = c.defaults.limits
    assert (lim.max_conns_total, lim.max_conns_per_user) == (1000, 0)
    assert (lim.max_conn_duration, lim.max_bytes_per_conn) == (0.0, 0)
    assert c.state.backend == "memory"
    assert c.state.url is None
    assert c.state.key_prefix == "waypoint:"
    assert c.state.lease == 30.0
    assert c.metrics.listen is None
    (lst,) = c.listeners
    assert lst.mode == "postgres"
    assert lst.tls_mode == "optional"
    assert lst.use_tailscale_tls is False
    assert lst.backend_tls == "prefer"
    assert lst.listen_address == ("127.0.0.1", 5432)
    pg = lst.postgres
    assert pg.admin_database == "postgres"
    assert pg.user_prefix == "wp_"
    assert pg.user_ttl == 86400.0
    assert pg.allow_raw_sql is None
    assert pg.password_encryption == "auto"
    assert pg.effective_reap_interval == 3600.0
    assert pg.reassign_to is None
    assert pg.reap_on_cockroachdb is False
    assert c.source == SOURCE


def test_spec_example_loads_unchanged() -> None:
    c = load_config_text(
        (DATA / "spec_example.toml").read_text(),
        source="spec_example.toml",
        environ={"PG_ADMIN_PASSWORD": "from-env"},
    )
    assert c.handshake_timeout == 15.0
    assert c.drain_timeout == 30.0
    assert c.identity.timeout == 5.0
    assert c.revalidation.interval == 60.0
    assert c.defaults.limits.max_conns_total == 1000
    assert c.defaults.limits.max_conns_per_user == 10
    assert c.defaults.limits.max_conn_duration == 8 * 3600.0
    assert c.defaults.limits.max_bytes_per_conn == 10_000_000_000
    (lst,) = c.listeners
    assert (lst.name, lst.listen, lst.backend) == ("pg-main", "0.0.0.0:5432", "10.0.1.10:5432")
    assert lst.use_tailscale_tls is True
    assert lst.postgres.admin_user == "waypoint_admin"
    assert lst.postgres.admin_password == "from-env"
    assert lst.postgres.user_ttl == 86400.0
    assert c.allow_raw_sql(lst) is False


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "waypoint.toml"
    path.write_text(LISTENER)
    c = load_config(path)
    assert c.source == str(path)
    assert c.listeners[0].name == "pg-main"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the file"):
        load_config(path)


def test_non_utf8_file_is_a_config_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'handshake_timeout = "15s"\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml:2: the file is not valid UTF-8"):
        load_config(path)


def test_toml_syntax_error_names_file_and_line() -> None:
    text = 'handshake_timeout = "15s"\n[identity\nprovider = "static"\n'
    found = problems_of(text)
    assert len(found) == 1
    assert found[0].line == 2
    assert str(found[0]).startswith(f"{SOURCE}:2: TOML syntax error")


def test_duplicate_key_is_a_syntax_error() -> None:
    found = problems_of(LISTENER + 'admin_user = "again"\n')
    assert len(found) == 1
    assert "TOML" in found[0].message


# --------------------------------------------------------------------------- strictness


def test_size_string_and_integer_are_both_accepted() -> None:
    assert (
        load_text(
            '[defaults.limits]\nmax_bytes_per_conn = "1MiB"\n' + LISTENER
        ).defaults.limits.max_bytes_per_conn
        == 1024**2
    )
    assert (
        load_text(
            "[defaults.limits]\nmax_bytes_per_conn = 4096\n" + LISTENER
        ).defaults.limits.max_bytes_per_conn
        == 4096
    )


def test_zero_readiness_timeout_is_rejected_and_drain_delay_defaults_to_zero() -> None:
    text = '[metrics]\nreadiness_timeout = "0s"\n' + LISTENER
    one_problem(text, "metrics.readiness_timeout", "greater than 0s", needle="readiness_timeout")
    loaded = load_text('drain_delay = "10s"\n' + LISTENER)
    assert loaded.drain_delay == 10.0 and loaded.metrics.readiness_timeout == 2.0
    assert load_text(LISTENER).drain_delay == 0.0


def test_backend_end_timeout_must_be_positive_and_the_check_interval_may_be_off() -> None:
    one_problem(
        'backend_end_timeout = "0s"\n' + LISTENER,
        "backend_end_timeout",
        "greater than 0s",
        needle="backend_end_timeout",
    )
    loaded = load_text(LISTENER)
    assert loaded.backend_end_timeout == 2.0
    assert loaded.listeners[0].postgres.client_connection_check_interval == 5.0
    off = with_postgres_key('client_connection_check_interval = "0s"')
    assert load_text(off).listeners[0].postgres.client_connection_check_interval == 0.0


def test_zero_revalidation_interval_disables_and_is_allowed() -> None:
    assert load_text('[revalidation]\ninterval = "0s"\n' + LISTENER).revalidation.interval == 0.0


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_second_listener_has_its_line() -> None:
    second = LISTENER.replace('"pg-main"', '"pg-two"').replace("user_prefix", "x")
    second = second.replace('admin_user = "admin"', 'admin_user = "admin"\nuser_prefx = "wp_"')
    text = LISTENER + "\n" + second
    one_problem(
        text, "listeners[1].postgres.user_prefx", 'did you mean "user_prefix"?', needle="user_prefx"
    )


# --------------------------------------------------------------------------- ${VAR}


def test_env_variable_is_expanded() -> None:
    text = LISTENER.replace('"pw"', '"${PGPW}"')
    assert load_text(text, {"PGPW": "secret"}).listeners[0].postgres.admin_password == "secret"


def test_env_variable_expands_inside_a_longer_string() -> None:
    text = LISTENER.replace('"10.0.0.1:5432"', '"${DBHOST}:5432"')
    assert load_text(text, {"DBHOST": "db.internal"}).listeners[0].backend == "db.internal:5432"


def test_double_dollar_brace_writes_a_literal() -> None:
    text = LISTENER.replace('"pw"', '"a$${NOT_A_VAR}b"')
    assert load_text(text).listeners[0].postgres.admin_password == "a${NOT_A_VAR}b"


def test_lone_dollar_is_left_alone() -> None:
    text = LISTENER.replace('"pw"', '"pa$$word$ and $HOME"')
    assert load_text(text).listeners[0].postgres.admin_password == "pa$$word$ and $HOME"


def test_env_expansion_is_per_value_not_over_the_text() -> None:
    # A ${...} inside a TOML comment is not a value: nothing to expand, no error.
    text = "# admin_password = ${NOT_SET}\n" + LISTENER
    assert load_text(text).listeners[0].postgres.admin_password == "pw"


def test_expand_env_reports_every_missing_variable() -> None:
    value, errs = expand_env("${A}-${B}-${C}", {"B": "b"})
    assert value == "${A}-b-${C}"
    assert errs == ["environment variable A is not set", "environment variable C is not set"]


def test_env_expansion_reaches_values_in_static_grants_but_not_keys() -> None:
    text = LISTENER + textwrap.dedent(
        """\
        [identity]
        provider = "static"
        [[identity.static]]
        cidr = "127.0.0.0/8"
        login = "${WHO}"
        node = "laptop"
        grants = [{ backends = { "pg-main" = { pg = { databases = { "${DB}" = { permissions = ["${PRESET}"] } } } } } }]
        """
    )
    c = load_text(text, {"WHO": "alice@example.com", "DB": "app", "PRESET": "readonly"})
    entry = c.identity.static[0]
    assert entry.login == "alice@example.com"
    assert entry.grants == (
        {"backends": {"pg-main": {"pg": {"databases": {"${DB}": {"permissions": ["readonly"]}}}}}},
    )


# --------------------------------------------------------------------------- listeners


@pytest.mark.parametrize(
    ("second", "path", "fragment", "needle", "occurrence"),
    [
        pytest.param(
            LISTENER.replace("127.0.0.1:5432", "127.0.0.1:5433"),
            "listeners[1].name",
            'duplicate listener name "pg-main"',
            'name = "pg-main"',
            2,
            id="duplicate_listener_names_are_rejected",
        ),
        pytest.param(
            LISTENER.replace('"pg-main"', '"pg-two"'),
            "listeners[1].listen",
            "also used by listeners[0]",
            "listen =",
            2,
            id="two_listeners_on_one_address_are_rejected",
        ),
        pytest.param(
            LISTENER.replace('"pg-main"', '"pg_main"').replace(":5432", ":5433", 1),
            "listeners[1].name",
            "same role-name part",
            'name = "pg_main"',
            1,
            id="listener_names_that_sanitize_alike_are_rejected",
        ),
    ],
)
def test_second_listener_that_clashes_with_the_first_is_rejected(
    second: str, path: str, fragment: str, needle: str, occurrence: int
) -> None:
    text = LISTENER + "\n" + second
    found = problems_of(text)
    assert len(found) == 1
    assert format_key_path(found[0].path) == path
    assert fragment in found[0].message
    assert found[0].line == line_no(text, needle, occurrence=occurrence)


def test_tls_require_with_tailscale_tls_or_files_is_accepted() -> None:
    ts = with_listener_key('tls_mode = "require"\nuse_tailscale_tls = true')
    assert load_text(ts).listeners[0].tls_mode == "require"
    files = with_listener_key('tls_mode = "require"\ncert_file = "/c"\nkey_file = "/k"')
    assert load_text(files).listeners[0].cert_file == "/c"


def test_verify_full_without_ca_file_uses_system_cas_and_is_accepted() -> None:
    text = with_listener_key('backend_tls = "verify-full"')
    lst = load_text(text).listeners[0]
    assert (lst.backend_tls, lst.backend_ca_file) == ("verify-full", None)


def test_ipv6_listen_address_is_accepted() -> None:
    text = LISTENER.replace('"127.0.0.1:5432"', '"[::1]:5432"')
    assert load_text(text).listeners[0].listen_address == ("::1", 5432)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("admin", "must not be admin_user"),
        ("", "must not be empty"),
        ("wp_someone", "starts with user_prefix"),
        ("pg_write_server_files", "predefined role"),
        ("PUBLIC", "not a role that can own objects"),
        ("current_user", "not a role that can own objects"),
    ],
)
def test_reassign_to_that_could_run_callers_code_with_privileges_is_refused(
    value: str, fragment: str
) -> None:
    text = with_postgres_key(f'reassign_to = "{value}"')
    p = one_problem(text, "listeners[0].postgres.reassign_to", fragment, needle="reassign_to")
    if value:
        assert "NOLOGIN role with none of SUPERUSER" in p.message


def test_reassign_to_a_plain_role_name_is_left_to_the_catalog_check() -> None:
    text = with_postgres_key('reassign_to = "app_keeper"')
    assert load_text(text).listeners[0].postgres.reassign_to == "app_keeper"


def test_per_listener_allow_raw_sql_overrides_provisioning() -> None:
    text = "[provisioning]\nallow_raw_sql = true\n" + with_postgres_key("allow_raw_sql = false")
    c = load_text(text)
    assert c.provisioning.allow_raw_sql is True
    assert c.allow_raw_sql(c.listeners[0]) is False


# --------------------------------------------------------------------------- identity


def test_static_grants_become_plain_python_values() -> None:
    text = (
        STATIC
        + 'tags = ["tag:dev"]\ngrants = [{ backends = { "pg-main" = { pg = { databases = { "*" = { permissions = ["readonly"] } } } } } }]\n'
        + LISTENER
    )
    entry = load_text(text).identity.static[0]
    assert entry.tags == ("tag:dev",)
    (rule,) = entry.grants
    assert type(rule) is dict
    perms = rule["backends"]["pg-main"]["pg"]["databases"]["*"]["permissions"]
    assert type(perms) is list
    assert perms == ["readonly"]


def test_grants_json_array_is_parsed_into_grants() -> None:
    text = (
        STATIC
        + """grants_json = '[{"backends": {"pg-main": {}}}, {"limits": {"max_conns": 2}}]'\n"""
        + LISTENER
    )
    entry = load_text(text).identity.static[0]
    assert entry.grants == ({"backends": {"pg-main": {}}}, {"limits": {"max_conns": 2}})
    assert entry.grants_json is None


def test_grants_json_object_is_one_rule() -> None:
    text = STATIC + """grants_json = '{"backends": {"pg-main": {}}}'\n""" + LISTENER
    assert load_text(text).identity.static[0].grants == ({"backends": {"pg-main": {}}},)


# --------------------------------------------------------------------------- state and metrics


# --------------------------------------------------------------------------- several problems at once


def test_every_problem_is_reported_in_line_order() -> None:
    text = textwrap.dedent(
        """\
        handshake_timeout = 15
        [provisioning]
        allow_raw_sql = "no"
        [[listeners]]
        name = "a"
        listen = "127.0.0.1:1"
        backend = "h:2"
        [listeners.postgres]
        admin_user = "u"
        admin_pasword = "p"
        """
    )
    found = problems_of(text)
    assert [(p.line, format_key_path(p.path)) for p in found] == [
        (1, "handshake_timeout"),
        (3, "provisioning.allow_raw_sql"),
        (8, "listeners[0].postgres.admin_password"),
        (10, "listeners[0].postgres.admin_pasword"),
    ]


def test_secret_values_never_appear_in_error_messages() -> None:
    text = LISTENER.replace(
        'admin_password = "pw"', 'admin_password = "hunter2-secret"\nadmin_pasword = 1'
    )
    text = text.replace('"127.0.0.1:5432"', '"nope"')
    found = problems_of(text)
    assert found
    assert all("hunter2-secret" not in str(p) for p in found)


# --------------------------------------------------------------------------- the line locator


def test_locator_tracks_array_of_tables_indexes() -> None:
    text = textwrap.dedent(
        """\
        [[listeners]]
        name = "a"
        [listeners.postgres]
        admin_user = "x"
        [[listeners]]
        name = "b"
        [listeners.postgres]
        admin_password = "y"
        """
    )
    loc = KeyLocator(text)
    assert loc.line_of(("listeners", 0, "postgres", "admin_user")) == 4
    assert loc.line_of(("listeners", 1, "name")) == 6
    assert loc.line_of(("listeners", 1, "postgres", "admin_password")) == 8
    assert loc.line_of(("listeners", 1, "postgres", "missing")) == 7
    assert loc.line_of(("listeners", 2)) == 1
    assert loc.line_of(("nothing",)) is None


def test_locator_handles_dotted_and_quoted_keys_and_multiline_values() -> None:
    text = textwrap.dedent(
        '''\
        defaults.limits.max_conns_total = 5
        note = """
        fake = 1
        [not_a_table]
        """
        arr = [
          "x = 1",
          { a = 1 },
        ]
        "quoted key" = 1
        [ state ]
        url = "redis://h" # comment = 2
        '''
    )
    loc = KeyLocator(text)
    assert loc.line_of(("defaults", "limits", "max_conns_total")) == 1
    assert loc.line_of(("fake",)) is None
    assert loc.line_of(("not_a_table",)) is None
    assert loc.line_of(("arr", 1, "a")) == 6
    assert loc.line_of(("quoted key",)) == 10
    assert loc.line_of(("state", "url")) == 12


def test_format_key_path_quotes_unusual_keys() -> None:
    assert (
        format_key_path(("listeners", 1, "postgres", "admin_password"))
        == "listeners[1].postgres.admin_password"
    )
    assert format_key_path(("a", "b c")) == 'a."b c"'


# --------------------------------------------------------------------------- rendering


def test_rendered_config_loads_back_equal_without_masking() -> None:
    text = (
        'handshake_timeout = "20s"\n'
        '[defaults.limits]\nmax_bytes_per_conn = "1500B"\nmax_conn_duration = "1h30m"\n'
        '[state]\nbackend = "redis"\nurl = "redis://:pw@127.0.0.1:6379/0"\n'
        + STATIC
        + 'tags = ["tag:a"]\ngrants_json = \'[{"backends": {"pg-main": {"pg": {"databases": {"*": {"permissions": ["readonly"]}}}}}}]\'\n'
        + LISTENER
    )
    original = load_text(text)
    again = load_config_text(render_config(original, mask_secrets=False), environ={})
    assert again == original


def test_rendered_config_masks_secrets() -> None:
    text = (
        '[state]\nbackend = "redis"\nurl = "redis://user:topsecret@127.0.0.1:6379/0"\n'
        + LISTENER.replace('"pw"', '"hunter2"')
    )
    out = render_config(load_text(text))
    assert "hunter2" not in out
    assert "topsecret" not in out
    assert 'admin_password = "********"' in out
    assert 'url = "redis://user:********@127.0.0.1:6379/0"' in out


def test_rendered_config_writes_units_and_all_defaults() -> None:
    out = render_config(load_text(LISTENER))
    for line in (
        'handshake_timeout = "15s"',
        'interval = "1m"',
        "max_conns_total = 1000",
        'user_ttl = "24h"',
        'lease = "30s"',
        "# reap_interval: not set: min(user_ttl / 4, 1h) = 1h",
    ):
        assert line in out, line


def test_environ_argument_replaces_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WP_TEST_ONLY_VAR", "from-process")
    text = LISTENER.replace('"pw"', '"${WP_TEST_ONLY_VAR}"')
    assert (
        load_text(text, {"WP_TEST_ONLY_VAR": "given"}).listeners[0].postgres.admin_password
        == "given"
    )
    c = load_config_text(textwrap.dedent(text))
    assert c.listeners[0].postgres.admin_password == os.environ["WP_TEST_ONLY_VAR"]


# --------------------------------------------------------------------------- robustness


@given(st.text(max_size=300))
def test_arbitrary_text_gives_config_or_config_error(text: str) -> None:
    try:
        load_config_text(text, environ={})
    except ConfigError as exc:
        assert exc.problems
        assert all(str(p).startswith("<string>") for p in exc.problems)


_SPEC_LINES = (DATA / "spec_example.toml").read_text().splitlines()


@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_SPEC_LINES) - 1),
            st.sampled_from(['"x"', "1", "true", "[]", "{}", '"-1s"', '"${NOPE}"', "[[", "= 3"]),
        ),
        max_size=4,
    )
)
def test_damaged_spec_example_gives_config_or_config_error(edits: list[tuple[int, str]]) -> None:
    lines = list(_SPEC_LINES)
    for index, replacement in edits:
        key, sep, _ = lines[index].partition("=")
        lines[index] = f"{key}= {replacement}" if sep else replacement
    try:
        load_config_text("\n".join(lines), environ={"PG_ADMIN_PASSWORD": "pw"})
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.line is None or 1 <= p.line <= len(lines)
