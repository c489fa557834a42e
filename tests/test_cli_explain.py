"""``waypoint explain``: exit codes and what it prints, through the real ``main``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from waypoint.cli.main import main

CONFIG = """
[identity]
provider = "static"
capability = "example.com/cap/waypoint"

[[identity.static]]
cidr = "127.0.0.2/32"
login = "alice@example.com"
node = "alice-laptop"
grants = [{{backends = {{pg-main = {{pg = {{databases = {{app = {{permissions = ["readwrite"], schemas = ["public", "app"]}}}}}}, limits = {{max_conns = 3}}}}}}, limits = {{max_conns = 10}}}}]

[[identity.static]]
cidr = "127.0.0.3/32"
login = "bob@example.com"
node = "bob-pc"
grants_json = '[{{"backends": {{"pg-main": {{"pg": {{"databases": {{"app": {{"permissions": ["admin"], "sql": ["GRANT INSERT ON public.audit_log TO {{{{.Role}}}}"]}}}}}}}}}}}}]'

[defaults.limits]
max_conns_per_user = 5
max_conn_duration = "8h"

[[listeners]]
name = "pg-main"
listen = "127.0.0.1:6432"
backend = "127.0.0.1:5432"

[listeners.postgres]
admin_user = "waypoint_admin"
admin_password = "secret"
{raw_sql}

[[listeners]]
name = "pg-other"
listen = "127.0.0.1:6433"
backend = "127.0.0.1:5433"

[listeners.postgres]
admin_user = "waypoint_admin"
admin_password = "secret"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "waypoint.toml"
    path.write_text(CONFIG.format(raw_sql=""), encoding="utf-8")
    return path


@pytest.fixture
def raw_sql_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "waypoint-raw.toml"
    path.write_text(CONFIG.format(raw_sql="allow_raw_sql = true"), encoding="utf-8")
    return path


def explain(
    capsys: pytest.CaptureFixture[str],
    config: Path,
    *extra: str,
    login: str = "alice@example.com",
    node: str = "alice-laptop",
    db: str = "app",
    listener: str | None = "pg-main",
) -> tuple[int, str, str]:
    argv = ["explain", "-c", str(config), "--login", login, "--node", node, "--db", db]
    if listener is not None:
        argv += ["--listener", listener]
    code = main([*argv, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_json(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_explain_granted_from_static_entry_shows_pairs_limits_role(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file)
    assert code == 0
    assert "result: GRANTED" in out
    assert 'readwrite "app"' in out and 'readwrite "public"' in out
    assert "group wp_grp_readwrite_public_app_" in out
    assert "max_conns for this caller (all listeners): 5" in out  # defaults ceiling beats 10
    assert "max_conns for this caller on this listener: 3" in out
    assert "max_conn_duration: 8h" in out
    assert "max_bytes_per_conn: unlimited" in out
    assert "role: wp_pg_main_alice_example_com_alice_laptop_app\n" in out


def test_explain_preset_cap_lowers_pairs_and_suffixes_role(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file, "--presets", "readonly")
    assert code == 0
    assert "preset cap: readonly" in out
    assert 'readonly  "public"' in out
    assert "readwrite" not in out.split("result:")[1]
    assert "role: wp_pg_main_alice_example_com_alice_laptop_app_preset_readonly" in out


def test_explain_bad_preset_is_refused_22023(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file, "--presets", "select")
    assert code == 1
    assert "REFUSED 22023" in out
    assert 'did you mean "readonly"' in out


def test_explain_database_not_granted_is_refused_42501(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file, db="payroll")
    assert code == 1
    assert 'REFUSED 42501: not authorized for database "payroll"' in out
    assert "role:" not in out


def test_explain_listener_not_granted_is_refused_28000(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file, listener="pg-other")
    assert code == 1
    assert "REFUSED 28000" in out


def test_explain_raw_sql_refused_when_not_allowed_and_shows_what_blocks(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(capsys, config_file, login="bob@example.com", node="bob-pc")
    assert code == 1
    assert "REFUSED 42501" in out and "allow_raw_sql" in out
    assert "GRANT INSERT ON public.audit_log TO {{.Role}}" in out


def test_explain_raw_sql_granted_when_listener_allows_it(
    capsys: pytest.CaptureFixture[str], raw_sql_config_file: Path
) -> None:
    code, out, _ = explain(capsys, raw_sql_config_file, login="bob@example.com", node="bob-pc")
    assert code == 0
    assert "raw SQL grants (allowed on listener 'pg-main')" in out
    assert "group wp_grp_perms_" in out
    assert "    GRANT INSERT ON public.audit_log TO {{.Role}}" in out


def test_explain_preset_cap_drops_raw_sql(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = explain(
        capsys, config_file, "--presets", "readwrite", login="bob@example.com", node="bob-pc"
    )
    assert code == 0
    assert 'readwrite "public"' in out
    assert "GRANT INSERT" not in out


def test_explain_rules_file_array(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    rules = [{"backends": {"pg-other": {"pg": {"databases": {"*": {"permissions": ["admin"]}}}}}}]
    code, out, _ = explain(
        capsys,
        config_file,
        "--rules",
        str(write_json(tmp_path, rules)),
        login="carol@example.com",
        node="c",
        listener="pg-other",
        db="anything",
    )
    assert code == 0
    assert 'admin     "public"' in out
    assert "role: wp_pg_other_carol_example_com_c_anything" in out


def test_explain_rules_file_whois_body_uses_configured_capability(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    rule = {"backends": {"pg-main": {"pg": {"databases": {"app": {"permissions": ["readonly"]}}}}}}
    body = {
        "Node": {"ComputedName": "c"},
        "UserProfile": {"LoginName": "carol@example.com"},
        "CapMap": {"example.com/cap/waypoint": [rule], "other/cap": [{"junk": 1}]},
    }
    code, out, _ = explain(
        capsys,
        config_file,
        "--rules",
        str(write_json(tmp_path, body)),
        login="carol@example.com",
        node="c",
    )
    assert code == 0
    assert "whois CapMap" in out
    assert 'readonly  "public"' in out


def test_explain_malformed_grant_is_refused_with_path(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    rules = [{"backends": {"pg-main": {"pg": {"databases": {"app": {"permissions": [1]}}}}}}]
    code, out, _ = explain(
        capsys, config_file, "--rules", str(write_json(tmp_path, rules)), login="x", node="y"
    )
    assert code == 1
    assert "REFUSED 28000" in out
    assert "rules[0].backends.pg-main.pg.databases.app.permissions[0]: expected a string" in out


def test_explain_prints_unknown_field_warnings(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    rules = [
        {
            "owner": "ops",
            "backends": {"pg-main": {"pg": {"databases": {"app": {"permissions": ["readonly"]}}}}},
        }
    ]
    code, out, _ = explain(
        capsys, config_file, "--rules", str(write_json(tmp_path, rules)), login="x", node="y"
    )
    assert code == 0
    assert 'warning: unknown field "owner"' in out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"login": "nobody@example.com"}, "no [[identity.static]] entry"),
        ({"listener": "pg-missing"}, "no listener named 'pg-missing'"),
        ({"listener": None}, "give --listener"),
    ],
)
def test_explain_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], config_file: Path, kwargs: dict[str, Any], message: str
) -> None:
    code, out, err = explain(capsys, config_file, **kwargs)
    assert code == 2
    assert message in err
    assert out == ""


def test_explain_invalid_rules_file_exits_2(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[{", encoding="utf-8")
    code, _, err = explain(capsys, config_file, "--rules", str(path))
    assert code == 2
    assert "invalid JSON" in err
    code, _, err = explain(capsys, config_file, "--rules", str(tmp_path / "missing.json"))
    assert code == 2
    assert "cannot read" in err


def test_explain_invalid_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[identity]\nprovidr = 'static'\n", encoding="utf-8")
    code, _, err = explain(capsys, path)
    assert code == 2
    assert "invalid configuration" in err
