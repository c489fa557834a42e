"""``waypoint check -c FILE``: validate a configuration and print the effective one.

Exit 0 and the effective configuration as TOML on stdout (every key, defaults
included, secrets masked); exit 1 and every problem on stderr, one per line,
as ``FILE:LINE: key.path: message``. Every value that came from a ``${VAR}``
expansion is masked, whatever its key: the environment may hold a secret put in
the wrong field by mistake.
"""

from __future__ import annotations

import argparse
import os
import sys

import tomlkit

from waypoint.cli.options import load_or_report
from waypoint.config.env import expanded_paths
from waypoint.config.keys import KeyPath
from waypoint.config.render import render_config

TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing beyond ``-c/--config`` (``TAKES_CONFIG``)."""


def run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, refused="configuration not valid")
    if config is None:
        return 1
    sys.stdout.write(render_config(config, mask_secrets=True, expanded=_expanded(args.config)))
    return 0


def _expanded(path: str) -> set[KeyPath]:
    """Where the file (already loaded and valid) expands a ``${VAR}``."""
    with open(path, encoding="utf-8") as f:
        plain = tomlkit.parse(f.read()).unwrap()
    return expanded_paths(plain, os.environ)
