"""The demo's Waypoint configuration and the walkthrough it prints.

Each walkthrough step says what it shows, the expected outcome in brackets (``[works]`` or
``[fails: <the error psql prints>]``) and the command on a line starting with ``$``;
``tests/test_demo.py`` runs the printed commands and holds the demo to what it printed.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys
from pathlib import Path

from attrs import frozen

LISTENER = "pg-main"
LOGIN = "demo@example.com"
NODE = "laptop"


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; "${" would be expanded by the
    # config loader, "$${" is its literal form.
    return json.dumps(value).replace("${", "$${")


def demo_grants() -> list[dict[str, object]]:
    """The demo identity's capability grant: readwrite on ``demo``, readonly on ``reports``."""
    return [
        {
            "backends": {
                LISTENER: {
                    "pg": {
                        "databases": {
                            "demo": {"permissions": ["readwrite"]},
                            "reports": {"permissions": ["readonly"]},
                        }
                    }
                }
            }
        }
    ]


def demo_config_text(
    *,
    listen_port: int,
    backend: tuple[str, int],
    admin_user: str,
    admin_password: str,
    metrics: bool = True,
) -> str:
    """A complete ``waypoint.toml`` for the demo (static identity provider)."""
    grants = _toml_string(json.dumps(demo_grants()))
    identities = "".join(
        f"""
[[identity.static]]
cidr = "{cidr}"
login = "{LOGIN}"
node = "{NODE}"
grants_json = {grants}
"""
        for cidr in ("127.0.0.1/32", "::1/128")
    )
    metrics_table = '[metrics]\nlisten = "127.0.0.1:0"\n' if metrics else ""
    return f"""# Written by `waypoint demo`; removed when the demo stops.
handshake_timeout = "15s"
drain_timeout = "2s"

[identity]
provider = "static"
{identities}
[revalidation]
interval = "1m"

{metrics_table}
[[listeners]]
name = "{LISTENER}"
listen = "127.0.0.1:{listen_port}"
backend = "{backend[0]}:{backend[1]}"
tls_mode = "off"
backend_tls = "disable"

[listeners.postgres]
admin_user = {_toml_string(admin_user)}
admin_password = {_toml_string(admin_password)}
user_ttl = "1h"
"""


@frozen
class Step:
    """One thing to try: what it shows, the expected outcome, and the shell command."""

    title: str
    expect: str  # "works" or "fails: <message>"
    command: str


def psql_program(bindir: Path) -> str:
    """``psql`` when it is on PATH, else the server build's own."""
    if shutil.which("psql"):
        return "psql"
    return shlex.quote(str(bindir / "psql"))


def waypoint_program() -> str:
    if shutil.which("waypoint"):
        return "waypoint"
    return f"{shlex.quote(sys.executable)} -m waypoint.cli.main"


def roles_command_available() -> bool:
    """Whether this installation has ``waypoint roles`` (the walkthrough lists it only then)."""
    return importlib.util.find_spec("waypoint.cli.roles") is not None


def steps(*, psql: str, host: str, port: int, config_path: Path) -> list[Step]:
    def conn(db: str, extra: str = "") -> str:
        return f'"host={host} port={port} dbname={db} user=demo{extra}"'

    cap = " options='-c waypoint.presets=readonly'"
    out = [
        Step(
            "Read the sample data (your grant: readwrite on demo)",
            "works",
            f'{psql} {conn("demo")} -c "SELECT c.name, o.item FROM customers c '
            f'JOIN orders o ON o.customer_id = c.id ORDER BY o.id"',
        ),
        Step(
            "Write to demo, where you have readwrite",
            "works",
            f"{psql} {conn('demo')} -c \"INSERT INTO orders (customer_id, item) "
            f"VALUES (1, 'coffee')\"",
        ),
        Step(
            "Write to reports, where you have readonly",
            "fails: permission denied for table monthly_revenue",
            f"{psql} {conn('reports')} -c \"INSERT INTO monthly_revenue "
            f"VALUES ('2026-04-01', 1.00)\"",
        ),
        Step(
            "Cap yourself to readonly with a preset (a separate, weaker role)",
            "fails: permission denied for table orders",
            f"{psql} {conn('demo', cap)} -c \"INSERT INTO orders (customer_id, item) "
            f"VALUES (2, 'tea')\"",
        ),
        Step(
            "See who you are on the backend: a short-lived role Waypoint made for you",
            "works",
            f'{psql} {conn("demo")} -c "SELECT current_user"',
        ),
    ]
    if roles_command_available():
        out.append(
            Step(
                "List the roles Waypoint created",
                "works",
                f"{waypoint_program()} roles list -c {shlex.quote(str(config_path))}",
            )
        )
    return out


def render(
    *,
    steps: list[Step],
    address: tuple[str, int],
    metrics_address: tuple[str, int] | None,
    server: str,
    data_dir: Path,
    config_path: Path,
) -> str:
    lines = [
        "",
        "Waypoint demo is running.",
        f"  PostgreSQL:  {server}",
        f"  Data dir:    {data_dir}",
        f"  Config:      {config_path}",
        f"  Listening:   {address[0]}:{address[1]} (listener {LISTENER!r}, static identity "
        f"{LOGIN} on node {NODE} for connections from 127.0.0.1)",
    ]
    if metrics_address is not None:
        lines.append(f"  Metrics:     http://{metrics_address[0]}:{metrics_address[1]}/metrics")
    lines += ["", "Try these (no password: Waypoint knows who you are):", ""]
    for i, step in enumerate(steps, 1):
        lines.append(f"  {i}. {step.title} [{step.expect}]")
        lines.append(f"     $ {step.command}")
        lines.append("")
    lines.append("Press Ctrl-C to stop Waypoint and PostgreSQL and remove the data dir.")
    lines.append("")
    return "\n".join(lines)
