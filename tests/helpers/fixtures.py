"""Fixtures shared by every test directory (loaded from tests/conftest.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers.trees import force_rmtree
from veloverlay.verbs.repo import Repo


def _shm_dir(prefix: str) -> str:
    # VELO_INTERNAL__TEST_SCRATCH moves the stores elsewhere (the matrix's fs-verity box)
    base = os.environ.get("VELO_INTERNAL__TEST_SCRATCH") or (
        "/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    return tempfile.mkdtemp(prefix=prefix, dir=base)


@pytest.fixture
def shm_tmp() -> Iterator[str]:
    """A temp dir on tmpfs (fast), removed afterwards, immutable flags and all."""
    d = _shm_dir("velo-test-")
    yield d
    force_rmtree(d)


@pytest.fixture
def repo(shm_tmp: str, request: pytest.FixtureRequest) -> Iterator[Repo]:
    """A fresh store on tmpfs; fsck must pass after the test (unless it corrupts on purpose)."""
    r = Repo.open(os.path.join(shm_tmp, "store"), create=True)
    yield r
    if request.node.get_closest_marker("corrupts_store") is None:
        from veloverlay.verbs.fsck import fsck

        report = fsck(r.store, r.m, jobs=1)
        assert report.ok, f"fsck after the test: {report.findings[:5]}"
    r.close()
