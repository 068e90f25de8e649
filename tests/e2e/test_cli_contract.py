"""The command line's contract with users and scripts, attacked: arguments out of range, hostile
names in the output, a closed stdout, bad environment variables. Each case is run the way a user
runs it (`python -m veloverlay` in a subprocess) and checked against the real tree or the store's
state, not against the product's own account of it."""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_cli import data, failed, ok, velo
from tests.helpers.trees import make_tree


@pytest.fixture
def store(shm_tmp: str) -> str:
    return os.path.join(shm_tmp, "store")


@pytest.fixture
def src(shm_tmp: str) -> str:
    path = os.path.join(shm_tmp, "proj")
    make_tree(path, {"README": b"hello\n", "lib/a.txt": b"a\n"})
    return path


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_gc_keep_below_one_is_a_usage_error_and_deletes_nothing(
    store: str, src: str, keep: str
) -> None:
    """`gc --keep 0` (or negative) used to delete the head commit of every ref: every ref then
    named a missing commit and fsck failed."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    with open(os.path.join(src, "README"), "wb") as f:
        f.write(b"changed\n")
    ok(velo(store, "ingest", src, "-n", "proj"))
    before = data(velo(store, "log", "proj", "--json"))
    failed(velo(store, "--json", "gc", "--keep", keep, "--grace", "0"), "usage", code=2)
    assert data(velo(store, "log", "proj", "--json")) == before
    assert data(velo(store, "fsck", "--json"))["ok"]
    # --keep 1 still keeps the head (and only it)
    ok(velo(store, "gc", "--keep", "1", "--grace", "0"))
    assert [c["id"] for c in data(velo(store, "log", "proj", "--json"))] == [before[0]["id"]]
    assert data(velo(store, "fsck", "--json"))["ok"]
