"""Options several subcommands share, declared once as argparse parent parsers."""

from __future__ import annotations

import argparse

#: The configuration file every command reads when ``-c`` is not given.
DEFAULT_CONFIG = "waypoint.toml"


def config_parent() -> argparse.ArgumentParser:
    """``-c/--config FILE``, default :data:`DEFAULT_CONFIG`: pass as ``parents=[...]``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    return parent
