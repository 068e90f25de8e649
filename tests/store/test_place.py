"""Where a store may lie, and what a store moved or replaced by name after its check receives.

Root writes into its store root-owned files it makes immutable: whoever can rename the store (or
a directory above it) can put there a store of their own whose fan-out directories are symbolic
links to any directory, and root's next ingest would name its objects there (a crontab line in
/etc/cron.d). So root refuses a store another user could move (every directory above it must be
root's and writable by root alone, a sticky one only holding root's next step), and every write
after the check goes by the descriptor of the directory checked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.trees import force_rmtree, make_tree
from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, run_unprivileged
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.lower import homes
from veloverlay.store.cas import Stage, Store
from veloverlay.verbs.repo import Repo

PAYLOAD = b"* * * * * root touch /tmp/velo-pwned\n"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="root's placement rule: run as root")


def _scratch() -> str:
    """A root-owned 0755 directory on /dev/shm (sticky, root's): a place root may use."""
    d = tempfile.mkdtemp(
        prefix="velo-place-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def scratch() -> Iterator[str]:
    d = _scratch()
    yield d
    force_rmtree(d)


def _evil_store(path: str, victim: str, tmp: str | None) -> None:
    """What a hostile user puts in the store's place: a store whose 256 fan-out directories are
    symbolic links to `victim`; its tmp/ a link to `tmp` when given (the real store's, which the
    attacker need not be able to read: the stages in it are then found by name)."""
    for d in ("objects-v2", "sessions", "locks-v1", "trees-v1"):
        os.makedirs(os.path.join(path, d))
    if tmp is None:
        os.mkdir(os.path.join(path, "tmp"))
    else:
        os.symlink(tmp, os.path.join(path, "tmp"))
    for i in range(256):
        os.symlink(victim, os.path.join(path, "objects-v2", f"{i:02x}"))


def _swap(store: str, victim: str, *, keep_tmp: bool) -> Callable[[], None]:
    def swap() -> None:
        os.rename(store, store + "-moved")
        _evil_store(store, victim, os.path.join(store + "-moved", "tmp") if keep_tmp else None)

    return swap


@pytest.mark.parametrize("at", ["stage", "publish"])
@pytest.mark.parametrize("refused", [True, False], ids=["held-check", "descriptors-only"])
def test_a_store_replaced_after_its_check_gets_nothing_into_the_replacement(
    scratch: str, monkeypatch: pytest.MonkeyPatch, at: str, refused: bool
) -> None:
    """The seam: between the check (Store.open) and the first write (the stage's opening), or
    between staging and naming (publish), the store's path is made to lead to another store whose
    shard directories are links to a victim directory. Nothing may land in the victim. With the
    check that the store is still where it was (`Store.held`) the ingest fails, store-unsafe;
    without it (`descriptors-only`), the writes still go to the store checked (by its
    descriptor), never through the links."""
    store = os.path.join(scratch, "store")
    victim = os.path.join(scratch, "victim")
    os.mkdir(victim, 0o755)
    src = os.path.join(scratch, "src")
    make_tree(src, {"cron": PAYLOAD, "other": b"more bytes\n"})
    repo = Repo.open(store, create=True)
    swap = _swap(store, victim, keep_tmp=at == "publish")
    if at == "stage":
        real_open = Stage.open

        def swapped_open(self: Stage) -> None:
            swap()
            real_open(self)

        monkeypatch.setattr(Stage, "open", swapped_open)
    else:
        real_publish = Stage.publish

        def swapped_publish(self: Stage, *a: object, **kw: object) -> int:
            swap()
            return real_publish(self, *a, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(Stage, "publish", swapped_publish)
    if not refused:
        monkeypatch.setattr(Store, "held", lambda self: None, raising=False)
    try:
        if refused:
            with pytest.raises(VeloError) as ei:
                ingest(repo.store, repo.m, src, "t", jobs=1)
            assert ei.value.reason is Reason.STORE_UNSAFE, ei.value
            assert "moved or replaced" in ei.value.message
            assert repo.refs() == []
        else:
            res = ingest(repo.store, repo.m, src, "t", jobs=1)
            assert res.new_objects == 2
    finally:
        repo.close()
    assert os.listdir(victim) == [], "root named an object in the directory a link led to"
    evil = os.path.join(store, "objects-v2")
    assert all(os.path.islink(os.path.join(evil, n)) for n in os.listdir(evil))
    if at == "stage":
        assert os.listdir(os.path.join(store, "tmp")) == [], "staged into the replacement"
    if not refused:  # the objects are in the store that was checked, now at its new name
        moved = Store.open(store + "-moved")
        assert sorted(n for n, _p in moved.iter_objects()) == sorted(
            h.hex() for h in (_digest(PAYLOAD), _digest(b"more bytes\n"))
        )
        moved.close()


def _digest(data: bytes) -> bytes:
    from veloverlay.store.digest import hash_bytes

    return hash_bytes(data)


@contextlib.contextmanager
def _owned_dir(uid: int, gid: int, mode: int) -> Iterator[str]:
    d = _scratch()
    try:
        parent = os.path.join(d, "parent")
        os.mkdir(parent)
        os.chown(parent, uid, gid)
        os.chmod(parent, mode)
        yield parent
    finally:
        force_rmtree(d)


@as_root
@pytest.mark.parametrize(
    ("uid", "gid", "mode", "why"),
    [
        (UNPRIV_UID, 0, 0o755, f"belongs to uid {UNPRIV_UID}"),
        (0, UNPRIV_GID, 0o775, "writable by others than its owner"),
        (0, 0, 0o777, "writable by others than its owner"),
    ],
    ids=["owned-by-another-user", "group-writable-by-another-group", "world-writable"],
)
def test_root_refuses_a_store_another_user_could_move(
    uid: int, gid: int, mode: int, why: str
) -> None:
    """As root: a store whose parent another user owns (a store in someone's home), or can
    write, is store-unsafe, naming that directory; a new one is not even made there."""
    with _owned_dir(uid, gid, mode) as parent:
        store = os.path.join(parent, "store")
        with pytest.raises(VeloError) as ei:
            Repo.open(store, create=True)
        assert ei.value.reason is Reason.STORE_UNSAFE
        assert why in ei.value.message and parent in ei.value.message, ei.value.message
        assert ei.value.hint and "move the store" in ei.value.hint.lower()
        assert os.listdir(parent) == []  # nothing made there
        # A store made elsewhere and moved there later is refused when opened.
        os.chown(parent, 0, 0)
        os.chmod(parent, 0o755)
        Repo.open(store, create=True).close()
        os.chown(parent, uid, gid)
        os.chmod(parent, mode)
        with pytest.raises(VeloError) as ei:
            Store.open(store)
        assert ei.value.reason is Reason.STORE_UNSAFE and parent in ei.value.message


@as_root
def test_root_refuses_a_store_reached_through_another_users_link(scratch: str) -> None:
    """A link on the way to the store (not only the store's own) that another user owns."""
    real = os.path.join(scratch, "real")
    os.mkdir(real)
    Repo.open(os.path.join(real, "store"), create=True).close()
    link = os.path.join(scratch, "via")
    os.symlink(real, link)
    os.lchown(link, UNPRIV_UID, UNPRIV_GID)
    with pytest.raises(VeloError) as ei:
        Store.open(os.path.join(link, "store"))
    assert ei.value.reason is Reason.STORE_UNSAFE
    assert "symbolic link that belongs to uid" in ei.value.message


@as_root
def test_root_refuses_a_store_in_another_users_directory_in_a_sticky_one() -> None:
    """/tmp/<a directory of another user>/store: the sticky rule wants the next step root's."""
    d = tempfile.mkdtemp(prefix="velo-place-", dir="/tmp")
    try:
        os.chown(d, UNPRIV_UID, UNPRIV_GID)
        with pytest.raises(VeloError) as ei:
            Repo.open(os.path.join(d, "store"), create=True)
        assert ei.value.reason is Reason.STORE_UNSAFE
        assert "sticky directory /tmp" in ei.value.message
    finally:
        force_rmtree(d)


@as_root
@pytest.mark.parametrize("where", ["tmp", "sticky-root-dir", "root-0755", "group-root-0775"])
def test_root_accepts_a_store_only_root_can_move(where: str) -> None:
    """/tmp (sticky, root's) holding a root-owned store, a root-owned 0755 directory, and one
    group-writable by root's own group: accepted."""
    top = tempfile.mkdtemp(prefix="velo-place-", dir="/tmp")
    try:
        store = os.path.join(top, "store")
        if where == "tmp":
            store = top  # the store itself right in /tmp
        elif where == "sticky-root-dir":
            os.chmod(top, 0o1777)
        elif where == "root-0755":
            os.chmod(top, 0o755)
        elif where == "group-root-0775":
            os.chown(top, 0, 0)
            os.chmod(top, 0o775)
        Repo.open(store, create=True).close()
        assert Store.open(store).root == Path(store)
    finally:
        force_rmtree(top)


def _own_store(base: str) -> str:
    src = os.path.join(base, "src")
    make_tree(src, {"f": b"mine\n"})
    repo = Repo.open(os.path.join(base, "home", "store"), create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        return str(repo.refs()[0][0].name)
    finally:
        repo.close()


@as_root
def test_a_user_may_keep_a_store_in_their_own_home() -> None:
    """The rule is root's: a user's own store in a directory that user owns (a home) is theirs
    to place, and works."""
    d = _scratch()
    try:
        base = os.path.join(d, "u")
        os.mkdir(base)
        os.chown(base, UNPRIV_UID, UNPRIV_GID)
        assert run_unprivileged(_own_store, base) == "t"
    finally:
        force_rmtree(d)


@as_root
def test_roots_per_boot_cache_is_not_built_where_another_user_could_move_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rule for VELO_RUNTIME_DIR (root's data-only layers): a directory another user
    owns is not used (the layers go to the store), and nothing is made in it."""
    with _owned_dir(UNPRIV_UID, UNPRIV_GID, 0o755) as parent:
        monkeypatch.setenv("VELO_RUNTIME_DIR", parent)
        path, why = homes.base()
        assert path is None
        assert f"belongs to uid {UNPRIV_UID}" in why, why
        assert os.listdir(parent) == []
    d = _scratch()
    try:
        monkeypatch.setenv("VELO_RUNTIME_DIR", d)
        path, why = homes.base()
        assert path == os.path.join(d, "veloverlay-0"), why
    finally:
        force_rmtree(d)


def test_the_store_lock_and_stages_go_by_the_descriptor(scratch: str) -> None:
    """A Store opened, then its path pointed elsewhere: its lock and stages are still its own
    (made relative to the directory held), and a stage refuses to open (store-unsafe)."""
    store = os.path.join(scratch, "store")
    Repo.open(store, create=True).close()
    s = Store.open(store)
    try:
        os.rename(store, store + "-moved")
        other = Path(scratch) / "other"
        os.mkdir(other)
        os.symlink(other, store)
        with s.lock():
            pass
        assert os.path.exists(os.path.join(store + "-moved", "lock"))
        assert os.listdir(other) == []
        with pytest.raises(VeloError) as ei, s.stage():
            pass
        assert ei.value.reason is Reason.STORE_UNSAFE
        assert os.listdir(other) == []
    finally:
        s.close()
