"""Fixtures shared by the service tests."""

from __future__ import annotations

import pytest
from postgres import postgres_server


@pytest.fixture(scope="module")
def postgres_url():
    """The URL of an empty database on a throwaway PostgreSQL server, one per test module
    (the test skips, saying how to install it, where PostgreSQL is missing)."""
    with postgres_server() as url:
        yield url
