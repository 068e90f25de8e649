"""Fixtures of the command-line tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def store(shm_tmp: str) -> str:
    """Where a test's store goes (made by its first command: `ingest` or `init`)."""
    return os.path.join(shm_tmp, "store")
