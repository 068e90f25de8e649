"""Root ingesting a tree another user owns never reads outside that tree.

The tree's owner can swap any directory of it for a symbolic link (one renameat2 RENAME_EXCHANGE)
while root walks it. Each test swaps at one step of the walk, deterministically, through the seam
`scan.race_point` (called after a directory is listed, before a handed-back task's directory is
opened, before a file or symlink is read, before the top is opened and before --adopt renames the
source): a subdirectory, the top, a parent of the top, a file's directory, a file itself. The
victim is a root-only directory (0700) holding a 0600 file; its bytes (and a symlink target kept
there) must never reach the store, and a directory replaced after it was listed fails the ingest
as source-unstable. The last test has the tree owned by a second user, who makes the swap itself.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from veloverlay import _libc
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import scan
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

SECRET = b"root's private key " + os.urandom(12).hex().encode()
SECRET_TARGET = b"/secret-target-" + os.urandom(6).hex().encode()
MINE = b"the owner's own key file"


@pytest.fixture
def victim(shm_tmp: str) -> str:
    """Root's directory: 0700, a 0600 `key` and a symlink `ln`, in it and in its subdirectories
    `sub` and `deeper`: a path of the tree walked through a swapped link finds them."""
    v = os.path.join(shm_tmp, "victim")
    os.mkdir(v, 0o700)
    for d in (v, os.path.join(v, "sub"), os.path.join(v, "deeper")):
        os.makedirs(d, 0o700, exist_ok=True)
        fd = os.open(os.path.join(d, "key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, SECRET)
        os.close(fd)
        os.symlink(SECRET_TARGET, os.path.join(d, "ln"))
    return v


def _tree(base: str) -> str:
    """tree/{a.txt, sub/{key, ln -> harmless, deeper/x}}."""
    top = os.path.join(base, "tree")
    os.makedirs(os.path.join(top, "sub", "deeper"))
    for rel, data in (("a.txt", b"top"), ("sub/key", MINE), ("sub/deeper/x", b"x")):
        with open(os.path.join(top, rel), "wb") as f:
            f.write(data)
    os.symlink("harmless", os.path.join(top, "sub", "ln"))
    return top


def _exchange(path: str, target: str) -> None:
    """The attacker's move: one renameat2(RENAME_EXCHANGE) puts a symlink to `target` at `path`
    (the entry that was there ends up at `path`.swapped, outside nothing: same directory)."""
    if os.path.islink(path):
        return  # swapped already (a worker process made the same call)
    aside = path + ".swapped"
    os.symlink(target, aside)
    _libc.renameat2(
        _libc.AT_FDCWD, os.fsencode(path), _libc.AT_FDCWD, os.fsencode(aside), _libc.RENAME_EXCHANGE
    )


def _unswap(path: str) -> None:
    """Undo `_exchange`: the directory back at `path`, the symlink gone."""
    aside = os.fsencode(path + ".swapped")
    _libc.renameat2(_libc.AT_FDCWD, os.fsencode(path), _libc.AT_FDCWD, aside, _libc.RENAME_EXCHANGE)
    os.unlink(aside)


def _at(what: str, rel: bytes, act: Callable[[], None]) -> Callable[[str, bytes], None]:
    """A race_point that runs `act` when the walk reaches (what, rel)."""

    def point(w: str, r: bytes) -> None:
        if (w, r) == (what, rel):
            act()

    return point


def _store_holds(repo: Repo, *needles: bytes) -> list[str]:
    """Every file of the store (objects, staging, LMDB) holding one of `needles`."""
    found = [f"object {hash_bytes(n).hex()}" for n in needles if repo.store.has(hash_bytes(n))]
    for dirpath, _dirs, files in os.walk(repo.store.root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                data = f.read()
            found += [p for n in needles if n in data]
    return found


def _unstable(repo: Repo, src: str, **kw: object) -> VeloError:
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, src, "t", **kw)  # type: ignore[arg-type]
    assert ei.value.reason is Reason.SOURCE_UNSTABLE, ei.value
    assert "replaced" in ei.value.message or "removed" in ei.value.message, ei.value.message
    return ei.value


@pytest.fixture
def no_openat2(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """With param True, openat2 is refused as a seccomp filter would (ENOSYS): the walk opens
    a handed-back directory component by component instead."""
    if request.param:

        def refused(*_a: object, **_kw: object) -> int:
            raise OSError(errno.ENOSYS, "openat2 filtered")

        monkeypatch.setattr(_libc, "openat2", refused)
    yield request.param


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("into", ["symlink", "directory"])
def test_a_subdirectory_swapped_after_its_parent_was_listed(
    repo: Repo, shm_tmp: str, victim: str, monkeypatch: pytest.MonkeyPatch, jobs: int, into: str
) -> None:
    """In one task: tree/ is listed, then tree/sub becomes a symlink to the victim (or another
    directory, put there by rename) before the walk enters it."""
    top = _tree(shm_tmp)
    sub = os.path.join(top, "sub")
    other = os.path.join(shm_tmp, "other")
    os.mkdir(other)

    def swap() -> None:
        if into == "symlink":
            _exchange(sub, os.path.join(victim, "sub"))
        elif not os.path.exists(sub + ".moved"):
            os.rename(sub, sub + ".moved")
            os.rename(other, sub)

    monkeypatch.setattr(scan, "race_point", _at("listed", b"", swap))
    _unstable(repo, top, jobs=jobs)
    assert os.path.lexists(sub + (".swapped" if into == "symlink" else ".moved"))  # it ran
    assert _store_holds(repo, SECRET, SECRET_TARGET) == []
    with repo.m.read() as txn:
        assert repo.m.refs(txn) == []


@pytest.mark.parametrize("no_openat2", [False, True], indirect=True)
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_handed_back_subdirectory_swapped_before_its_task_opens_it(
    repo: Repo,
    shm_tmp: str,
    victim: str,
    monkeypatch: pytest.MonkeyPatch,
    jobs: int,
    no_openat2: bool,
) -> None:
    """Across tasks: the budget is spent on tree/, sub/ is handed back by its path; sub (and,
    second case, deeper's parent on the way to sub/deeper) is a symlink when the task starts."""
    monkeypatch.setattr(scan, "BUDGET", 1)
    top = _tree(shm_tmp)
    sub = os.path.join(top, "sub")
    monkeypatch.setattr(
        scan, "race_point", _at("task", b"sub", lambda: _exchange(sub, os.path.join(victim, "sub")))
    )
    _unstable(repo, top, jobs=jobs)
    assert os.path.islink(sub)
    assert _store_holds(repo, SECRET, SECRET_TARGET) == []
    _unswap(sub)
    # A component on the way to a deeper handed-back task.
    monkeypatch.setattr(
        scan, "race_point", _at("task", b"sub/deeper", lambda: _exchange(sub, victim))
    )
    _unstable(repo, top, jobs=jobs)
    assert os.path.islink(sub)
    assert _store_holds(repo, SECRET, SECRET_TARGET) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_files_directory_swapped_before_the_file_is_read(
    repo: Repo, shm_tmp: str, victim: str, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    """tree/sub is listed, then becomes a symlink to the victim before sub/key and sub/ln are
    read: what is read is still the listed directory's key and link, never the victim's."""
    top = _tree(shm_tmp)
    sub = os.path.join(top, "sub")
    swap = lambda: _exchange(sub, victim)  # noqa: E731
    monkeypatch.setattr(scan, "race_point", _at("file", b"sub/key", swap))
    res = ingest(repo.store, repo.m, top, "t", jobs=jobs)
    assert os.path.islink(sub)
    assert _store_holds(repo, SECRET, SECRET_TARGET) == []
    ents = {e.path: e for e in repo.ls("t", recursive=True)}
    assert repo.store.read_object(bytes.fromhex(ents[b"sub/key"].digest or "")) == MINE
    assert ents[b"sub/ln"].target == "harmless"
    assert res.files == 3


def test_a_file_swapped_for_a_symlink_is_skipped_as_changed(
    repo: Repo, shm_tmp: str, victim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = _tree(shm_tmp)
    key = os.path.join(top, "sub", "key")
    swap = lambda: _exchange(key, os.path.join(victim, "key"))  # noqa: E731
    monkeypatch.setattr(scan, "race_point", _at("file", b"sub/key", swap))
    res = ingest(repo.store, repo.m, top, "t", jobs=1)
    assert os.path.islink(key)
    assert ("sub/key", "changed") in res.skipped
    assert _store_holds(repo, SECRET) == []


@pytest.mark.parametrize("which", ["top", "parent"])
def test_the_top_swapped_after_the_path_was_resolved(
    repo: Repo, shm_tmp: str, victim: str, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """The path given is resolved, then the top (or a directory on the way to it) is swapped for
    a symlink before the walk opens it: the victim is never listed."""
    home = os.path.join(shm_tmp, "home")
    os.mkdir(home)
    top = _tree(home)
    if which == "top":
        swap = lambda: _exchange(top, os.path.join(victim, "sub"))  # noqa: E731
    else:
        os.rename(os.path.join(victim, "sub"), os.path.join(victim, "tree"))
        swap = lambda: _exchange(home, victim)  # noqa: E731
    monkeypatch.setattr(scan, "race_point", _at("top", b"", swap))
    _unstable(repo, top, jobs=1)
    assert os.path.islink(top if which == "top" else home)
    assert _store_holds(repo, SECRET, SECRET_TARGET) == []


def test_adopt_renames_only_inside_the_directory_it_ingested(
    repo: Repo, shm_tmp: str, victim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--adopt moves the source aside after a verifying re-ingest. A directory on the way swapped
    for a symlink meanwhile must not make root rename the victim's entry of the same name; the
    entry itself replaced by another directory is refused (nothing moved)."""
    home = os.path.join(shm_tmp, "home")
    os.mkdir(home)
    top = _tree(home)
    os.mkdir(os.path.join(victim, "tree"), 0o700)  # root's directory of the same name
    monkeypatch.setattr(scan, "race_point", _at("adopt", b"", lambda: _exchange(home, victim)))
    res = ingest(repo.store, repo.m, top, "t", jobs=1, adopt=True)
    assert os.path.isdir(os.path.join(victim, "tree"))  # root's directory stays where it was
    assert not os.path.lexists(os.path.join(victim, "tree.velo-adopted"))
    # what moved is the tree ingested, inside its own (now moved) parent
    assert os.path.isfile(os.path.join(home + ".swapped", "tree.velo-adopted", "a.txt"))
    assert res.adopted_to is not None
    # The entry replaced by another directory between the re-ingest and the rename: refused.
    home2 = os.path.join(shm_tmp, "home2")
    os.mkdir(home2)
    top2 = _tree(home2)
    other = os.path.join(shm_tmp, "other")
    os.mkdir(other)

    def replace() -> None:
        os.rename(top2, top2 + ".moved")
        os.rename(other, top2)

    monkeypatch.setattr(scan, "race_point", _at("adopt", b"", replace))
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, top2, "t2", jobs=1, adopt=True)
    assert ei.value.reason is Reason.SOURCE_UNSTABLE
    assert os.path.isdir(top2) and not os.path.lexists(top2 + ".velo-adopted")


def _exchange_as_owner(path: str, target: str) -> None:
    run_unprivileged(_exchange, path, target)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root: the victim must be root's alone")
@pytest.mark.parametrize("step", ["listed", "task", "file"])
def test_the_trees_owner_swaps_while_root_ingests(
    repo: Repo, victim: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """End to end with real identities: the tree belongs to a second user, who makes the swap
    itself (a process running as that uid, started at the step) while root ingests."""
    with unpriv_tmpdir() as base:
        top = _tree(base)
        for dirpath, dirs, files in os.walk(top):
            for n in [*dirs, *files, "."]:
                os.lchown(os.path.join(dirpath, n), UNPRIV_UID, UNPRIV_GID)
        sub = os.path.join(top, "sub")
        assert not run_unprivileged(os.access, os.path.join(victim, "sub", "key"), os.R_OK)
        if step == "task":
            monkeypatch.setattr(scan, "BUDGET", 1)
        rel = b"sub/key" if step == "file" else b"" if step == "listed" else b"sub"
        target = os.path.join(victim, "sub") if step != "file" else victim
        monkeypatch.setattr(
            scan, "race_point", _at(step, rel, lambda: _exchange_as_owner(sub, target))
        )
        if step == "file":
            ingest(repo.store, repo.m, top, "t", jobs=1)
            ents = {e.path: e for e in repo.ls("t", recursive=True)}
            assert repo.store.read_object(bytes.fromhex(ents[b"sub/key"].digest or "")) == MINE
        else:
            _unstable(repo, top, jobs=1)
        assert os.path.islink(sub) and os.stat(sub + ".swapped").st_uid == UNPRIV_UID
        assert _store_holds(repo, SECRET, SECRET_TARGET) == []


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_an_entry_removed_between_listing_and_stat_is_skipped_as_vanished(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A name the directory listing returned, removed before its lstat (a build deleting its
    temporary files while the tree is ingested): the ingest failed with a bare '[Errno 2] No
    such file or directory: 'f150'' (os-error), found by ingesting a tree while another
    process made and removed entries in a loop. It is skipped now as `vanished`, as a file
    gone when it is read was; the version holds the tree as it is after the removal."""
    from tests.helpers.trees import assert_same_tree
    from veloverlay.store.checkout import checkout

    top = _tree(shm_tmp)
    gone = os.path.join(top, "sub", "gone")
    if kind == "file":
        with open(gone, "wb") as f:
            f.write(b"soon gone")
    elif kind == "symlink":
        os.symlink("nowhere", gone)
    else:
        os.mkdir(gone)
    real_scandir = os.scandir
    removed: list[str] = []

    def scandir(where: object) -> object:
        it = real_scandir(where)  # type: ignore[call-overload]
        if not isinstance(where, int):
            return it

        class Listing:  # the real listing; `gone` removed right after it was listed
            def __enter__(self) -> Listing:
                return self

            def __exit__(self, *exc: object) -> None:
                it.close()

            def __iter__(self) -> Iterator[os.DirEntry[str]]:
                for de in it:
                    if de.name == "gone" and not removed:
                        (os.rmdir if kind == "directory" else os.unlink)(gone)
                        removed.append(de.name)
                    yield de

        return Listing()

    monkeypatch.setattr(os, "scandir", scandir)
    res = ingest(repo.store, repo.m, top, "t", jobs=1)
    monkeypatch.undo()
    assert removed == ["gone"]
    assert ("sub/gone", "vanished") in res.skipped, res.skipped
    co = os.path.join(shm_tmp, "co")
    with repo.m.read() as txn:
        checkout(repo.store, repo.m, txn, bytes.fromhex(repo.m.resolve(txn, "t")[1].root), co)
    assert_same_tree(co, top, dir_mtimes=False)
