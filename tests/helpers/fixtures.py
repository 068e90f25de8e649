"""Fixtures shared by every test directory (loaded from tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from veloverlay.repo import Repo


def _shm_dir(prefix: str) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


@pytest.fixture
def shm_tmp() -> Iterator[str]:
    """A temp dir on tmpfs (fast), removed afterwards, immutable flags and all."""
    d = _shm_dir("velo-test-")
    yield d
    _force_rmtree(d)


def _force_rmtree(path: str) -> None:
    def onerror(func, p, exc_info):  # type: ignore[no-untyped-def]
        try:
            from veloverlay import fsflags

            fsflags.set_immutable(p, False)
        except Exception:
            pass
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        func(p)

    shutil.rmtree(path, onerror=onerror)


@pytest.fixture
def repo(shm_tmp: str, request: pytest.FixtureRequest) -> Iterator[Repo]:
    """A fresh store on tmpfs; fsck must pass after the test (unless it corrupts on purpose)."""
    r = Repo.open(os.path.join(shm_tmp, "store"), create=True)
    yield r
    if request.node.get_closest_marker("corrupts_store") is None:
        from veloverlay.verify import fsck

        report = fsck(r.store, r.m, jobs=1)
        assert report.ok, f"fsck after the test: {report.findings[:5]}"
    r.close()
