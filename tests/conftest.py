"""Shared pytest configuration: paths every test suite agrees on, and the loopback guard."""

from __future__ import annotations

from pathlib import Path

from tests.support import loopback_guard

# Fixture modules shared by several test files (registered once, here).
pytest_plugins = ["tests.support.gateway_fixtures", "tests.support.snapshot_fixtures"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SNAPSHOT = REPO / ".thaw" / "snapshots" / "default"


def pytest_configure() -> None:
    loopback_guard.install()
