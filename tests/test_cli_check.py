"""``waypoint check -c FILE``: the effective configuration with secrets masked, or every problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from waypoint.cli.main import main
from waypoint.config import load_config_text

DATA = Path(__file__).parent / "data"
WAYPOINT = Path(sys.executable).parent / "waypoint"


def test_check_prints_effective_config_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_ADMIN_PASSWORD", "hunter2-very-secret")
    path = tmp_path / "waypoint.toml"
    path.write_text(
        (DATA / "spec_example.toml")
        .read_text()
        .replace(
            'backend = "memory"', 'backend = "redis"\nurl = "redis://:redispw@127.0.0.1:6379/0"'
        )
    )
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "hunter2-very-secret" not in out
    assert "redispw" not in out
    assert 'admin_password = "********"' in out
    assert 'url = "redis://:********@127.0.0.1:6379/0"' in out
    # every key, defaults included, durations and sizes written back in units
    for line in (
        'handshake_timeout = "15s"',
        'drain_timeout = "30s"',
        'interval = "1m"',
        'max_conn_duration = "8h"',
        'max_bytes_per_conn = "10GB"',
        'user_ttl = "24h"',
        'admin_database = "postgres"',
        'password_encryption = "auto"',
        'key_prefix = "waypoint:"',
        'lease = "30s"',
        "reap_on_cockroachdb = false",
    ):
        assert line in out, line
    # the output is itself a valid configuration (secrets masked, so the mask is the value)
    again = load_config_text(out, environ={})
    assert again.listeners[0].postgres.admin_password == "********"
    assert again.defaults.limits.max_bytes_per_conn == 10_000_000_000


def test_check_reports_problems_on_stderr_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[provisioning]\nallow_raw_sql = "false"\n'
        '[[listeners]]\nname = "a"\nlisten = "127.0.0.1:1"\nbackend = "h:2"\n'
        '[listeners.postgres]\nadmin_user = "u"\nadmin_password = "secretpw"\nuser_prefx = "x"\n'
    )
    assert main(["check", "-c", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == (
        f"{path}:2: provisioning.allow_raw_sql: expected a boolean (true or false, unquoted),"
        ' got string "false"'
    )
    assert lines[1] == (
        f'{path}:10: listeners[0].postgres.user_prefx: unknown key (did you mean "user_prefix"?)'
    )
    assert lines[2] == f"{path}: 2 problems, configuration not valid"
    assert "secretpw" not in err


def test_check_defaults_to_waypoint_toml_in_current_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("waypoint.toml: cannot read the file")


def test_check_runs_as_a_subprocess(tmp_path: Path) -> None:
    assert WAYPOINT.exists(), f"{WAYPOINT} missing: install the project into the venv"
    env = {**os.environ, "PG_ADMIN_PASSWORD": "subprocess-secret"}
    ok = subprocess.run(
        [str(WAYPOINT), "check", "-c", str(DATA / "spec_example.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert 'admin_password = "********"' in ok.stdout
    assert "subprocess-secret" not in ok.stdout + ok.stderr

    env.pop("PG_ADMIN_PASSWORD")
    bad = subprocess.run(
        [str(WAYPOINT), "check", "--config", str(DATA / "spec_example.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stdout == ""
    line = next(iter(bad.stderr.splitlines()))
    expected_line = next(
        i
        for i, text in enumerate((DATA / "spec_example.toml").read_text().splitlines(), start=1)
        if text.startswith("admin_password")
    )
    assert line == (
        f"{DATA / 'spec_example.toml'}:{expected_line}: listeners[0].postgres.admin_password:"
        " environment variable PG_ADMIN_PASSWORD is not set"
    )


def test_check_masks_every_value_expanded_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin password put in ``admin_user`` by mistake (or any secret in any field) is
    masked because it came from ``${VAR}``, not because of the key it sits in."""
    monkeypatch.setenv("PG_ADMIN_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("MISPLACED_SECRET", "s3cr3t-in-the-wrong-key")
    monkeypatch.setenv("NODE_SECRET", "node-n0de-secret")
    monkeypatch.setenv("TAG_SECRET", "tag-t4g-secret")
    monkeypatch.setenv("GRANT_DB", "grant-db-secret")
    text = (
        (DATA / "spec_example.toml")
        .read_text()
        .replace('admin_user = "waypoint_admin"', 'admin_user = "${MISPLACED_SECRET}"')
        .replace('provider = "tailscale"', 'provider = "static"')
    )
    text += (
        "\n[[identity.static]]\n"
        'cidr = "127.0.0.1/32"\nlogin = "alice@example.com"\nnode = "pre-${NODE_SECRET}"\n'
        'tags = ["tag:plain", "${TAG_SECRET}"]\n'
        "\n[[identity.static]]\n"
        'cidr = "127.0.0.2/32"\nlogin = "bob@example.com"\nnode = "literal-$${NOT_EXPANDED}"\n'
        """grants_json = '[{"dbs": {"${GRANT_DB}": {"permissions": ["readonly"]}}}]'\n"""
    )
    path = tmp_path / "waypoint.toml"
    path.write_text(text)
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for secret in ("hunter2", "s3cr3t", "n0de", "t4g", "grant-db"):
        assert secret not in out, secret
    assert 'admin_user = "********"' in out
    assert 'node = "********"' in out
    assert 'tags = ["tag:plain", "********"]' in out
    assert 'grants = ["********"]' in out  # made from a grants_json that expanded a variable
    # the reassign_to note names no other key's value (it once quoted admin_user)
    assert "reassign_to: not set: a reaped role that owns objects is retired" in out
    # what did not come from the environment is shown as it is
    assert 'node = "literal-${NOT_EXPANDED}"' in out
    assert 'login = "alice@example.com"' in out
    assert 'admin_database = "postgres"' in out
