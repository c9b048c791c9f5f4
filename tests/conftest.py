"""Shared pytest configuration: paths every test suite agrees on."""

from __future__ import annotations

from pathlib import Path

import pytest

# Fixture modules shared by several test files (registered once, here).
pytest_plugins = ["tests.gateway_fixtures", "tests.snapshot_fixtures"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SNAPSHOT = REPO / ".thaw" / "snapshots" / "default"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
