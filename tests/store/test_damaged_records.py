"""A manifest database whose records were damaged in place (a flipped bit, a rewritten or cut
value): no verb may read it as another tree or die with a traceback, and gc never sweeps an
object that the undamaged records reached. LMDB keeps no checksums, so a bit flipped inside a
value reads back without an error; only the records' own names (a node is named by the hash of
its encoding, a commit by the hash of its record) and their shape tell.

Found by flipping single bits of a real store's data.mdb and running gc: one flip in a hundred
made gc delete objects that the store's refs still named."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import lmdb
import pytest

from tests.helpers.trees import make_tree
from tests.store.test_integrity import stored_objects, velo
from veloverlay.ingest import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

V1 = {"a.txt": b"alpha\n", "d/b.bin": bytes(range(256)) * 64, "d/e/c": b"gamma"}
V2 = {"a.txt": b"alpha, second\n", "new": b"new in v2"}


def every_digest() -> set[str]:
    return {hash_bytes(data).hex() for data in (*V1.values(), *V2.values())}


@pytest.fixture
def store(shm_tmp: str) -> str:
    """Ref `t` with two versions (V1, then V1 changed by V2), V1 tagged `first`."""
    path = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, V1)  # type: ignore[arg-type]
    repo = Repo.open(path, create=True)
    try:
        first = ingest(repo.store, repo.m, src, "t", jobs=1).commit
        with repo.m.write() as txn:
            repo.m.put_tag(txn, "first", first)
        make_tree(src, V2)  # type: ignore[arg-type]
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    assert every_digest() <= stored_objects(path)
    return path


def _db(store: str) -> Any:
    return lmdb.open(os.path.join(store, "manifests.lmdb"), max_dbs=8, map_size=64 << 30)


def _records(store: str) -> dict[str, Any]:
    """The ref `t`, its head commit, the first commit, and the head's root node."""
    env = _db(store)
    try:
        with env.begin() as txn:
            refs, commits = env.open_db(b"refs", txn=txn), env.open_db(b"commits", txn=txn)
            ref = json.loads(txn.get(b"t", db=refs))
            head = json.loads(txn.get(bytes.fromhex(ref["head"]), db=commits))
            first = json.loads(txn.get(bytes.fromhex(head["parent"]), db=commits))
        return {"ref": ref, "head": head, "first": first}
    finally:
        env.close()


def _put(store: str, db: bytes, key: bytes, value: bytes | None) -> None:
    """Write (or delete) one record behind the store's back, keeping its key."""
    env = _db(store)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db, txn=txn)
            if value is None:
                assert txn.delete(key, db=handle)
            else:
                txn.put(key, value, db=handle)
    finally:
        env.close()


def _get(store: str, db: bytes, key: bytes) -> bytes:
    env = _db(store)
    try:
        with env.begin() as txn:
            return bytes(txn.get(key, db=env.open_db(db, txn=txn)))
    finally:
        env.close()


def flip_entry_digest(store: str) -> None:
    """One bit of a file entry's digest in the head's root node: the node names another
    object than `a.txt`'s (which only that node reaches)."""
    root = bytes.fromhex(_records(store)["head"]["root"])
    data = _get(store, b"nodes", root)
    digest = hash_bytes(V2["a.txt"])
    assert data.count(digest) == 1
    _put(store, b"nodes", root, data.replace(digest, digest[:-1] + bytes([digest[-1] ^ 1])))


def drop_head_root(store: str) -> None:
    _put(store, b"nodes", bytes.fromhex(_records(store)["head"]["root"]), None)


def rewrite_head_commit(store: str) -> None:
    """The head commit's record names the first version's root (well-formed, wrong)."""
    rec = _records(store)
    head = dict(rec["head"], root=rec["first"]["root"])
    _put(store, b"commits", bytes.fromhex(rec["ref"]["head"]), json.dumps(head).encode())


def ref_without_head(store: str) -> None:
    ref = _records(store)["ref"]
    del ref["head"]
    _put(store, b"refs", b"t", json.dumps(ref).encode())


def ref_head_not_hex(store: str) -> None:
    ref = _records(store)["ref"]
    ref["head"] = "x" + ref["head"][1:]
    _put(store, b"refs", b"t", json.dumps(ref).encode())


def ingest_root_missing(store: str) -> None:
    ref = _records(store)["ref"]
    ref["ingest_root"] = hash_bytes(b"no such tree").hex()
    _put(store, b"refs", b"t", json.dumps(ref).encode())


def tag_cut(store: str) -> None:
    value = _get(store, b"tags", b"first")
    _put(store, b"tags", b"first", value[: len(value) // 2])


def tag_commit_missing(store: str) -> None:
    tag = json.loads(_get(store, b"tags", b"first"))
    tag["commit"] = hash_bytes(b"no such commit").hex()
    _put(store, b"tags", b"first", json.dumps(tag).encode())


DAMAGE: dict[str, Callable[[str], None]] = {
    "node entry digest flipped": flip_entry_digest,
    "head root node missing": drop_head_root,
    "head commit rewritten": rewrite_head_commit,
    "ref without head": ref_without_head,
    "ref head not hex": ref_head_not_hex,
    "ingest root missing": ingest_root_missing,
    "tag cut short": tag_cut,
    "tag names a missing commit": tag_commit_missing,
}


def _refused(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "reason: manifest-corrupt" in res.stderr and "hint:" in res.stderr, res.stderr


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_gc_never_sweeps_through_a_damaged_record(store: str, damage: str) -> None:
    DAMAGE[damage](store)
    before = stored_objects(store)
    _refused(velo(store, "gc", "--grace", "0"))
    assert stored_objects(store) == before
    assert every_digest() <= before


@pytest.mark.parametrize(
    "damage",
    ["head commit rewritten", "ref without head", "ref head not hex", "tag cut short"],
)
def test_reading_verbs_say_a_damaged_record_is_damaged(store: str, damage: str) -> None:
    DAMAGE[damage](store)
    verbs: list[list[str]] = [["log", "t"], ["ls", "t"], ["refs"]]
    if damage == "tag cut short":
        verbs = [["ls", "first"], ["tag"]]
    for args in verbs:
        _refused(velo(store, *args))


def test_gc_after_gc_keep_still_works_and_a_lost_parent_is_refused(store: str) -> None:
    """`gc --keep 1` deletes the first version on purpose: later gcs (without --keep, or with
    a larger one) must accept that end of the log, while a commit lost without such a gc (the
    same record, deleted behind the store's back) is damage."""
    second = _records(store)["ref"]["head"]
    assert velo(store, "tag", "--delete", "first").returncode == 0
    res = velo(store, "gc", "--keep", "1", "--grace", "0")
    assert res.returncode == 0, res.stderr
    assert hash_bytes(V1["a.txt"]).hex() not in stored_objects(store)  # V1's own object went
    for args in (["gc", "--grace", "0"], ["gc", "--keep", "5", "--grace", "0"]):
        res = velo(store, *args)
        assert res.returncode == 0, res.stderr
    assert every_digest() - {hash_bytes(V1["a.txt"]).hex()} <= stored_objects(store)

    src = os.path.join(os.path.dirname(store), "src")
    make_tree(src, {"a.txt": b"third"})
    assert velo(store, "ingest", src, "--name", "t").returncode == 0
    head = _records(store)["ref"]["head"]
    assert head != second
    _put(store, b"commits", bytes.fromhex(_records(store)["head"]["parent"]), None)
    before = stored_objects(store)
    res = velo(store, "gc", "--grace", "0")
    _refused(res)
    assert "gc --keep" in res.stderr  # the way out for a log an older gc --keep cut
    assert stored_objects(store) == before
    # Told that the older history is not wanted, gc ends the log there, and later runs agree.
    for args in (["gc", "--keep", "1", "--grace", "0"], ["gc", "--grace", "0"]):
        res = velo(store, *args)
        assert res.returncode == 0, res.stderr
    assert hash_bytes(b"third").hex() in stored_objects(store)


def test_fsck_reports_a_tag_whose_commit_is_missing(store: str) -> None:
    tag_commit_missing(store)
    res = velo(store, "fsck")
    assert res.returncode == 1, (res.stdout, res.stderr)
    report, _end = json.JSONDecoder().raw_decode(res.stdout)  # (then the failure's record)
    findings = report["findings"]
    assert {
        "kind": "commit-missing",
        "what": hash_bytes(b"no such commit").hex(),
        "detail": "tag first",
    } in findings, findings


def test_fsck_lists_every_damaged_record_not_only_the_first(store: str) -> None:
    """fsck read refs, commits and tags through the verbs' readers, which stop at the first
    damaged record (manifest-corrupt): a store with three damaged records got one error and no
    report. Each is a finding now, and the other records are still checked."""
    head = _records(store)["ref"]["head"]
    rewrite_head_commit(store)  # the commit no longer hashes to its id
    ref_head_not_hex(store)
    tag_cut(store)
    res = velo(store, "fsck")
    assert res.returncode == 1 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    report, _end = json.JSONDecoder().raw_decode(res.stdout)
    got = {(f["kind"], f["what"]) for f in report["findings"]}
    assert {("commit-corrupt", head), ("ref-corrupt", "t"), ("tag-corrupt", "first")} <= got, got
    assert report["commits"] == 1  # the first version's commit, still read and checked


@pytest.mark.parametrize("pages", [1 << 55, 20_000])
def test_a_header_claiming_a_huge_file_is_damage_and_nothing_grows(store: str, pages: int) -> None:
    """A flipped bit in a meta page's last-page number: the file is not extended to match
    (gigabytes of a disk, or an OverflowError traceback), it is manifest-corrupt. Found by
    flipping bit 7 of byte 142 of data.mdb."""
    import struct

    data = os.path.join(store, "manifests.lmdb", "data.mdb")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        for meta in (0, 4096):  # both meta pages (the newest one counts)
            f.seek(meta + 136)
            last_pg, txnid = struct.unpack("<QQ", f.read(16))
            f.seek(meta + 136)
            f.write(struct.pack("<QQ", last_pg + pages, txnid))
    before = stored_objects(store)
    for args in (["refs"], ["gc", "--grace", "0"], ["log", "t"]):
        _refused(velo(store, *args))
    assert os.path.getsize(data) == size
    assert stored_objects(store) == before
