"""Waypoint: a PostgreSQL access proxy for Tailscale networks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from waypoint.config.model import Config


async def run(config: Config, **kwargs: Any) -> None:
    """Run the Waypoint daemon for ``config`` until cancelled (library entry point)."""
    from waypoint.app import run as _run

    await _run(config, **kwargs)


__all__ = ["__version__", "run"]
