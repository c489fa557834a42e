"""Reload without a backend: what a reload plans (added, removed, changed, kept until a
restart), a reload that cannot bind changes nothing, settings that need a restart are named
in the log line and kept, and the log level switches at once."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from e2e_support import run_waypoint
from log_support import configured_log
from state_support import free_port

from waypoint.config.load import load_config, load_config_text
from waypoint.identity.model import IdentityError
from waypoint.service.reload import plan_reload

# Nothing listens there: these tests never reach a backend.
BACKEND = free_port()


def _text(*listeners: tuple[str, str], extra: str = "", root: str = "") -> str:
    tables = "".join(
        f"""
[[listeners]]
name = "{name}"
listen = "{listen}"
backend = "127.0.0.1:{BACKEND}"
tls_mode = "off"

[listeners.postgres]
admin_user = "waypoint_admin"
admin_password = "unused-here"
"""
        for name, listen in listeners
    )
    return f"""{root}
[identity]
provider = "static"

[[identity.static]]
cidr = "127.0.0.9/32"
login = "nobody@example.com"
node = "nowhere"
{extra}
{tables}"""


def test_plan_names_added_removed_changed_rebind_and_kept() -> None:
    old = load_config_text(_text(("a", "127.0.0.1:7001"), ("b", "127.0.0.1:7002")))
    new_text = _text(
        ("a", "127.0.0.1:7011"),
        ("c", "127.0.0.1:7003"),
        extra='[state]\nkey_prefix = "other:"\n\n[admission]\ncancel_burst = 5\n\n[log]\nlevel = "debug"\n',
        root='drain_timeout = "9s"',
    )
    plan = plan_reload(old, load_config_text(new_text))
    assert plan.added == ("c",) and plan.removed == ("b",)
    assert plan.changed == ("a",) and plan.rebind == ("a",)
    assert set(plan.kept) == {"state.key_prefix", "admission.cancel_burst"}
    assert set(plan.settings) == {"drain_timeout", "log.level"}
    # What runs keeps the old values of what needs a restart, and takes the rest.
    assert plan.config.state == old.state and plan.config.admission == old.admission
    assert plan.config.drain_timeout == 9.0 and plan.config.log.level == "debug"
    same = plan_reload(old, old)
    assert (same.added, same.removed, same.changed, same.kept, same.settings) == ((),) * 5


async def test_a_reload_that_cannot_bind_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(_text(("a", "127.0.0.1:0")))
    with socket.socket() as taken, configured_log() as logs:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        async with run_waypoint(load_config(path)) as running:
            before = dict(running.addresses)
            ctx = running.contexts["a"]
            # Two new listeners: one could bind, the other's port is taken.
            path.write_text(
                _text(("a", "127.0.0.1:0"), ("b", f"127.0.0.1:{free_port()}"), ("c", busy), root='drain_timeout = "7s"')
            )
            assert await running.reload() == "failed"
            assert running.addresses == before and set(running.contexts) == {"a"}
            assert running.contexts["a"] is ctx and running.config.drain_timeout != 7.0
            assert running.metrics.registry.get_sample_value(
                "waypoint_config_reloads_total", {"outcome": "failed"}
            ) == 1
            # The port the staged listener "b" had bound is free again.
            port_b = int(load_config(path).listener("b").listen_address[1])
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port_b))
        text = logs.getvalue()
    failed = [line for line in text.splitlines() if "config_reload_failed" in line]
    assert len(failed) == 1 and "Address already in use" in failed[0], text


async def test_restart_only_settings_are_named_and_kept_and_the_level_switches(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    metrics = free_port()
    path.write_text(_text(("a", "127.0.0.1:0"), extra=f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'))
    with configured_log() as logs:
        async with run_waypoint(load_config(path)) as running:
            path.write_text(
                _text(
                    ("a", "127.0.0.1:0"),
                    extra=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n\n[state]\nlease = "45s"\n'
                    '\n[log]\nlevel = "warning"\n',
                )
            )
            assert await running.reload() == "applied"
            assert running.metrics_address == ("127.0.0.1", metrics)
            assert running.config.metrics.listen == f"127.0.0.1:{metrics}"
            assert running.config.state.lease == 30.0
            assert running.config.log.level == "warning"
            # An info line after the switch is not written; a warning is.
            await trio.to_thread.run_sync(
                lambda: socket.create_connection(running.address("a"), timeout=5).close()
            )
            with trio.fail_after(10):
                while running.metrics.registry.get_sample_value(
                    "waypoint_sessions_ended_total", {"listener": "a", "outcome": "closed"}
                ) is None:
                    await trio.sleep(0.05)
        text = logs.getvalue()
    reloaded = [line for line in text.splitlines() if "config_reloaded" in line]
    assert len(reloaded) == 0  # an info line, written after the level went to warning
    assert "connection_end" not in text
    assert "listening" in text  # info lines before the reload were written


async def test_the_reload_line_names_kept_settings(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(_text(("a", "127.0.0.1:0")))
    with configured_log() as logs:
        async with run_waypoint(load_config(path)) as running:
            path.write_text(
                _text(("a", "127.0.0.1:0"), extra='[admission]\nmax_handshakes_per_address = 3\n\n[state]\nlease = "45s"\n')
            )
            assert await running.reload() == "applied"
            assert running.config.admission.max_handshakes_per_address == 128
        text = logs.getvalue()
    line = next(line for line in text.splitlines() if "config_reloaded" in line)
    assert "changed=[]" in line and "settings=[]" in line, line
    assert "kept_until_restart=\"['state.lease', 'admission.max_handshakes_per_address']\"" in line, line


async def test_the_static_identity_table_changes_live(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(_text(("a", "127.0.0.1:0")))
    added = '[[identity.static]]\ncidr = "127.0.0.10/32"\nlogin = "new@example.com"\nnode = "new-node"\n'
    async with run_waypoint(load_config(path)) as running:
        with pytest.raises(IdentityError):
            await running.contexts["a"].identity.whois("127.0.0.10", 1)
        path.write_text(_text(("a", "127.0.0.1:0"), extra=added + '\n[identity]\ntimeout = "9s"\n'))
        # A second [identity] table is a TOML error: nothing changes.
        assert await running.reload() == "invalid"
        path.write_text(_text(("a", "127.0.0.1:0"), extra=added))
        assert await running.reload() == "applied"
        found = await running.contexts["a"].identity.whois("127.0.0.10", 1)
        assert (found.login, found.node) == ("new@example.com", "new-node")
        assert len(running.config.identity.static) == 2


async def test_a_certificate_file_that_does_not_load_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(_text(("a", "127.0.0.1:0")))
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    key.chmod(0o600)
    async with run_waypoint(load_config(path)) as running:
        ctx = running.contexts["a"]
        tls = f'cert_file = "{cert}"\nkey_file = "{key}"\n[listeners.postgres]'
        path.write_text(
            _text(("a", "127.0.0.1:0")).replace('tls_mode = "off"', 'tls_mode = "require"').replace(
                "[listeners.postgres]", tls
            )
        )
        outcome = await running.reload()
        assert outcome == "failed", outcome
        assert running.contexts["a"] is ctx and ctx.listener.tls_mode == "off"
        assert running.config.listener("a").tls_mode == "off"
