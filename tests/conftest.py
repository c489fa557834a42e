"""Shared pytest configuration. Fixtures for clusters, the LocalAPI stand-in etc. live in
modules under tests/ and are imported here."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["fixtures_pg"]

settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
