"""``-c/--config`` is one option: every command that reads the configuration takes it, spelled
and defaulted alike (docs/configuration.md), and it is declared in one place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from waypoint.cli.main import build_parser
from waypoint.cli.options import DEFAULT_CONFIG

CLI = Path(__file__).resolve().parent.parent / "waypoint" / "cli"

#: Each command that reads the configuration, with what else it requires.
COMMANDS = [
    ["run"],
    ["reload"],
    ["check"],
    ["explain", "--login", "a@example.com", "--node", "n", "--db", "d"],
    ["roles", "list"],
    ["roles", "reap"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_every_config_command_defaults_to_waypoint_toml(argv: list[str]) -> None:
    assert DEFAULT_CONFIG == "waypoint.toml"
    assert build_parser().parse_args(argv).config == "waypoint.toml"


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_every_config_command_takes_c_and_config(argv: list[str], flag: str) -> None:
    assert build_parser().parse_args([*argv, flag, "/etc/wp.toml"]).config == "/etc/wp.toml"


def test_the_demo_takes_no_config_file() -> None:
    assert not hasattr(build_parser().parse_args(["demo"]), "config")


def test_the_option_is_declared_once() -> None:
    declared = {
        path.name
        for path in CLI.glob("*.py")
        if re.search(r"""["']--config["']""", path.read_text(encoding="utf-8"))
    }
    assert declared == {"options.py"}
