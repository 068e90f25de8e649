"""Objects and store files replaced by what is not a regular file (a disk's or a co-user's
damage): every verb that reads them says so with a reason, and none blocks for ever.

Found by putting a FIFO in an object's place in a copy of a real store and running every verb:
checkout, export, fsck and fsck --repair blocked in open(2) until killed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.timing import bound
from tests.helpers.trees import unprotect
from tests.store.test_integrity import FILES, ingested
from veloverlay.store.digest import hash_bytes

__all__ = ["ingested"]  # the fixture, used here by name


def _velo_bounded(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return velo_text(store, "--json", *args, timeout=bound(20))
    except subprocess.TimeoutExpired:
        pytest.fail(f"veloverlay {' '.join(args)} blocked on a FIFO in the store")


def _fifo_in_place_of(store: str, content: bytes) -> str:
    h = hash_bytes(content).hex()
    path = os.path.join(store, "objects-v2", h[:2], h)
    unprotect(path)
    os.unlink(path)
    os.mkfifo(path, 0o444)
    return h


@pytest.mark.parametrize("verb", ["cat", "checkout", "export", "fsck", "fsck-repair"])
def test_a_fifo_in_place_of_an_object_is_corrupt_and_blocks_nothing(
    ingested: str, shm_tmp: str, verb: str
) -> None:
    h = _fifo_in_place_of(ingested, FILES["d/e/c"])
    out = os.path.join(shm_tmp, "out")
    args = {
        "cat": ["cat", "t", "d/e/c"],
        "checkout": ["checkout", "t", out],
        "export": ["export", "t", "-o", out],
        "fsck": ["fsck"],
        "fsck-repair": ["fsck", "--repair"],
    }[verb]
    res = _velo_bounded(ingested, *args)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "reason: object-corrupt" in res.stderr and h in res.stderr, res.stderr
    assert not os.path.lexists(out)
    if verb == "fsck-repair":  # set aside for a later ingest to restore; the rest untouched
        assert not os.path.lexists(os.path.join(ingested, "objects-v2", h[:2], h))
        again = _velo_bounded(ingested, "fsck")
        assert "object-missing" in again.stdout + again.stderr and h in again.stderr
        for data in FILES.values():
            if data != FILES["d/e/c"]:
                d = hash_bytes(data).hex()
                with open(os.path.join(ingested, "objects-v2", d[:2], d), "rb") as f:
                    assert f.read() == data


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        ("manifests.record", ["fsck"], "store-unsafe"),  # (manifest-corrupt, with a hint to
        ("manifests.record", ["gc", "--grace", "0"], "store-unsafe"),  # restore the database)
        ("manifests.record.lock", ["gc", "--grace", "0"], "store-unsafe"),
        ("lock", ["cat", "t", "a.txt"], "store-unsafe"),
        ("lock.gate", ["checkout", "t", "{out}"], "store-unsafe"),
        ("fsverity-v1.json", ["fsck"], None),
        # a raw "[Errno 29] Illegal seek" (os-error) before: data.mdb was opened without a
        # check of its type (and O_RDONLY, a reader's open, blocks on a FIFO)
        ("manifests.lmdb/data.mdb", ["cat", "t", "a.txt"], "manifest-corrupt"),
        ("manifests.lmdb/data.mdb", ["gc", "--grace", "0"], "manifest-corrupt"),
    ],
)
def test_a_fifo_in_place_of_a_store_file_is_named_and_blocks_nothing(
    ingested: str, shm_tmp: str, name: str, args: list[str], reason: str | None
) -> None:
    """Found the same way: fsck and gc blocked on a FIFO record, every reader of the store on a
    FIFO lock or gate, fsck and doctor on a FIFO fs-verity probe cache."""
    before = {d: os.path.getsize(p) for d, p in _objects(ingested).items()}
    path = os.path.join(ingested, name)
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path, 0o644)
    out = os.path.join(shm_tmp, "out")
    res = _velo_bounded(ingested, *[a.replace("{out}", out) for a in args])
    assert "Traceback" not in res.stderr, res.stderr
    if reason is None:  # a cache: probed again, the store is sound
        assert res.returncode == 0, (res.stdout, res.stderr)
    else:
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert f"reason: {reason}" in res.stderr and name in res.stderr, res.stderr
    assert not os.path.lexists(out)
    assert {d: os.path.getsize(p) for d, p in _objects(ingested).items()} == before


def _objects(store: str) -> dict[str, str]:
    top = os.path.join(store, "objects-v2")
    return {n: os.path.join(top, s, n) for s in os.listdir(top) for n in os.listdir(f"{top}/{s}")}


@pytest.mark.parametrize(
    "args", [["sessions"], ["status"], ["harvest", "--all"], ["gc", "--grace", "0"]]
)
def test_a_fifo_as_a_sessions_state_file_blocks_no_verb(ingested: str, args: list[str]) -> None:
    """Found the same way: sessions, status, harvest --all and gc blocked on a FIFO put in
    place of a session's state.json. gc cannot know what that session pins: it refuses."""
    before = {d: os.path.getsize(p) for d, p in _objects(ingested).items()}
    sdir = os.path.join(ingested, "sessions", "20261207-000000-abcdef")
    os.makedirs(sdir)
    os.mkfifo(os.path.join(sdir, "state.json"), 0o644)
    res = _velo_bounded(ingested, *args)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode in (0, 1), (res.stdout, res.stderr)
    if args[0] == "gc":
        assert res.returncode == 1 and "state" in res.stderr, res.stderr
    assert {d: os.path.getsize(p) for d, p in _objects(ingested).items()} == before


def test_the_probe_cache_as_a_fifo_is_probed_again(ingested: str) -> None:
    """The probe's cache (read by every session start) as a FIFO: the old code blocked in
    open(2); now it is probed afresh and the cache written anew."""
    path = os.path.join(ingested, "trees-v1", f"probe-{os.geteuid()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path, 0o644)
    code = (
        "import sys\n"
        "from veloverlay.session.select import capabilities\n"
        "from veloverlay.store.cas import Store\n"
        "print(len(capabilities(Store(sys.argv[1])).features))\n"
    )
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, ingested],
            capture_output=True,
            text=True,
            timeout=bound(30),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the session's probe blocked on a FIFO cache")
    assert res.returncode == 0 and int(res.stdout) > 0, res.stderr
    assert stat.S_ISREG(os.lstat(path).st_mode)  # written anew
