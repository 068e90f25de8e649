"""A store made or upgraded by a newer veloverlay (a higher manifest schema, a new versioned
directory such as `objects-v3`) is refused by every verb before anything is written into it:
the store's bytes are compared before and after each command, as they are on disk."""

from __future__ import annotations

import hashlib
import os
import subprocess

import lmdb
import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.verbs.repo import Repo

FILES = {"a.txt": b"alpha\n", "d/b.bin": bytes(range(256)) * 16}

# Every verb that opens the store to write into it, and some that only read.
VERBS = [
    ["init"],
    ["refs"],
    ["ingest", "{src}", "--name", "u"],
    ["ingest", "{src}", "--name", "t"],
    ["run", "t", "--", "true"],
    ["gc", "--grace", "0"],
    ["fsck", "--repair"],
    ["tag", "t", "v1"],
    ["checkout", "t", "{out}"],
]


def store_bytes(store: str) -> dict[str, tuple[int, str]]:
    """(mode, sha256 or '') of every path in the store. LMDB's lock.mdb is left out: it is the
    reader table every reader (of any version) updates, not the store's content."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirs, files in os.walk(store):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, store)
            if rel == os.path.join("manifests.lmdb", "lock.mdb"):
                continue
            st = os.lstat(path)
            digest = ""
            if name in files and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[rel] = (st.st_mode, digest)
    return out


def velo(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return velo_text(store, "--json", *args)


@pytest.fixture
def made(shm_tmp: str) -> tuple[str, str]:
    """(store, source): a store with one ref `t`, closed."""
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    return store, src


def _newer_schema(store: str) -> None:
    """What a newer veloverlay's database may look like: schema 2, and a sub-database this
    version makes (statcache) gone or renamed."""
    env = lmdb.open(os.path.join(store, "manifests.lmdb"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"schema", b"2", db=env.open_db(b"meta", txn=txn))
            txn.drop(env.open_db(b"statcache", txn=txn), delete=True)
    finally:
        env.close()


def _assert_every_verb_refuses(store: str, src: str, shm_tmp: str) -> None:
    before = store_bytes(store)
    for args in VERBS:
        args = [a.format(src=src, out=os.path.join(shm_tmp, "out")) for a in args]
        res = velo(store, *args)
        assert res.returncode == 1, (args, res.stderr)
        assert "reason: manifest-schema" in res.stderr, (args, res.stderr)
        assert store_bytes(store) == before, f"{args} wrote into the store"
    assert not os.path.exists(os.path.join(shm_tmp, "out"))


def test_a_newer_manifest_schema_is_refused_before_anything_is_written(
    made: tuple[str, str], shm_tmp: str
) -> None:
    store, src = made
    _newer_schema(store)
    _assert_every_verb_refuses(store, src, shm_tmp)


def test_a_newer_schema_store_without_its_standard_dirs_gets_none_made(
    made: tuple[str, str], shm_tmp: str
) -> None:
    """`init` and `ingest` made sessions/, tmp/ and locks-v1/ again (and `init --shared` opened
    the store directory) in a store whose manifest schema they then refused, saying "nothing
    was changed": a newer version need not keep those directories."""
    store, src = made
    _newer_schema(store)
    for d in ("sessions", "tmp", "locks-v1"):
        os.rmdir(os.path.join(store, d))
    before, mode = store_bytes(store), os.stat(store).st_mode
    for args in (["init"], ["init", "--shared"], ["ingest", src, "--name", "u"]):
        res = velo(store, *args)
        assert res.returncode == 1, (args, res.stderr)
        assert "reason: manifest-schema" in res.stderr, (args, res.stderr)
        assert store_bytes(store) == before, f"{args} wrote into the store"
        assert os.stat(store).st_mode == mode, f"{args} changed the store's mode"


def test_a_newer_objects_layout_is_refused_before_anything_is_written(
    made: tuple[str, str], shm_tmp: str
) -> None:
    """A newer version migrating objects-v2 into an objects-v3 (as gc migrates v1 into v2):
    writing new objects into objects-v2 behind its back is refused, as is a store that holds
    only the new layout (it said "no veloverlay store", and `init` made objects-v2 in it)."""
    store, src = made
    os.mkdir(os.path.join(store, "objects-v3"))
    _assert_every_verb_refuses(store, src, shm_tmp)


def test_a_store_with_only_a_newer_layout_is_not_taken_for_a_new_one(shm_tmp: str) -> None:
    store = os.path.join(shm_tmp, "store")
    for d in ("objects-v3", "trees-v2"):
        os.makedirs(os.path.join(store, d))
    with open(os.path.join(store, "CACHEDIR.TAG"), "wb") as f:
        f.write(b"Signature: 8a477f597d28d172789f06886806bc55\n")
    before = store_bytes(store)
    for args in (["init"], ["refs"]):
        res = velo(store, *args)
        assert res.returncode == 1, res.stderr
        assert "reason: manifest-schema" in res.stderr
        assert "objects-v3, trees-v2" in res.stderr
    assert store_bytes(store) == before


def test_unversioned_strangers_in_the_store_root_are_not_refused(made: tuple[str, str]) -> None:
    """Only the store's own naming scheme (`<name>-v<N>`) marks a format: a filesystem's
    lost+found or a file someone left there does not make the store unusable."""
    store, _src = made
    os.mkdir(os.path.join(store, "lost+found"))
    with open(os.path.join(store, "notes.txt"), "w") as f:
        f.write("x")
    res = velo(store, "refs")
    assert res.returncode == 0, res.stderr
