"""Manifests in LMDB: apply/diff over Merkle nodes, refs, the commit log, commit CAS, schema.

Trees are built straight into LMDB from small specs (F/L/D/MASK below); their file contents are
real objects in the store, so the `repo` fixture's fsck at teardown checks every node written here.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veloverlay.errors import Reason, VeloError
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import EMPTY_ROOT, Manifests
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.verbs.repo import Repo

# -- a small tree-spec language ----------------------------------------------------------------


@dataclass(frozen=True)
class F:
    content: bytes
    mode: int = 0o644
    mtime: int = 1
    tier: int = 2


@dataclass(frozen=True)
class L:
    target: bytes
    mtime: int = 1


@dataclass(frozen=True)
class D:
    children: dict[bytes, object] = field(default_factory=dict)
    mode: int = 0o755
    mtime: int = 1

    def __hash__(self) -> int:
        return id(self)


MASK = "mask"


def store_objects(repo: Repo, contents: list[bytes]) -> None:
    with repo.store.stage() as stage:
        for c in contents:
            stage.add_bytes(c)
        stage.publish()


def build(m: Manifests, txn: object, spec: D) -> bytes:
    """Write the nodes of `spec` (file contents must already be objects); return its digest."""
    entries = []
    for name, item in spec.children.items():
        if isinstance(item, F):
            entries.append(
                Entry(
                    name,
                    Kind.FILE,
                    item.mode,
                    len(item.content),
                    item.mtime,
                    hash_bytes(item.content),
                    b"",
                    item.tier,
                )
            )
        elif isinstance(item, L):
            entries.append(
                Entry(name, Kind.SYMLINK, 0o777, len(item.target), item.mtime, b"", item.target)
            )
        elif isinstance(item, D):
            entries.append(Entry(name, Kind.DIR, digest=build(m, txn, item)))
        else:
            assert item == MASK
            entries.append(Entry(name, Kind.MASK))
    return m.put_node(txn, spec.mode, spec.mtime, entries)


def build_root(repo: Repo, spec: D) -> bytes:
    contents = []

    def collect(d: D) -> None:
        for item in d.children.values():
            if isinstance(item, F):
                contents.append(item.content)
            elif isinstance(item, D):
                collect(item)

    collect(spec)
    store_objects(repo, contents)
    with repo.m.write() as txn:
        return build(repo.m, txn, spec)


def node_count(m: Manifests) -> int:
    with m.read() as txn:
        return sum(1 for _ in m.iter_nodes(txn))


def db_snapshot(m: Manifests) -> tuple[object, ...]:
    """Everything in the manifest database that a failed write must leave as it was."""
    with m.read() as txn:
        nodes = dict(m.iter_nodes(txn))
        refs = {r.name: r.to_json() for r in m.refs(txn)}
        commits = {c.id: c.to_dict() for c in m.iter_commits(txn)}
    return nodes, refs, commits


def new_ref(repo: Repo, name: str, roots: list[bytes]) -> list[str]:
    """Commit `roots` in order as the versions of `name`; return the commit ids."""
    ids: list[str] = []
    with repo.m.write() as txn:
        for i, r in enumerate(roots):
            c = repo.m.commit(txn, name, r, expect_head=ids[-1] if ids else None, message=f"v{i}")
            ids.append(c.id)
    return ids


# -- hypothesis strategies over trees -----------------------------------------------------------

CONTENTS = [b"", b"alpha", b"beta", b"gamma" * 100]
small_names = st.sampled_from([b"a", b"b", b"c", b"\xff d"])
leaf = st.one_of(
    st.builds(
        F,
        st.sampled_from(CONTENTS),
        st.sampled_from([0o644, 0o755, 0o600]),
        st.sampled_from([1, 2]),
        st.sampled_from([1, 2]),
    ),
    st.builds(L, st.sampled_from([b"a", b"/abs/target", b"../up", b"dangling"]), st.just(1)),
    st.just(MASK),
)


def _dir(children: st.SearchStrategy[object]) -> st.SearchStrategy[D]:
    return st.builds(
        D,
        st.dictionaries(small_names, children, max_size=4),
        st.sampled_from([0o755, 0o700]),
        st.sampled_from([1, 2]),
    )


trees = _dir(st.recursive(leaf, _dir, max_leaves=12))


@pytest.fixture
def objects(repo: Repo) -> Repo:
    store_objects(repo, CONTENTS)
    return repo


# -- apply(diff(a, b)) == b ---------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=trees, b=trees)
def test_apply_of_diff_gives_the_other_tree(objects: Repo, a: D, b: D) -> None:
    m = objects.m
    with m.write() as txn:
        ra, rb = build(m, txn, a), build(m, txn, b)
        ops = m.diff(txn, ra, rb)
        assert m.apply(txn, ra, ops) == rb
        assert m.apply(txn, rb, m.diff(txn, rb, ra)) == ra
        assert (ops == []) == (ra == rb)
        # A delta is the same whether applied at once or one operation at a time.
        r = ra
        for op in ops:
            r = m.apply(txn, r, [op])
        assert r == rb


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=trees, b=trees, c=trees)
def test_a_diff_after_apply_agrees_with_one_that_compares_every_name(
    objects: Repo, a: D, b: D, c: D
) -> None:
    """`apply` remembers which names each node it wrote differs in from the node it changed,
    and a diff between the two compares those names only: it must find what a diff comparing
    every name finds (the same Manifests with its memory dropped), either way round, and a diff
    against a third tree must not use it. What an aborted transaction wrote is not remembered."""
    m = objects.m
    with m.write() as txn:
        ra, rb, rx = build(m, txn, a), build(m, txn, b), build(m, txn, c)
        ops = m.diff(txn, ra, rb)
    with m.write() as txn:
        rc = m.apply(txn, ra, ops)
        assert rc == rb
    with m.read() as txn:
        pairs = [(ra, rc), (rc, ra), (rx, rc), (rc, rx)]
        hinted = [m.diff(txn, x, y) for x, y in pairs]
    assert (m.maps.changed_names(ra, rc) is not None) == (ra != rc)
    m.maps.clear()  # what a new process starts with
    with m.read() as txn:
        assert hinted == [m.diff(txn, x, y) for x, y in pairs]
    with pytest.raises(RuntimeError), m.write() as txn:
        rd = m.apply(txn, ra, ops)
        raise RuntimeError("abort")
    assert m.maps.changed_names(ra, rd) is None


def test_diff_kinds_of_change(repo: Repo) -> None:
    a = build_root(
        repo,
        D(
            {
                b"same": F(b"1"),
                b"content": F(b"1"),
                b"mode": F(b"1"),
                b"gone": F(b"1"),
                b"sub": D({b"x": F(b"1")}),
                b"link": L(b"t1"),
                b"kind": F(b"1"),
            }
        ),
    )
    b = build_root(
        repo,
        D(
            {
                b"same": F(b"1"),
                b"content": F(b"2"),
                b"mode": F(b"1", mode=0o600),
                b"new": F(b"3"),
                b"sub": D({b"x": F(b"1"), b"y": L(b"/abs")}, mtime=9),
                b"link": L(b"t2"),
                b"kind": D(),
            }
        ),
    )
    with repo.m.read() as txn:
        ops = {(op.kind, op.path) for op in repo.m.diff(txn, a, b)}
    assert ops == {
        (OpKind.PUT, b"content"),
        (OpKind.META, b"mode"),
        (OpKind.DELETE, b"gone"),
        (OpKind.PUT, b"new"),
        (OpKind.META, b"sub"),
        (OpKind.PUT, b"sub/y"),
        (OpKind.PUT, b"link"),
        (OpKind.PUT, b"kind"),
    }


def _wide_tree(fanout: int) -> D:
    return D(
        {
            f"d{i}".encode(): D(
                {
                    f"s{j}".encode(): D(
                        {f"f{k}".encode(): F(b"%d" % (k % 7)) for k in range(fanout)}
                    )
                    for j in range(fanout)
                }
            )
            for i in range(fanout)
        }
    )


def test_apply_rewrites_only_the_nodes_on_the_changed_path(repo: Repo) -> None:
    m = repo.m
    root = build_root(repo, _wide_tree(10))  # 1,000 files, depth 3
    store_objects(repo, [b"changed"])
    with m.read() as txn:
        assert sum(1 for _p, e, _n in m.walk(txn, root) if e.kind is Kind.FILE) == 1000
    before = node_count(m)
    new_file = Entry(b"f3", Kind.FILE, 0o644, 7, 5, hash_bytes(b"changed"), b"", 2)
    with m.write() as txn:
        new_root = m.apply(txn, root, [Op(OpKind.PUT, b"d4/s5/f3", new_file)])
    depth = 2  # directories below the root on the changed path: d4, d4/s5
    assert node_count(m) - before <= depth + 1
    assert node_count(m) - before == 3  # root, d4, d4/s5: nothing else
    with m.read() as txn:
        assert m.lookup(txn, new_root, b"d4/s5/f3") == new_file
        # untouched siblings are shared, not copied
        assert m.lookup(txn, new_root, b"d4/s4") == m.lookup(txn, root, b"d4/s4")
        assert m.lookup(txn, new_root, b"d3") == m.lookup(txn, root, b"d3")


def test_diff_reads_only_the_nodes_on_changed_paths(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = repo.m
    root = build_root(repo, _wide_tree(10))
    with m.write() as txn:
        other = m.apply(txn, root, [Op(OpKind.DELETE, b"d1/s2/f3")])
    reads: list[bytes] = []
    real = Manifests._stored  # every read of a node from the database

    def counting(self: Manifests, txn: object, digest: bytes) -> object:
        reads.append(digest)
        return real(self, txn, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(Manifests, "_stored", counting)
    m._cache.clear()
    m.maps.clear()
    with m.read() as txn:
        ops = m.diff(txn, root, other)
    assert ops == [Op(OpKind.DELETE, b"d1/s2/f3")]
    assert len(reads) == 2 * 3  # both sides of root, d1, d1/s2


@pytest.mark.corrupts_store
@pytest.mark.parametrize("how", ["other-node", "flipped-name"])
def test_an_altered_stored_node_is_refused_not_copied(repo: Repo, how: str) -> None:
    """Changes keep a wide directory's untouched entries in their stored encodings; a node
    whose stored bytes were altered (still a well-formed node) must stop them: lookup, diff and
    apply raise MANIFEST_CORRUPT, and apply writes no node built from the altered bytes."""
    m = repo.m
    root = build_root(repo, _wide_tree(4))
    with m.write() as txn:
        other = m.apply(txn, root, [Op(OpKind.DELETE, b"d1/s2/f3")])
        d1 = m.lookup(txn, root, b"d1")
        assert d1 is not None
        data = m.raw_node(txn, d1.digest)
        assert data is not None
        if how == "other-node":
            _dg, bad = tree.encode(0o755, 1, [Entry(b"x", Kind.MASK)])
        else:  # s3 -> t3: sorted and well formed still
            bad = data.replace(b"s3", b"t3")
            assert tree.decode(bad) != tree.decode(data)
        txn.put(d1.digest, bad, db=m._nodes)
    m._cache.clear()
    m.maps.clear()
    before = node_count(m)
    with m.write() as txn:
        for call in (
            lambda: m.lookup(txn, root, b"d1/s2/f3"),
            lambda: m.diff(txn, root, other),
            lambda: m.apply(txn, root, [Op(OpKind.DELETE, b"d1/s1/f0")]),
        ):
            with pytest.raises(VeloError) as ei:
                call()
            assert ei.value.reason is Reason.MANIFEST_CORRUPT
    assert node_count(m) == before


def test_apply_errors(repo: Repo) -> None:
    m = repo.m
    root = build_root(repo, D({b"f": F(b"1"), b"d": D()}))
    with m.write() as txn:
        put = Entry(b"x", Kind.MASK)
        cases = [
            ([Op(OpKind.PUT, b"f/x", put)], Reason.NOT_A_DIRECTORY),
            ([Op(OpKind.META, b"missing", mode=0o600)], Reason.NOT_FOUND),
            ([Op(OpKind.DELETE, b"")], Reason.BAD_PATH),
            ([Op(OpKind.PUT, b"", Entry(b"", Kind.FILE, digest=b"\0" * 32))], Reason.BAD_PATH),
            ([Op(OpKind.PUT, b"d/../x", put)], Reason.BAD_NAME),
            ([Op(OpKind.PUT, b"d/a\0b", put)], Reason.BAD_NAME),
            ([Op(OpKind.PUT, b"d/" + b"n" * 256, put)], Reason.BAD_NAME),
        ]
        for ops, reason in cases:
            with pytest.raises(VeloError) as ei:
                m.apply(txn, root, ops)
            assert ei.value.reason is reason, ops


def test_apply_meta_and_later_ops_win(repo: Repo) -> None:
    m = repo.m
    root = build_root(repo, D({b"d": D({b"f": F(b"1")}), b"g": F(b"2")}))
    with m.write() as txn:
        r = m.apply(
            txn,
            root,
            [
                Op(OpKind.META, b"d", mode=0o700, mtime_ns=77),
                Op(OpKind.META, b"g", mode=0o600, mtime_ns=88),
                Op(OpKind.DELETE, b"d/f"),
                Op(OpKind.PUT, b"d/f", Entry(b"ignored", Kind.SYMLINK, 0o777, 1, 3, b"", b"t")),
                Op(OpKind.META, b"", mode=0o750, mtime_ns=99),
            ],
        )
        top = m.get_node(txn, r)
        assert (top.mode, top.mtime_ns) == (0o750, 99)
        d = m.get_node(txn, m.lookup(txn, r, b"d").digest)  # type: ignore[union-attr]
        assert (d.mode, d.mtime_ns) == (0o700, 77)
        link = m.lookup(txn, r, b"d/f")
        assert link is not None and link.kind is Kind.SYMLINK and link.name == b"f"
        g = m.lookup(txn, r, b"g")
        assert g is not None and (g.mode, g.mtime_ns, g.digest) == (0o600, 88, hash_bytes(b"2"))


# -- refs, log, resolve, rollback, CAS ----------------------------------------------------------


def test_log_resolve_and_rollback(repo: Repo) -> None:
    roots = [build_root(repo, D({b"v": F(b"%d" % i)})) for i in range(3)]
    ids = new_ref(repo, "r", roots)
    log = repo.log("r")
    assert [c.id for c in log] == list(reversed(ids))  # newest first
    assert [c.parent for c in log] == [ids[1], ids[0], None]
    assert [c.root for c in log] == [r.hex() for r in reversed(roots)]
    assert [c.id for c in repo.log("r", limit=2)] == [ids[2], ids[1]]
    for n in range(3):
        assert repo.resolve_root(f"r@{{{n}}}") == roots[2 - n]
    assert repo.resolve_root("r") == roots[2]
    with pytest.raises(VeloError) as ei:
        repo.resolve_root("r@{3}")
    assert ei.value.reason is Reason.NOT_FOUND
    with pytest.raises(VeloError) as ei:
        repo.resolve_root("nope")
    assert ei.value.reason is Reason.NOT_FOUND
    with pytest.raises(VeloError) as ei:
        repo.resolve_root("r@{x")
    assert ei.value.reason is Reason.BAD_REF

    c = repo.rollback("r", 2)
    assert c.root == roots[0].hex() and c.parent == ids[2]
    assert len(repo.log("r")) == 4  # history is kept
    assert repo.resolve_root("r") == roots[0]
    assert repo.resolve_root("r@{1}") == roots[2]
    assert [(op.kind, op.path) for op in repo.diff("r@{1}", "r")] == [(OpKind.PUT, b"v")]
    with pytest.raises(VeloError) as ei:
        repo.rollback("r", 0)
    assert ei.value.reason is Reason.USAGE
    with pytest.raises(VeloError) as ei:
        repo.rollback("r", 10)
    assert ei.value.reason is Reason.NOT_FOUND


def test_commit_compare_and_swap(repo: Repo) -> None:
    m = repo.m
    r1 = build_root(repo, D({b"a": F(b"1")}))
    r2 = build_root(repo, D({b"a": F(b"2")}))
    (c1,) = new_ref(repo, "r", [r1])
    with m.write() as txn:
        c2 = m.commit(txn, "r", r2, expect_head=c1, message="second")
    before = db_snapshot(m)
    store_objects(repo, [b"3"])
    # A writer that prepared its change on c1 finds the ref moved: nothing is written, including
    # the nodes it wrote in the same transaction.
    with pytest.raises(VeloError) as ei, m.write() as txn:
        new_root = m.apply(
            txn,
            r1,
            [Op(OpKind.PUT, b"b", Entry(b"b", Kind.FILE, 0o644, 1, 1, hash_bytes(b"3"), b"", 2))],
        )
        m.commit(txn, "r", new_root, expect_head=c1, message="stale")
    assert ei.value.reason is Reason.REF_MOVED
    assert db_snapshot(m) == before
    with pytest.raises(VeloError) as ei, m.write() as txn:
        m.commit(txn, "r", r1, expect_head=None, message="create over existing")
    assert ei.value.reason is Reason.REF_MOVED
    with pytest.raises(VeloError) as ei, m.write() as txn:
        m.commit(txn, "fresh", r1, expect_head=c2.id, message="expects a head that is not there")
    assert ei.value.reason is Reason.REF_MOVED
    with pytest.raises(VeloError) as ei, m.write() as txn:
        m.commit(txn, "r", b"\1" * 32, expect_head=c2.id, message="unknown root")
    assert ei.value.reason is Reason.MANIFEST_CORRUPT
    assert db_snapshot(m) == before
    assert repo.resolve_root("r") == r2


@pytest.mark.parametrize("name", ["", "a b", "-x", "a/b", "x" * 129, "a@", "@b", "a@{1}", "é"])
def test_bad_ref_names(repo: Repo, name: str) -> None:
    with pytest.raises(VeloError) as ei, repo.m.write() as txn:
        repo.m.commit(txn, name, EMPTY_ROOT, expect_head=None, message="")
    assert ei.value.reason is Reason.BAD_REF


def test_ref_metadata_is_kept_across_commits(repo: Repo) -> None:
    m = repo.m
    with m.write() as txn:
        c1 = m.commit(
            txn, "r", EMPTY_ROOT, expect_head=None, message="", path="/src", tiers=[[1, "*.x", ""]]
        )
        m.commit(txn, "r", EMPTY_ROOT, expect_head=c1.id, message="session", session="s1")
        ref = m.require_ref(txn, "r")
    assert (ref.path, ref.tiers) == ("/src", [[1, "*.x", ""]])
    assert repo.log("r")[0].session == "s1"


def test_walk_and_lookup(repo: Repo) -> None:
    spec = D({b"a": D({b"b": F(b"1"), b"l": L(b"/x")}, mode=0o700, mtime=5), b"\xff": MASK})
    root = build_root(repo, spec)
    with repo.m.read() as txn:
        walked = {p: e for p, e, _n in repo.m.walk(txn, root)}
        assert set(walked) == {b"", b"a", b"a/b", b"a/l", b"\xff"}
        assert (walked[b"a"].mode, walked[b"a"].mtime_ns) == (0o700, 5)
        assert repo.m.lookup(txn, root, b"a/b/c") is None  # through a file
        assert repo.m.lookup(txn, root, b"zz") is None
        e = repo.m.lookup(txn, root, b"a/l")
        assert e is not None and e.target == b"/x"


def test_empty_root_is_always_there(repo: Repo) -> None:
    with repo.m.read() as txn:
        node = repo.m.get_node(txn, EMPTY_ROOT)
    assert node.entries == ()


def test_missing_node_is_manifest_corrupt(repo: Repo) -> None:
    with pytest.raises(VeloError) as ei, repo.m.read() as txn:
        repo.m.get_node(txn, b"\2" * 32)
    assert ei.value.reason is Reason.MANIFEST_CORRUPT


def test_schema_version_is_checked(shm_tmp: str) -> None:
    r = Repo.open(os.path.join(shm_tmp, "s"), create=True)
    with r.m.write() as txn:
        txn.put(b"schema", b"2", db=r.m._meta)
    r.close()
    with pytest.raises(VeloError) as ei:
        Repo.open(os.path.join(shm_tmp, "s"))
    assert ei.value.reason is Reason.MANIFEST_SCHEMA


def test_commits_are_content_addressed_and_unique(repo: Repo) -> None:
    ids = new_ref(repo, "r", [EMPTY_ROOT] * 5)
    assert len(set(ids)) == 5  # same root, different parents/times
    assert all(len(i) == 64 for i in ids)
    assert [c.id for c in repo.log("r")] == list(reversed(ids))
    assert list(itertools.islice((c.parent for c in repo.log("r")), 1)) == [ids[3]]
