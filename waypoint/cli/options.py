"""Options several subcommands share, declared once as argparse parent parsers."""

from __future__ import annotations

import argparse
import sys

from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config

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


def load_or_report(path: str, *, refused: str) -> Config | None:
    """The configuration at ``path``; or None after printing every problem and a count line
    ending in ``refused`` (what the command then does not do) to standard error."""
    try:
        return load_config(path)
    except ConfigError as exc:
        count = len(exc.problems)
        print(str(exc), file=sys.stderr)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}, {refused}", file=sys.stderr)
        return None
