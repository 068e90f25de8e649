"""Two sessions of one ref at once, against a model: the same two scripts run on plain copies
of the tree, merged per path by the documented rules (docs/sessions.md, "Commit").

Session A starts first and ends last; B runs and commits while A runs, so A's end meets a ref
that moved. Either A merges — and the ref is then exactly the model's merge, which must have
had no conflict — or A is kept as `REF@<session>`: the ref is then B's tree, the kept ref is
A's tree (nothing lost) and A exits 1 naming what conflicted. A conflict the model does not
see (both sides made a new directory, say) is allowed: the merge is per manifest path, coarser
than per file. The pairs come from a seeded generator; VELO_TEST_MERGE_EXAMPLES runs more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers.trees import Item, snapshot
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, run_session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests
from veloverlay.store.stack import stack_roots

EXAMPLES = int(os.environ.get("VELO_TEST_MERGE_EXAMPLES", "6"))

TREE: dict[str, bytes | None] = {
    "a": b"a\n",
    "b": b"b\n",
    "d/x": b"x\n",
    "d/y": b"y\n",
    "d/sub/z": b"z\n",
    "e/f": b"f\n",
    "emptyd": None,
}
PATHS = ["a", "b", "d", "d/x", "d/y", "d/sub", "d/sub/z", "e", "e/f", "lnk", "emptyd", "n"]
WORDS = ["1", "2"]


def _op(kind: str, p: str, q: str, w: str) -> str:
    return {
        "write": f"rm -rf {p}; printf {w} > {p}",
        "append": f"printf {w} >> {p}",
        "chmod": f"chmod {'700' if w == '1' else '750'} {p}",
        "rm": f"rm -rf {p}",
        "mkdir": f"rm -rf {p}; mkdir -p {p}/q && printf {w} > {p}/q/w{w}",
        "symlink": f"rm -rf {p}; ln -s t{w} {p}",
        "mv": f"mv -T {p} {q}",
        "new-in": f"mkdir -p {p} && printf {w} > {p}/new{w}",
    }[kind]


ops = st.builds(
    _op,
    st.sampled_from(["write", "append", "chmod", "rm", "mkdir", "symlink", "mv", "new-in"]),
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
    st.sampled_from(WORDS),
)
scripts = st.lists(ops, min_size=1, max_size=3).map(
    lambda xs: "; ".join(f"{{ {x}; }} 2>/dev/null" for x in xs)
)


LOWER = {"d/sub/z", "e/f", "b"}  # with `stacked`, these come from a lower ref "lo" (d/ in both)


def _make(root: str, which: str = "all") -> None:
    os.makedirs(root)
    for rel, data in TREE.items():
        if which != "all" and (rel in LOWER) != (which == "lower"):
            continue
        p = os.path.join(root, rel)
        if data is None:
            os.makedirs(p, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if which != "lower":
        os.symlink("a", os.path.join(root, "lnk"))


Val = tuple[Any, ...] | None


def _vals(snap: dict[bytes, Item]) -> dict[str, Val]:
    """path -> what the merge rules compare (no mtimes; a directory by its mode)."""
    out: dict[str, Val] = {}
    for p, it in snap.items():
        if p:
            out[os.fsdecode(p)] = (
                ("dir", it.mode) if it.kind == "dir" else (it.kind, it.mode, it.data)
            )
    return out


def _is_dir(v: Val) -> bool:
    return v is not None and v[0] == "dir"


def model_merge(
    base: dict[str, Val], ours: dict[str, Val], theirs: dict[str, Val]
) -> dict[str, Val] | None:
    """The per-path three-way merge of ours (A) into theirs (B); None on a conflict."""
    out: dict[str, Val] = {}
    for p in sorted(base.keys() | ours.keys() | theirs.keys()):
        v0, va, vb = base.get(p), ours.get(p), theirs.get(p)
        if va == v0:
            r = vb
        elif vb == v0 or va == vb:
            r = va
        elif _is_dir(va) and _is_dir(vb):
            r = va  # a directory's own mode never conflicts: ours, the later side, wins
        elif _is_dir(v0) and _is_dir(va) != _is_dir(vb):
            r = vb if _is_dir(va) else va  # deleted or replaced on one side, only its mode
            # changed on the other (what changed inside it is a path of its own)
        else:
            return None
        if r is not None:
            out[p] = r
    for p in out:  # what is left must hang from a directory both sides let stand
        parent = os.path.dirname(p)
        if parent and not _is_dir(out.get(parent)):
            return None
    return out


def _view(store: Store, refs: list[str], dest: str) -> None:
    """Check out the refs stacked (the view a session of them shows)."""
    if len(refs) == 1:
        checkout_ref(store, refs[0], dest)
        return
    m = Manifests(store)
    try:
        with m.write() as txn:
            root = stack_roots(m, txn, [bytes.fromhex(m.resolve(txn, r)[1].root) for r in refs])
            checkout(store, m, txn, root, dest)
    finally:
        m.close()


def _pair(
    base: str, script_a: str, script_b: str, stacked: bool, b_ingests: bool, **kw: Any
) -> dict[str, Any]:
    src = os.path.join(base, "src")
    _make(src)
    store = Store.init(os.path.join(base, "store"))
    refs = ["lo", "t"] if stacked else ["t"]
    m = Manifests(store)
    try:
        if stacked:
            for name, which in (("lo", "lower"), ("t", "upper")):
                _make(os.path.join(base, name), which)
                ingest(store, m, os.path.join(base, name), name, jobs=1)
        else:
            ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    # The model: each script on a plain copy of the tree.
    model: dict[str, dict[str, Val]] = {"base": _vals(snapshot(src))}
    for side, script in (("a", script_a), ("b", script_b)):
        d = os.path.join(base, f"model-{side}")
        shutil.copytree(src, d, symlinks=True)
        subprocess.run(["sh", "-c", f"cd {d} && {script}; true"], check=True)
        model[side] = _vals(snapshot(d))
    pa, pb = os.path.join(base, "pa"), os.path.join(base, "pb")
    started, go = os.path.join(base, "started"), os.path.join(base, "go")
    wait = f"touch {started}; while [ ! -e {go} ]; do sleep 0.02; done"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # A: changes, then waits until B has committed
        os.close(rfd)
        try:
            argv = ["sh", "-c", f"cd {pa} && {script_a}; {wait}"]
            res = run_session(store, refs, argv, at=pa, **kw)
            os.write(wfd, repr((res.commit, res.conflict_ref, res.conflicts)).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    deadline = time.monotonic() + 30
    while not os.path.exists(started):
        assert time.monotonic() < deadline, "session A did not start"
        time.sleep(0.02)
    if b_ingests:  # B: the source changed by hand, then ingested again into the ref
        subprocess.run(["sh", "-c", f"cd {src} && {script_b}; true"], check=True)
        m = Manifests(store)
        try:
            b_commit = ingest(store, m, src, "t", jobs=1).commit
        finally:
            m.close()
    else:
        argv = ["sh", "-c", f"cd {pb} && {script_b}; true"]
        b_commit = run_session(store, refs, argv, at=pb, **kw).commit
    after_b = os.path.join(base, "after-b")
    _view(store, refs, after_b)
    with open(go, "w"):
        pass
    out = b""
    while chunk := os.read(rfd, 4096):
        out += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    commit_a, kept, conflicts = eval(out.decode())  # noqa: S307 - our own repr
    got: dict[str, dict[str, Val]] = {"after_b": _vals(snapshot(after_b))}
    final = os.path.join(base, "final")
    _view(store, refs, final)
    got["final"] = _vals(snapshot(final))
    if kept:
        kept_dir = os.path.join(base, "kept")
        _view(store, [*refs[:-1], kept], kept_dir)
        got["kept"] = _vals(snapshot(kept_dir))
    return {
        "model": model,
        "got": got,
        "b_commit": b_commit,
        "commit": commit_a,
        "kept": kept,
        "conflicts": conflicts,
    }


def check_pair(
    mode: str,
    script_a: str,
    script_b: str,
    *,
    stacked: bool = False,
    b_ingests: bool = False,
    must_merge: bool = False,
    **kw: Any,
) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _pair, base, script_a, script_b, stacked, b_ingests, **kw)
    model, got = r["model"], r["got"]
    why = f"A: {script_a}\nB: {script_b}\n{r['conflicts']}"
    assert got["after_b"] == model["b"], why  # B met an unmoved ref: its tree as it left it
    want = model_merge(model["base"], model["a"], model["b"])
    if r["kept"]:
        assert not must_merge, f"kept as a conflict: {why}"
        assert r["commit"] is None and r["conflicts"], why
        assert got["final"] == model["b"], why
        assert got["kept"] == model["a"], why  # nothing of A is lost
        return
    assert want is not None, f"merged what the model calls a conflict:\n{why}\n{got['final']}"
    assert got["final"] == want, why


@pytest.mark.parametrize("mode", mode_params("native", "rootfree"))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script_a=scripts, script_b=scripts)
@example(  # A writes inside d (its mtime), B chmods d: B's mode was undone by A's merge
    script_a="{ rm -rf d/x; printf 1 > d/x; } 2>/dev/null", script_b="{ chmod 700 d; } 2>/dev/null"
)
def test_two_sessions_end_as_the_model_merges(mode: str, script_a: str, script_b: str) -> None:
    check_pair(mode, script_a, script_b)


@pytest.mark.parametrize("mode", mode_params("native"))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script_a=scripts, script_b=scripts)
def test_two_stacked_sessions_end_as_the_model_merges(
    mode: str, script_a: str, script_b: str
) -> None:
    """The same with two refs stacked (lo below t): the change goes to t, deletions of lo's
    paths as masks; the stacked view after both is what the model merged."""
    check_pair(mode, script_a, script_b, stacked=True)


@pytest.mark.parametrize("mode", mode_params("native", "rootfree"))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script_a=scripts, script_b=scripts)
def test_a_session_and_a_reingest_end_as_the_model_merges(
    mode: str, script_a: str, script_b: str
) -> None:
    """B is the ref's source changed by hand and ingested again while A runs (projected
    elsewhere): the re-ingest lands first, A's end merges over it."""
    check_pair(mode, script_a, script_b, b_ingests=True)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script_a=scripts, script_b=scripts)
def test_two_shim_sessions_end_as_the_model_merges(script_a: str, script_b: str) -> None:
    check_pair("rootfree", script_a, script_b, backend="shim")


@pytest.mark.parametrize("mode", mode_params("native", "rootfree"))
@pytest.mark.parametrize("stacked", [False, True], ids=["one-ref", "stacked"])
def test_files_written_into_one_new_directory_merge(mode: str, stacked: bool) -> None:
    """Each session writes its own file into a directory the ref does not have (new, or only
    the lower ref's in a stack, which the top ref gets as a new one): both files are kept, no
    conflict (both sides' whole new directories conflicted)."""
    for where in ("n", "e") if stacked else ("n",):
        a = f"mkdir -p {where} && printf 1 > {where}/one"
        b = f"mkdir -p {where} && printf 2 > {where}/two"
        check_pair(mode, a, b, stacked=stacked, must_merge=True)


def _ingest_after(base: str, script_a: str, script_b: str) -> dict[str, Any]:
    from veloverlay.errors import Reason, VeloError

    src = os.path.join(base, "src")
    _make(src)
    store = Store.init(os.path.join(base, "store"))
    model: dict[str, dict[str, Val]] = {"base": _vals(snapshot(src))}
    for side, script in (("a", script_a), ("b", script_b)):
        d = os.path.join(base, f"model-{side}")
        shutil.copytree(src, d, symlinks=True)
        subprocess.run(["sh", "-c", f"cd {d} && {script}; true"], check=True)
        model[side] = _vals(snapshot(d))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    pa = os.path.join(base, "pa")
    run_session(store, ["t"], ["sh", "-c", f"cd {pa} && {script_a}; true"], at=pa)
    subprocess.run(["sh", "-c", f"cd {src} && {script_b}; true"], check=True)
    refused = False
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    except VeloError as exc:
        assert exc.reason is Reason.CONFLICT, exc
        refused = True
    finally:
        m.close()
    final = os.path.join(base, "final")
    checkout_ref(store, "t", final)
    return {"model": model, "final": _vals(snapshot(final)), "refused": refused}


@pytest.mark.parametrize("mode", mode_params("native", "rootfree"))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script_a=scripts, script_b=scripts)
def test_a_reingest_over_a_session_ends_as_the_model_merges(
    mode: str, script_a: str, script_b: str
) -> None:
    """A session commits A; then the source, changed by B, is ingested again: the source's
    change merges over the session's (the source, the later side, wins a directory's
    attributes), or the ingest refuses (conflict) and the ref stays A's tree."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _ingest_after, base, script_a, script_b)
    model = r["model"]
    why = f"A: {script_a}\nB: {script_b}"
    if r["refused"]:
        assert r["final"] == model["a"], why
        return
    want = model_merge(model["base"], model["b"], model["a"])
    assert want is not None, f"merged what the model calls a conflict:\n{why}\n{r['final']}"
    assert r["final"] == want, why
