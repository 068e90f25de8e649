"""Fixtures for the shim tests: the shim library, built the way the package builds it.

`veloverlay.shim.library_path()` is what sessions use (the extension that `pip install` builds).
If this checkout has not been installed yet, the library is built with shim/Makefile into a
world-readable temp dir and named by VELO_SHIM_LIBRARY for the whole run (root-free tests load it
as another uid). The try-syscall helper is always built that way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from veloverlay.errors import VeloError
from veloverlay.session.shim import library as shim


@pytest.fixture(scope="session")
def shim_build() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="velo-shimbuild-", dir="/dev/shm")
    os.chmod(d, 0o755)
    built = shim.build(d)
    os.chmod(built, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def shim_library(shim_build: Path) -> Iterator[Path]:
    old = os.environ.get(shim.LIBRARY_ENV)
    try:
        lib = shim.library_path()
    except VeloError:
        lib = shim_build / "libveloshim.so"
        os.environ[shim.LIBRARY_ENV] = os.fspath(lib)
    yield lib
    if old is None:
        os.environ.pop(shim.LIBRARY_ENV, None)
    else:
        os.environ[shim.LIBRARY_ENV] = old


@pytest.fixture(scope="session")
def try_syscall(shim_build: Path) -> Path:
    return shim_build / "try_syscall"
