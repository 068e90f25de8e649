"""Baked absolute paths: found near the top of a tree, cached per root, and carried to a new
root without a new search when the changes since cannot matter."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.session._util import mode_params
from veloverlay.ingest import ingest
from veloverlay.session import relocation
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.verbs.repo import Repo


def _put_file(repo: Repo, root: bytes, path: bytes, data: bytes) -> bytes:
    with repo.store.stage() as st:
        digest = st.add_bytes(data)
        st.publish()
    entry = Entry(path.rpartition(b"/")[2], Kind.FILE, 0o755, len(data), 1, digest, b"", 2)
    with repo.m.write() as txn:
        return repo.m.apply(txn, root, [Op(OpKind.PUT, path, entry)])


def _venv(shm_tmp: str) -> str:
    venv = os.path.join(shm_tmp, "venv")
    os.makedirs(f"{venv}/bin")
    os.makedirs(f"{venv}/lib/deep/er")
    with open(f"{venv}/pyvenv.cfg", "w") as f:
        f.write(f"home = /usr/bin\ncommand = /usr/bin/python3 -m venv {venv}\n")
    with open(f"{venv}/bin/pip", "w") as f:
        f.write(f"#!{venv}/bin/python\n")
    with open(f"{venv}/lib/deep/er/mod.py", "w") as f:
        f.write("x = 1\n")
    return venv


def test_found_cached_and_carried(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = _venv(shm_tmp)
    with open(f"{venv}/bin/other", "w") as f:
        f.write(f"#!{venv}2/bin/python\n")  # a longer path that only starts like it
    root = bytes.fromhex(ingest(repo.store, repo.m, venv, "v", jobs=1).root)
    count, found = relocation.cached_find_baked(repo.store, repo.m, root, venv)
    assert (count, found) == (2, ["pyvenv.cfg", "bin/pip"])

    # A change deep down (outside what the search looks at): the answer is carried over.
    deep = _put_file(repo, root, b"lib/deep/er/mod2.py", f"# {venv}/x\n".encode())

    def no_search(*_a: object, **_k: object) -> None:
        raise AssertionError("searched again")

    monkeypatch.setattr(relocation, "find_baked", no_search)
    assert relocation.cached_find_baked(repo.store, repo.m, deep, venv, ancestors=[root]) == (
        2,
        ["pyvenv.cfg", "bin/pip"],
    )
    monkeypatch.undo()
    # A new script in bin/: searched again, and found.
    more = _put_file(repo, deep, b"bin/tool", f"#!{venv}/bin/python\n".encode())
    count, found = relocation.cached_find_baked(repo.store, repo.m, more, venv, ancestors=[deep])
    assert count == 3 and "bin/tool" in found


def test_a_commit_carries_the_answer_to_its_new_root(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`carry_forward` (a commit's last step): an answer cached for the old root is the new
    root's when the change cannot matter — found then with no search and no diff — and not when
    it can (a new script in bin/)."""
    venv = _venv(shm_tmp)
    root = bytes.fromhex(ingest(repo.store, repo.m, venv, "v", jobs=1).root)
    answer = relocation.cached_find_baked(repo.store, repo.m, root, venv)
    assert answer == (2, ["pyvenv.cfg", "bin/pip"])
    deep_op = [Op(OpKind.PUT, b"lib/deep/er/mod.py", None)]  # only its path and kind matter
    deep = _put_file(repo, root, b"lib/deep/er/mod.py", f"# {venv}\n".encode())
    relocation.carry_forward(repo.store, root, deep, deep_op)

    def no_search(*_a: object, **_k: object) -> None:
        raise AssertionError("searched again")

    def no_diff(*_a: object, **_k: object) -> None:
        raise AssertionError("diffed")

    with monkeypatch.context() as mp:
        mp.setattr(relocation, "find_baked", no_search)
        mp.setattr(type(repo.m), "diff", no_diff)
        assert relocation.cached_find_baked(repo.store, repo.m, deep, venv) == answer
    tool = _put_file(repo, deep, b"bin/tool", f"#!{venv}/bin/python\n".encode())
    relocation.carry_forward(repo.store, deep, tool, [Op(OpKind.PUT, b"bin/tool", None)])
    count, found = relocation.cached_find_baked(repo.store, repo.m, tool, venv)
    assert count == 3 and "bin/tool" in found


@pytest.mark.needs("root", "overlay_root")
def test_a_session_commit_leaves_the_next_session_nothing_to_search(shm_tmp: str) -> None:
    """A session projected away from its ingest path, whose commit changes a file deep down:
    the answer for the new root is cached by the commit (the next session's start needs no
    search and no diff)."""
    from tests.session._util import as_mode, run_session

    def head_root(path: str) -> bytes:
        r = Repo.open(path)
        try:
            with r.m.read() as txn:
                ref = r.m.get_ref(txn, "v")
                assert ref is not None
                return bytes.fromhex(r.m.get_commit(txn, ref.head).root)
        finally:
            r.close()

    venv = _venv(shm_tmp)
    path = os.path.join(shm_tmp, "store")
    r = Repo.open(path, create=True)
    ingest(r.store, r.m, venv, "v", jobs=1)
    store = r.store
    r.close()
    before = head_root(path)
    at = os.path.join(shm_tmp, "at")
    script = f"printf 'y = 2\\n' >> {at}/lib/deep/er/mod.py"

    def one() -> tuple[str | None, list[str]]:
        res = run_session(store, ["v"], ["sh", "-c", script], at=at)
        return res.commit, res.warnings

    commit, warnings = as_mode("root", one)
    assert commit and any("pyvenv.cfg" in w for w in warnings), warnings
    after = head_root(path)
    assert after != before
    cached = sorted(p.name for p in (store.trees / "relocation").iterdir())
    assert any(n.startswith(before.hex()) for n in cached), cached
    assert any(n.startswith(after.hex()) for n in cached), cached


def _alias_swapped(base: str) -> tuple[str, str]:
    """A venv projected away from its ingest path, whose ingest path is, by the time the session
    binds the projection over it, a symlink to another directory (as its owner can make it
    between the manager's check and the bind). Returns the session's error (reason, message)."""
    from tests.session._util import run_session
    from veloverlay.errors import VeloError
    from veloverlay.session.overlay import backend

    venv = _venv(base)
    r = Repo.open(os.path.join(base, "store"), create=True)
    try:
        ingest(r.store, r.m, venv, "v", jobs=1)
    finally:
        r.close()
    victim = os.path.join(base, "victim")
    os.mkdir(victim)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("mine\n")
    os.rename(venv, venv + ".old")
    os.symlink(victim, venv)
    backend.source_alias = lambda store, original, target: original  # the manager's old answer
    at, out = os.path.join(base, "at"), os.path.join(base, "out")
    try:
        run_session(r.store, ["v"], ["sh", "-c", f"ls {victim} > {out}"], at=at)
    except VeloError as exc:
        return exc.reason.value, str(exc)
    with open(out) as f:
        return "ran", f.read()


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_the_ingest_path_is_pinned_before_the_projection_covers_it(mode: str) -> None:
    from tests.helpers.unpriv import unpriv_tmpdir
    from tests.session._util import as_mode

    with unpriv_tmpdir() as base:
        reason, text = as_mode(mode, _alias_swapped, base)
        with open(os.path.join(base, "victim", "keep")) as f:
            assert f.read() == "mine\n"
    assert reason == "target-invalid" and "/venv: Not a directory" in text, (reason, text)


def _store_moved_into_source(base: str) -> tuple[int, bool]:
    """The store moved into the tree's ingest path after the ingest: projected elsewhere, the
    session cannot show the projection at the ingest path too (that would hide the store it
    binds read-only, and the session failed with ENOENT): no alias, the session runs."""
    import shutil

    from tests.session._util import run_session
    from veloverlay.store.cas import Store

    src = os.path.join(base, "src")
    os.mkdir(src)
    with open(os.path.join(src, "a"), "w") as f:
        f.write("a\n")
    r = Repo.open(os.path.join(base, "store"), create=True)
    try:
        ingest(r.store, r.m, src, "s", jobs=1)
    finally:
        r.close()
    subprocess.run(["chattr", "-R", "-i", os.path.join(base, "store")], stderr=subprocess.DEVNULL)
    shutil.move(os.path.join(base, "store"), os.path.join(src, ".store"))
    store = Store(os.path.join(src, ".store"))
    at = os.path.join(base, "at")
    res = run_session(store, ["s"], ["sh", "-c", f"cat {at}/a > {at}/b"], at=at)
    return res.exit_status, res.commit is not None


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_store_inside_the_ingest_path_keeps_the_session_running(mode: str) -> None:
    from tests.helpers.unpriv import unpriv_tmpdir
    from tests.session._util import as_mode

    with unpriv_tmpdir() as base:
        assert as_mode(mode, _store_moved_into_source, base) == (0, True)
