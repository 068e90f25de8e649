""".velo bundles: export/import round trip, and malformed or malicious bundles.

Every bad bundle must fail with BUNDLE_INVALID and leave the target store exactly as it was
(refs, commits, nodes, objects, tmp/) with nothing written outside it. Hand-built bundles carry a
correct node digest and trailer checksum, so that the check under test is the one that rejects.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.trees import assert_same_tree, make_tree, snapshot
from tests.store.test_tree import _raw_node
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.paths import DEPTH_MAX
from veloverlay.store import bundle, tree
from veloverlay.store.bundle import MAGIC, export_bundle, import_bundle
from veloverlay.store.digest import hash_bytes, node_digest
from veloverlay.store.tree import Entry, Kind
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

META, NODE, OBJECT, END = 1, 2, 3, 0


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def dst(shm_tmp: str) -> Iterator[Repo]:
    """A second, empty store to import into; fsck must pass at the end."""
    r = Repo.open(os.path.join(shm_tmp, "dst"), create=True)
    yield r
    report = fsck(r.store, r.m, jobs=1)
    assert report.ok, report.findings
    r.close()


@pytest.fixture
def exported(repo: Repo, shm_tmp: str) -> tuple[bytes, str, str]:
    """(bundle bytes, root hex, source dir) of a small tree with odd names."""
    src = os.path.join(shm_tmp, "src")
    make_tree(
        src,
        {
            "a.txt": b"alpha",
            "d/b.bin": os.urandom(70_000),
            "d/e/c": b"",
            "empty": None,
            "same1": b"dup",
            "same2": b"dup",
            "abs": ("link", "/etc/passwd"),
            "up": ("link", "../../x"),
        },
    )
    os.mkdir(os.fsencode(src) + b"/odd \xff\n-x")
    res = ingest(repo.store, repo.m, src, "tree", jobs=1)
    buf = io.BytesIO()
    export_bundle(repo.store, repo.m, "tree", buf)
    return buf.getvalue(), res.root, src


def state(r: Repo) -> tuple[Any, ...]:
    """What an import may change: refs, commits, nodes, objects, staging."""
    with r.m.read() as txn:
        nodes = dict(r.m.iter_nodes(txn))
        refs = {x.name: x.to_json() for x in r.m.refs(txn)}
        commits = {c.id for c in r.m.iter_commits(txn)}
    objects = {n: p.read_bytes() for n, p in r.store.iter_objects()}
    return refs, commits, nodes, objects, sorted(os.listdir(r.store.tmp))


def outside(r: Repo) -> dict[bytes, object]:
    """Everything next to the store (the import may write nothing there)."""
    parent = os.path.dirname(os.fspath(r.store.root))
    return {
        p: i
        for p, i in snapshot(parent, dir_mtimes=False).items()
        if not p.startswith(os.path.basename(os.fspath(r.store.root)).encode())
    }


def do_import(r: Repo, data: bytes, **kw: Any) -> dict[str, Any]:
    return import_bundle(r.store, r.m, io.BytesIO(data), **kw)


def assert_invalid(r: Repo, data: bytes, **kw: Any) -> None:
    before, around = state(r), outside(r)
    with pytest.raises(VeloError) as ei:
        do_import(r, data, **kw)
    assert ei.value.reason is Reason.BUNDLE_INVALID, ei.value.message
    assert state(r) == before
    assert outside(r) == around


def build(records: list[tuple[int, bytes]], *, version: int = 1, magic: bytes = MAGIC) -> bytes:
    """A bundle from raw records, with a correct trailer checksum."""
    body = magic + struct.pack("<I", version)
    body += b"".join(struct.pack("<BQ", t, len(p)) + p for t, p in records)
    return body + struct.pack("<BQ", END, 32) + hash_bytes(body)


def meta(root: bytes | str, /, **over: Any) -> tuple[int, bytes]:
    d: dict[str, Any] = {
        "ref": "hand",
        "root": root if isinstance(root, str) else root.hex(),
        "path": None,
        "tiers": None,
        "message": "m",
    }
    d.update(over)
    return META, json.dumps(d).encode()


def node(encoding: bytes) -> tuple[bytes, tuple[int, bytes]]:
    d = node_digest(encoding)
    return d, (NODE, d + encoding)


def obj(content: bytes) -> tuple[int, bytes]:
    return OBJECT, hash_bytes(content) + content


def file_entry(name: bytes, content: bytes) -> Entry:
    return Entry(name, Kind.FILE, 0o644, len(content), 1, hash_bytes(content), b"", 2)


# -- round trip --------------------------------------------------------------------------------


def test_export_import_round_trip(
    repo: Repo, dst: Repo, exported: tuple[bytes, str, str], shm_tmp: str
) -> None:
    data, root, src = exported
    info = do_import(dst, data)
    assert (info["ref"], info["root"]) == ("tree", root)
    assert dst.resolve_root("tree").hex() == root
    assert fsck(dst.store, dst.m, jobs=1).ok
    out = os.path.join(shm_tmp, "out")
    dst.checkout("tree", out)
    assert_same_tree(src, out)
    assert dst.log("tree")[0].message.startswith("import:")
    # The bundle's ingest path is reported, not trusted as the ref's projection point.
    assert info["bundle_path"] == os.path.realpath(src)
    with dst.m.read() as txn:
        assert dst.m.require_ref(txn, "tree").path is None
    # Again: the ref exists. Refused, and the store is left as it was.
    before = state(dst)
    with pytest.raises(VeloError) as ei:
        do_import(dst, data)
    assert ei.value.reason is Reason.EXISTS
    assert state(dst) == before
    # ... unless named differently, or forced (a new version of the ref).
    assert do_import(dst, data, name="copy")["root"] == root
    do_import(dst, data, force=True)
    assert len(dst.log("tree")) == 2
    # Importing into the store it came from needs no new objects.
    n = len(list(repo.store.iter_objects()))
    do_import(repo, data, name="again")
    assert len(list(repo.store.iter_objects())) == n


def test_an_existing_ref_is_refused_before_the_objects_are_read(dst: Repo) -> None:
    """Import into a ref that exists (without --force) stops at the metadata record. Old code:
    every object was read and staged first (a bundle of many gigabytes, or a full disk, and
    then `store-full` instead of `exists`). The same bundle under a new name or --force reads
    to its end."""
    big = os.urandom(4 << 20)
    _d, top = tree.encode(0o755, 1, [file_entry(b"big", big)])
    rd, rrec = node(top)
    data = build([meta(rd), rrec, obj(big)])
    do_import(dst, data)  # "hand" now exists
    before = state(dst)
    f = io.BytesIO(data)
    with pytest.raises(VeloError) as ei:
        import_bundle(dst.store, dst.m, f)
    assert ei.value.reason is Reason.EXISTS
    assert f.tell() < len(data) - len(big)  # stopped before the object's bytes
    assert state(dst) == before
    assert do_import(dst, data, name="other")["root"] == rd.hex()
    assert do_import(dst, data, force=True)["root"] == rd.hex()


def test_export_of_an_older_version(repo: Repo, dst: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "v")
    make_tree(src, {"f": b"one"})
    first = ingest(repo.store, repo.m, src, "v", jobs=1)
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"two")
    ingest(repo.store, repo.m, src, "v", jobs=1)
    buf = io.BytesIO()
    info = export_bundle(repo.store, repo.m, "v@{1}", buf)
    assert info["root"] == first.root
    assert do_import(dst, buf.getvalue())["root"] == first.root


def test_import_streams_large_objects(repo: Repo, dst: Repo, shm_tmp: str) -> None:
    """A 48 MiB object is staged a chunk at a time: import's Python allocations peak far below
    the object's size (they held it whole, twice, before)."""
    import tracemalloc

    src = os.path.join(shm_tmp, "big")
    size = 48 << 20
    make_tree(src, {"model.bin": os.urandom(size)})
    ingest(repo.store, repo.m, src, "big", jobs=1)
    bundle = os.path.join(shm_tmp, "big.velo")
    with open(bundle, "wb") as f:
        export_bundle(repo.store, repo.m, "big", f)
    tracemalloc.start()
    try:
        with open(bundle, "rb") as f:
            res = import_bundle(dst.store, dst.m, f)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res["objects"] == 1
    assert peak < size // 8, f"import peaked at {peak} bytes of Python allocations"
    got = os.path.join(shm_tmp, "got")
    dst.checkout("big", got)
    assert_same_tree(src, got)


def test_a_hand_built_bundle_is_accepted(dst: Repo) -> None:
    """The builder below is right: the same shapes with one defect each are what is refused."""
    _d, sub = tree.encode(0o755, 1, [file_entry(b"b", b"bee")])
    sd, srec = node(sub)
    _d, top = tree.encode(0o755, 1, [file_entry(b"a", b"ay"), Entry(b"d", Kind.DIR, digest=sd)])
    rd, rrec = node(top)
    do_import(dst, build([meta(rd), srec, rrec, obj(b"ay"), obj(b"bee")]))
    buf = io.BytesIO()
    dst.cat("hand", "d/b", buf)
    assert buf.getvalue() == b"bee"


# -- malformed and malicious bundles -----------------------------------------------------------


def test_truncated_at_many_offsets(dst: Repo, exported: tuple[bytes, str, str]) -> None:
    data = exported[0]
    step = max(1, len(data) // 300)
    offsets = sorted(set(range(0, len(data), step)) | set(range(len(data) - 40, len(data))))
    for cut in offsets:
        assert_invalid(dst, data[:cut])


def test_every_nth_byte_flipped(dst: Repo, exported: tuple[bytes, str, str]) -> None:
    data = exported[0]
    step = max(1, len(data) // 300)
    for pos in itertools.chain(range(0, len(data), step), range(len(data) - 45, len(data))):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        assert_invalid(dst, bytes(flipped))
    for n in (7, 64, 1000):  # many bytes at once
        flipped = bytearray(data)
        for pos in range(0, len(data), n):
            flipped[pos] ^= 0x01
        assert_invalid(dst, bytes(flipped))


def test_trailing_garbage_and_wrong_header(dst: Repo, exported: tuple[bytes, str, str]) -> None:
    data = exported[0]
    assert_invalid(dst, data + b"\0")
    assert_invalid(dst, b"")
    assert_invalid(dst, b"NOTVELO!" + data[8:])
    assert_invalid(dst, data[:8] + struct.pack("<I", 2) + data[12:])
    assert_invalid(dst, build([], magic=b"VELOBNDX"))
    assert_invalid(dst, build([], version=0))
    assert_invalid(dst, build([], version=2))


BAD_NAME_NODES = {
    "dotdot": [(b"..", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "dot": [(b".", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "absolute": [(b"/etc/passwd", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "slash": [(b"a/../../b", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "nul": [(b"a\0b", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "empty": [(b"", 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
    "duplicate": [
        (b"a", 1, 2, 0o644, 1, 1, hash_bytes(b"x")),
        (b"a", 3, 0, 0o777, 4, 1, b"/etc"),
    ],
    "overlong": [(b"n" * 256, 1, 2, 0o644, 1, 1, hash_bytes(b"x"))],
}


@pytest.mark.parametrize("case", sorted(BAD_NAME_NODES))
def test_nodes_with_bad_names(dst: Repo, case: str) -> None:
    enc = _raw_node(BAD_NAME_NODES[case])
    d, rec = node(enc)  # the digest matches: only the name check can refuse it
    assert_invalid(dst, build([meta(d), rec, obj(b"x")]))
    # ... also below the root
    _sd, top = tree.encode(0o755, 1, [Entry(b"sub", Kind.DIR, digest=d)])
    rd, rrec = node(top)
    assert_invalid(dst, build([meta(rd), rec, rrec, obj(b"x")]))


def test_a_missing_object(dst: Repo) -> None:
    _d, sub = tree.encode(0o755, 1, [file_entry(b"b", b"not in the bundle")])
    sd, srec = node(sub)
    _d, top = tree.encode(0o755, 1, [file_entry(b"a", b"ay"), Entry(b"d", Kind.DIR, digest=sd)])
    rd, rrec = node(top)
    # The root node comes last, so a closure check that looked at the wrong node would pass.
    assert_invalid(dst, build([meta(rd), srec, rrec, obj(b"ay")]))
    assert_invalid(dst, build([meta(rd), rrec, srec, obj(b"ay")]))
    assert_invalid(dst, build([meta(sd), srec]))


def test_a_missing_node(dst: Repo) -> None:
    _d, top = tree.encode(0o755, 1, [Entry(b"d", Kind.DIR, digest=b"\3" * 32)])
    rd, rrec = node(top)
    assert_invalid(dst, build([meta(rd), rrec]))
    assert_invalid(dst, build([meta(b"\4" * 32)]))  # no root node at all


def test_an_object_that_does_not_match_its_digest(dst: Repo) -> None:
    _d, top = tree.encode(0o755, 1, [file_entry(b"a", b"the real bytes")])
    rd, rrec = node(top)
    forged = (OBJECT, hash_bytes(b"the real bytes") + b"something else")
    assert_invalid(dst, build([meta(rd), rrec, forged]))


def test_a_node_that_does_not_match_its_digest(dst: Repo) -> None:
    _d, top = tree.encode(0o755, 1, [])
    _d2, other = tree.encode(0o700, 1, [])
    assert_invalid(dst, build([meta(node_digest(top)), (NODE, node_digest(top) + other)]))


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(lambda rd, rrec: [rrec], id="no-meta"),
        pytest.param(lambda rd, rrec: [meta(rd), meta(rd), rrec], id="two-metas"),
        pytest.param(lambda rd, rrec: [(META, b"not json"), rrec], id="meta-not-json"),
        pytest.param(lambda rd, rrec: [(META, b"\xff\xfe"), rrec], id="meta-not-utf8"),
        pytest.param(lambda rd, rrec: [(META, b"[1, 2]"), rrec], id="meta-a-list"),
        pytest.param(lambda rd, rrec: [(META, b'"root"'), rrec], id="meta-a-string"),
        pytest.param(lambda rd, rrec: [meta(""), rrec], id="root-empty"),
        pytest.param(lambda rd, rrec: [meta("ab"), rrec], id="root-short"),
        pytest.param(lambda rd, rrec: [meta("zz" * 32), rrec], id="root-not-hex"),
        pytest.param(lambda rd, rrec: [meta("ab" * 300), rrec], id="root-long"),
        pytest.param(lambda rd, rrec: [meta(rd, root=5), rrec], id="root-a-number"),
        pytest.param(lambda rd, rrec: [meta(rd, ref="../../x"), rrec], id="bad-ref-name"),
        pytest.param(lambda rd, rrec: [meta(rd, ref=None), rrec], id="no-ref-name"),
        pytest.param(lambda rd, rrec: [meta(rd, ref="env@abc"), rrec], id="session-ref"),
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[9, 5]]), rrec], id="bad-tiers"),
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[1, "/abs", ""]]), rrec], id="abs-tier"),
        # (these three were tracebacks: int("True"), int("1.0"), re.error)
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[True, "a", ""]]), rrec], id="tier-bool"),
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[1.0, "a", ""]]), rrec], id="tier-float"),
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[1, "[z-a]", ""]]), rrec], id="bad-class"),
        pytest.param(lambda rd, rrec: [meta(rd, tiers=[[2, "a", ""]] * 257), rrec], id="rules"),
        pytest.param(lambda rd, rrec: [meta(rd), rrec, (7, b"")], id="unknown-record"),
        pytest.param(lambda rd, rrec: [meta(rd), (NODE, rd)], id="node-too-short"),
        pytest.param(lambda rd, rrec: [meta(rd), rrec, (OBJECT, b"x")], id="object-too-short"),
        pytest.param(lambda rd, rrec: [meta(rd), (META, b"{}")], id="meta-after"),
    ],
)
def test_malformed_records(dst: Repo, records: Any) -> None:
    _d, top = tree.encode(0o755, 1, [])
    rd, rrec = node(top)
    assert_invalid(dst, build(records(rd, rrec)))


def test_oversized_lengths(dst: Repo) -> None:
    body = MAGIC + struct.pack("<I", 1) + struct.pack("<BQ", OBJECT, 2**63) + b"\0" * 100
    assert_invalid(dst, body)
    body = MAGIC + struct.pack("<I", 1) + struct.pack("<BQ", META, 2**40) + b"{}"
    assert_invalid(dst, body)
    body = MAGIC + struct.pack("<I", 1) + struct.pack("<BQ", NODE, 2**40) + b"\0" * 100
    assert_invalid(dst, body)


def test_symlinks_out_of_the_tree_are_content_not_paths(dst: Repo, shm_tmp: str) -> None:
    """A bundle may carry links to anywhere (a venv's bin/python); checkout creates the links and
    writes nothing through them."""
    victim = os.path.join(shm_tmp, "victim")
    os.mkdir(victim)
    link = Entry(b"l", Kind.SYMLINK, 0o777, len(victim), 1, b"", os.fsencode(victim))
    _d, top = tree.encode(0o755, 1, [link, file_entry(b"m", b"payload")])
    rd, rrec = node(top)
    do_import(dst, build([meta(rd), rrec, obj(b"payload")]))
    out = os.path.join(shm_tmp, "out")
    dst.checkout("hand", out)
    assert os.readlink(os.path.join(out, "l")) == victim
    assert os.listdir(victim) == []


# -- fuzzing -----------------------------------------------------------------------------------

_fuzz_names = itertools.count()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if what == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif what == "set" and out:
            out[pos] = draw(st.integers(0, 255))
        elif what == "truncate":
            del out[pos:]
        elif what == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif what == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        else:
            out[pos:pos] = out[pos : pos + draw(st.integers(1, 64))]
    return bytes(out)


def fuzz_once(dst: Repo, original: bytes, root: str, data: bytes) -> None:
    before = state(dst)
    name = f"fuzz{next(_fuzz_names)}"
    try:
        info = do_import(dst, data, name=name)
    except VeloError as exc:
        assert exc.reason is Reason.BUNDLE_INVALID, exc.message
        assert state(dst) == before
        return
    # Accepted: it must have been the same bundle after all.
    assert data == original
    assert info["root"] == root


def _fuzz(dst: Repo, exported: tuple[bytes, str, str], n: int) -> None:
    original, root, _src = exported
    runs = []

    @settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(mutations(original))
    def run(data: bytes) -> None:
        runs.append(1)
        fuzz_once(dst, original, root, data)

    run()
    assert len(runs) >= n // 2  # it really ran


def test_fuzz_bundle_bytes(dst: Repo, exported: tuple[bytes, str, str]) -> None:
    _fuzz(dst, exported, 200)


@pytest.mark.slow
def test_fuzz_bundle_bytes_long(dst: Repo, exported: tuple[bytes, str, str]) -> None:
    _fuzz(dst, exported, 5000)


def test_import_does_not_trust_the_bundles_path(tmp_path: Path, shm_tmp: str) -> None:
    """A bundle names the directory it was ingested from; import never makes that the ref's
    default projection point by itself (a bundle from elsewhere could name /etc)."""
    from veloverlay.store.bundle import export_bundle, import_bundle
    from veloverlay.verbs.repo import Repo

    src = Path(shm_tmp) / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    a = Repo.open(str(Path(shm_tmp) / "a"), create=True)
    b = Repo.open(str(Path(shm_tmp) / "b"), create=True)
    try:
        from veloverlay.ingest.pipeline import ingest

        ingest(a.store, a.m, str(src), "r", jobs=1)
        bundle = tmp_path / "r.velo"
        with open(bundle, "wb") as f:
            export_bundle(a.store, a.m, "r", f)
        with open(bundle, "rb") as f:
            info = import_bundle(b.store, b.m, f)
        assert info["bundle_path"] == str(src)
        with b.m.read() as txn:
            assert b.m.require_ref(txn, "r").path is None
        with open(bundle, "rb") as f:
            import_bundle(b.store, b.m, f, name="r2", path="/srv/where")
        with b.m.read() as txn:
            assert b.m.require_ref(txn, "r2").path == "/srv/where"
    finally:
        a.close()
        b.close()


# -- issue 14: sizes, setuid bits, depth -------------------------------------------------------


@pytest.mark.parametrize("claim", [1 << 40, 5, 7, 0])
def test_a_file_entry_whose_size_is_not_its_objects_is_refused(dst: Repo, claim: int) -> None:
    """A 6-byte object claimed as 1 TiB (or any other size) would make the first copy-up in a
    session write zeros into the store until the disk is full."""
    e = Entry(b"big", Kind.FILE, 0o644, claim, 1, hash_bytes(b"sixsix"), b"", 2)
    rd, rrec = node(tree.encode(0o755, 1, [e])[1])
    assert_invalid(dst, build([meta(rd), rrec, obj(b"sixsix")]))


def test_a_size_lie_about_an_object_already_stored_is_refused(dst: Repo) -> None:
    """The object is not in the bundle but in the store already: its real size is checked."""
    _d, top = tree.encode(0o755, 1, [file_entry(b"a", b"sixsix")])
    rd, rrec = node(top)
    do_import(dst, build([meta(rd), rrec, obj(b"sixsix")]))
    e = Entry(b"big", Kind.FILE, 0o644, 1 << 40, 1, hash_bytes(b"sixsix"), b"", 2)
    rd2, rrec2 = node(tree.encode(0o755, 1, [e])[1])
    assert_invalid(dst, build([meta(rd2, ref="other"), rrec2]))


def test_import_strips_setuid_and_setgid_unless_kept(repo: Repo, dst: Repo, shm_tmp: str) -> None:
    """A root checkout of an imported bundle must not make a setuid-root file: import applies
    ingest's policy (--keep-setid keeps the bits)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"suid": b"#!/bin/sh\n", "sgid": b"g", "plain": b"p"})
    os.chmod(os.path.join(src, "suid"), 0o4755)
    os.chmod(os.path.join(src, "sgid"), 0o2750)
    ingest(repo.store, repo.m, src, "t", jobs=1, keep_setid=True)
    buf = io.BytesIO()
    export_bundle(repo.store, repo.m, "t", buf)
    info = do_import(dst, buf.getvalue(), name="stripped")
    assert info["stripped_setid"] == 2
    kept = do_import(dst, buf.getvalue(), name="kept", keep_setid=True)
    assert kept["stripped_setid"] == 0
    want = {n: os.stat(os.path.join(src, n)).st_mode & 0o7777 for n in ("suid", "sgid", "plain")}
    for ref, keep in (("stripped", False), ("kept", True)):
        for co_keep in (False, True):
            out = os.path.join(shm_tmp, f"co-{ref}-{co_keep}")
            dst.checkout(ref, out, keep_setid=co_keep)
            got = {n: os.stat(os.path.join(out, n)).st_mode & 0o7777 for n in want}
            expect = {n: (m if keep and co_keep else m & ~0o6000) for n, m in want.items()}
            assert got == expect, (ref, co_keep)


def _chain(depth: int, leaf: bytes = b"f") -> tuple[bytes, list[tuple[int, bytes]]]:
    """A tree `d/d/.../d/f` `depth` directories deep: (root digest, node records)."""
    _d, enc = tree.encode(0o755, 1, [file_entry(leaf, b"x")])
    d, rec = node(enc)
    recs = [rec]
    for _ in range(depth):
        d, rec = node(tree.encode(0o755, 1, [Entry(b"d", Kind.DIR, digest=d)])[1])
        recs.append(rec)
    return d, recs


def test_a_tree_deeper_than_the_limit_is_refused_without_a_traceback(dst: Repo) -> None:
    root, recs = _chain(10_000)
    data = build([meta(root), *recs, obj(b"x")])
    assert_invalid(dst, data)
    with pytest.raises(VeloError) as ei:
        do_import(dst, data)
    assert "too deep" in ei.value.message


def test_a_path_longer_than_path_max_is_refused(dst: Repo) -> None:
    """Few levels, long names: 20 x 250 bytes is over the 4095 bytes a path may have."""
    _d, enc = tree.encode(0o755, 1, [file_entry(b"f", b"x")])
    d, rec = node(enc)
    recs = [rec]
    for i in range(20):
        d, rec = node(
            tree.encode(0o755, 1, [Entry(b"%03d" % i + b"n" * 247, Kind.DIR, digest=d)])[1]
        )
        recs.append(rec)
    assert_invalid(dst, build([meta(d), *recs, obj(b"x")]))


def test_a_tree_at_the_depth_limit_imports_and_checks_out(dst: Repo, shm_tmp: str) -> None:
    root, recs = _chain(DEPTH_MAX - 1)  # DEPTH_MAX - 1 directories and the file: DEPTH_MAX
    do_import(dst, build([meta(root), *recs, obj(b"x")]))
    out = os.path.join(shm_tmp, "deep")
    assert dst.checkout("hand", out) == DEPTH_MAX
    with open(os.path.join(out, *(["d"] * (DEPTH_MAX - 1)), "f"), "rb") as f:
        assert f.read() == b"x"
    root, recs = _chain(DEPTH_MAX)
    assert_invalid(dst, build([meta(root, ref="deeper"), *recs, obj(b"x")]))


def test_a_node_outside_the_roots_closure_is_not_stored(dst: Repo) -> None:
    """A stored node is trusted to have its closure stored and checked: a later import (or pull)
    of a tree naming it does not look below it. A bundle carrying an extra node that names an
    object it lacks, with a lying size, must not plant it for a second bundle to use."""
    lie = Entry(b"big", Kind.FILE, 0o644, 1 << 40, 1, b"\7" * 32, b"", 2)
    xd, xrec = node(tree.encode(0o755, 1, [lie])[1])
    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    info = do_import(dst, build([meta(rd), rrec, xrec, obj(b"ok")]))
    assert info["nodes"] == 1
    with dst.m.read() as txn:
        assert not dst.m.has_node(txn, xd)
    # the second bundle names the planted node and carries nothing else
    sd, srec = node(tree.encode(0o755, 1, [Entry(b"sub", Kind.DIR, digest=xd)])[1])
    assert_invalid(dst, build([meta(sd, ref="second"), srec]))


def _doubling(levels: int, leaf: Entry) -> tuple[bytes, list[tuple[int, bytes]]]:
    """`levels` directories each holding `a` and `b`, both the same child: 2**levels paths to
    `leaf` in `levels + 1` nodes. (root digest, node records)"""
    d, rec = node(tree.encode(0o755, 1, [leaf])[1])
    recs = [rec]
    for _ in range(levels):
        pair = [Entry(b"a", Kind.DIR, digest=d), Entry(b"b", Kind.DIR, digest=d)]
        d, rec = node(tree.encode(0o755, 1, pair)[1])
        recs.append(rec)
    return d, recs


def test_setid_bits_are_stripped_node_by_node_not_path_by_path(
    dst: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree naming one subtree from many places is 2**levels paths in a few KiB: stripping
    setuid bits walked every path (40 levels in a 7 KiB bundle: an import that never ends). Each
    node is read once now; the count still counts paths."""
    levels = 12
    leaf = Entry(b"f", Kind.FILE, 0o4755, 1, 1, hash_bytes(b"x"), b"", 2)
    root, recs = _doubling(levels, leaf)
    reads: list[bytes] = []
    real = dst.m.get_node
    monkeypatch.setattr(dst.m, "get_node", lambda txn, d: reads.append(d) or real(txn, d))
    info = do_import(dst, build([meta(root), *recs, obj(b"x")]))
    assert info["stripped_setid"] == 2**levels
    assert len(reads) <= 2 * (levels + 1)  # (walking the paths read 2**(levels + 1) nodes)
    monkeypatch.undo()
    with dst.m.read() as txn:
        top = bytes.fromhex(dst.m.get_commit(txn, dst.m.get_ref(txn, "hand").head).root)  # type: ignore[union-attr]
        for path in (b"a/" * levels, b"b/" * levels, b"ab" * (levels // 2)):
            d = top
            for name in path.replace(b"/", b""):
                e = dst.m.get_node(txn, d).lookup(bytes([name]))
                assert e is not None and e.kind is Kind.DIR
                d = e.digest
            f = dst.m.get_node(txn, d).lookup(b"f")
            assert f is not None and f.mode == 0o755, path
    root24, recs24 = _doubling(24, leaf)  # path by path: hours
    info = do_import(dst, build([meta(root24, ref="wide"), *recs24, obj(b"x")]))
    assert info["stripped_setid"] == 2**24
    # 2**40 paths (the one that never ended) are more than a tree may have: refused
    root40, recs40 = _doubling(40, leaf)
    assert_invalid(dst, build([meta(root40, ref="wider"), *recs40, obj(b"x")]))


_EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m\r\nhand@{9}  forged line"


def test_the_cli_shows_a_bundles_text_escaped_on_one_line(shm_tmp: str) -> None:
    """A bundle's commit message, tier rules and ingest path come from elsewhere: `log`, `tiers
    explain` and `import` printed them raw (terminal escapes, and a newline that printed a
    forged log line). The message is also kept as text of bounded length, as pull keeps it."""
    from tests.helpers.cli import ok, velo

    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    store = os.path.join(shm_tmp, "store")
    for ref, message in (("hand", _EVIL), ("big", _EVIL * 1000), ("odd", ["not", "text"])):
        bundle = os.path.join(shm_tmp, f"{ref}.velo")
        with open(bundle, "wb") as f:
            f.write(
                build(
                    [
                        meta(
                            rd, ref=ref, message=message, path="/p" + _EVIL, tiers=[[1, "a", _EVIL]]
                        ),
                        rrec,
                        obj(b"ok"),
                    ]
                )
            )
        r = velo(store, "import", bundle)
        ok(r)
        shown = [r.stdout.decode(), r.stderr.decode()]
        shown.append(ok(velo(store, "tiers", "explain", "--ref", ref, "a")))
        log = ok(velo(store, "log", ref))
        shown.append(log)
        assert len(log.splitlines()) == 1, log
        for out in shown:
            assert not any(c in out for c in "\x1b\x07\x9b\r"), out
        assert len(r.stderr.decode().splitlines()) == 1, r.stderr  # the ingest path, one line
        commits = json.loads(ok(velo(store, "--json", "log", ref)))
        if ref == "hand":
            assert commits[0]["message"] == "import: " + _EVIL  # kept; shown escaped
        elif ref == "big":
            assert len(commits[0]["message"]) == len("import: ") + 4096
        else:
            assert commits[0]["message"] == "import: "


def test_a_bundle_is_not_imported_into_a_session_ref(dst: Repo) -> None:
    """`REF@<session>` is made by a session's conflict only; ingest refuses to write one, and so
    do import and pull now (they made one that sessions then refused to run on)."""
    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    before = state(dst)
    with pytest.raises(VeloError) as ei:
        do_import(dst, build([meta(rd), rrec, obj(b"ok")]), name="hand@0123abcd")
    assert ei.value.reason is Reason.BAD_REF
    assert state(dst) == before


def test_diff_shows_names_from_a_bundle_escaped_on_one_line(shm_tmp: str) -> None:
    """`ls` escaped a name's control characters, `diff` printed them raw (and a newline in a
    name split its line in two)."""
    from tests.helpers.cli import ok, velo

    store = os.path.join(shm_tmp, "store")
    evil = b"n\x1b[31mred\x07\nx"
    for ref, entries, objs in (("e0", [], []), ("e1", [file_entry(evil, b"ok\n")], [b"ok\n"])):
        rd, rrec = node(tree.encode(0o755, 1, entries)[1])
        bundle = os.path.join(shm_tmp, f"{ref}.velo")
        with open(bundle, "wb") as f:
            f.write(build([meta(rd, ref=ref), rrec, *map(obj, objs)]))
        ok(velo(store, "import", bundle))
    for flags, lines in (([], 1), (["--name-status"], 1), (["--stat"], 2), (["--patch"], 6)):
        out = ok(velo(store, "diff", *flags, "e0", "e1"))
        assert not any(c in out for c in "\x1b\x07"), out
        assert len(out.splitlines()) == lines, out
        assert "n\\x1b[31mred\\x07\\x0ax" in out


def _export_over_the_file_size_limit(repo: Repo, out_dir: str) -> object:
    import errno
    import resource

    from veloverlay.errors import SysError
    from veloverlay.store.bundle import export_to_path

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    out = os.path.join(out_dir, "b.velo")
    try:
        export_to_path(repo.store, repo.m, "big", out)
    except SysError as exc:
        return (exc.errno == errno.EFBIG, exc.filename == out + ".part", exc.hint is not None)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc} (filename {exc.filename!r})"
    return "exported"


def test_export_over_a_file_size_limit_names_the_file(repo: Repo, shm_tmp: str) -> None:
    """`ulimit -f` smaller than the bundle: export said only '[Errno 27] File too large'
    (reason os-error), naming no file and giving no hint. (SIGXFSZ is ignored by Python: the
    write fails with EFBIG.) Now a SysError naming the .part file, with a hint; nothing left."""
    from veloverlay import ns

    src = os.path.join(shm_tmp, "big")
    make_tree(src, {"model.bin": os.urandom(1 << 20)})
    ingest(repo.store, repo.m, src, "big", jobs=1)
    out_dir = os.path.join(shm_tmp, "out")
    os.mkdir(out_dir)
    assert ns.run_in_child(_export_over_the_file_size_limit, repo, out_dir) == (True, True, True)
    assert os.listdir(out_dir) == []


def test_a_wide_directory_exports_to_a_bundle_that_imports(
    repo: Repo, dst: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node over 64 MiB (here 16,000 symlinks with 4,000-byte targets; as well 220,000 files
    with 255-byte names) was exported, and import refused the bundle ("bad node record length"):
    a backup that could not be restored. It imports now; a node over the bound both sides share
    is refused by export, before it writes a byte."""
    src = os.path.join(shm_tmp, "wide")
    os.mkdir(src)
    target = "t" * 4000
    for i in range(16_000):
        os.symlink(f"{target}{i}", os.path.join(src, f"{i:06d}" + "n" * 240))
    ingest(repo.store, repo.m, src, "wide", jobs=1)
    buf = io.BytesIO()
    export_bundle(repo.store, repo.m, "wide", buf)
    assert len(buf.getvalue()) > 64 << 20
    do_import(dst, buf.getvalue())
    out = os.path.join(shm_tmp, "out")
    dst.checkout("wide", out)
    assert_same_tree(src, out)
    monkeypatch.setattr(bundle, "MAX_NODE", 1 << 20)
    buf = io.BytesIO()
    with pytest.raises(VeloError) as ei:
        export_bundle(repo.store, repo.m, "wide", buf)
    assert ei.value.reason is Reason.BUNDLE_INVALID
    assert buf.getvalue() == b""
