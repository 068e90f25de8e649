"""`checkout REF DEST` puts the whole tree at DEST or nothing.

Checkout wrote straight into DEST: killed midway (Ctrl-C, SIGKILL, a full disk, a damaged
object) it left a partial tree there, and the rerun refused it ("DEST is not empty") until the
user removed it by hand — after checking it was not something of theirs. The tree is now written
beside DEST and renamed into place when complete; what a killed checkout left beside it is
removed by the next one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import cli
from tests.helpers.trees import assert_same_tree, make_tree, unprotect
from veloverlay.store.digest import hash_bytes

SPEC: dict[str, object] = {
    **{f"d{i % 3}/f{i:02d}": f"content {i}\n".encode() for i in range(30)},
    "link": ("link", "d0/f00"),
    "empty": None,
}


def velo(store: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return cli.velo(store, *args, fault=fault, timeout=120)


@pytest.fixture
def world(shm_tmp: str) -> tuple[str, str, str]:
    """(store, source tree, a directory to check out into)."""
    store, src, out = (os.path.join(shm_tmp, n) for n in ("store", "src", "out"))
    make_tree(src, SPEC)
    os.chmod(os.path.join(src, "d1"), 0o750)
    os.mkdir(out)
    p = velo(store, "ingest", src, "--name", "t")
    assert p.returncode == 0, p.stderr
    return store, src, out


def _left_beside(out: str) -> list[str]:
    return sorted(os.listdir(out))


@pytest.mark.parametrize("existing", [False, True], ids=["new-dest", "empty-dest"])
def test_a_checkout_killed_midway_leaves_nothing_and_the_rerun_works(
    world: tuple[str, str, str], existing: bool
) -> None:
    store, src, out = world
    dest = os.path.join(out, "dest")
    if existing:
        os.mkdir(dest)
    killed = velo(store, "checkout", "t", dest, fault="checkout.file:5")
    assert killed.returncode == -9, killed.stderr
    # nothing at DEST: no partial tree (the old code left 4 files there)
    if existing:
        assert os.listdir(dest) == []
    else:
        assert not os.path.lexists(dest)
    again = velo(store, "checkout", "t", dest)
    assert again.returncode == 0, again.stderr  # old: "dest is not empty"
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]  # the killed run's partial tree was removed too


def test_a_failed_checkout_removes_what_it_wrote(world: tuple[str, str, str]) -> None:
    """A damaged object stops the checkout (object-corrupt): DEST stays absent, nothing beside."""
    store, _src, out = world
    h = hash_bytes(b"content 17\n").hex()
    victim = os.path.join(store, "objects-v2", h[:2], h)
    unprotect(victim)
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.write(b"CONTENT")  # same size, other bytes
    dest = os.path.join(out, "dest")
    p = velo(store, "--debug", "checkout", "t", dest)
    assert p.returncode == 1 and b"reason: object-corrupt" in p.stderr, p.stderr
    assert _left_beside(out) == []


def test_the_destination_keeps_the_tree_s_own_mode_and_mtime(world: tuple[str, str, str]) -> None:
    """An existing empty destination is replaced by the tree: it ends with the tree's root
    mode and mtime, as when it was written in place, and is ours, a directory, not a link."""
    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest, 0o700)
    p = velo(store, "checkout", "t", dest)
    assert p.returncode == 0, p.stderr
    st, sst = os.lstat(dest), os.lstat(src)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(sst.st_mode)
    assert st.st_mtime_ns == sst.st_mtime_ns
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]


def test_a_symlink_as_the_destination_is_refused_and_says_so(
    world: tuple[str, str, str],
) -> None:
    store, _src, out = world
    os.mkdir(os.path.join(out, "real"))
    os.symlink("real", os.path.join(out, "link"))
    p = velo(store, "checkout", "t", os.path.join(out, "link"))
    assert p.returncode == 1
    assert b"symbolic link" in p.stderr, p.stderr
    assert os.listdir(os.path.join(out, "real")) == []
    assert _left_beside(out) == ["link", "real"]


@pytest.mark.skipif(os.geteuid() != 0, reason="root checks out into another user's directory")
def test_an_empty_destination_of_another_user_or_a_mount_point_is_written_into(
    world: tuple[str, str, str],
) -> None:
    """These cannot be replaced by the finished tree without taking the directory from its
    owner (or failing: EBUSY for a mount point): the tree is written into them, as before, and
    the directory stays theirs (same inode, same owner)."""
    from tests.helpers.unpriv import UNPRIV_UID

    store, src, out = world
    theirs = os.path.join(out, "theirs")
    os.mkdir(theirs)
    os.chown(theirs, UNPRIV_UID, UNPRIV_UID)
    before = os.lstat(theirs)
    p = velo(store, "checkout", "t", theirs)
    assert p.returncode == 0, p.stderr
    after = os.lstat(theirs)
    assert (after.st_ino, after.st_uid) == (before.st_ino, UNPRIV_UID)
    assert_same_tree(src, theirs)
    backing, mnt = os.path.join(out, "backing"), os.path.join(out, "mnt")
    os.mkdir(backing)
    os.mkdir(mnt)
    subprocess.run(["mount", "--bind", backing, mnt], check=True)
    try:
        p = velo(store, "checkout", "t", mnt)
        assert p.returncode == 0, p.stderr
        assert_same_tree(src, backing)  # into the mount, not beside it
    finally:
        subprocess.run(["umount", mnt], check=True)
    assert sorted(_left_beside(out)) == ["backing", "mnt", "theirs"]


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "no-renameat2-flags"])
def test_what_someone_writes_into_the_empty_destination_meanwhile_stays(
    world: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch, noreplace: bool
) -> None:
    """A file written into the empty destination while the tree is being written beside it is
    the writer's: the checkout fails (exists) and leaves it there, never moved or removed. Also
    where the filesystem refuses renameat2's flags (EINVAL: some FUSE and network ones)."""
    import errno

    from veloverlay import _libc, faults
    from veloverlay.errors import Reason, VeloError
    from veloverlay.verbs.repo import Repo

    store, _src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest, 0o700)
    if not noreplace:

        def refuse(*_a: object) -> None:
            raise OSError(errno.EINVAL, "not supported")

        monkeypatch.setattr(_libc, "renameat2", refuse)
    real_point = faults.point

    def write_meanwhile(name: str) -> None:
        if name == "checkout.file" and not os.path.exists(os.path.join(dest, "theirs")):
            with open(os.path.join(dest, "theirs"), "w") as f:
                f.write("mine, not the tree's\n")
        real_point(name)

    monkeypatch.setattr(faults, "point", write_meanwhile)
    repo = Repo.open(store)
    try:
        with pytest.raises(VeloError) as exc:
            repo.checkout("t", dest)
    finally:
        repo.m.close()
    assert exc.value.reason is Reason.EXISTS
    assert os.listdir(dest) == ["theirs"]
    with open(os.path.join(dest, "theirs")) as f:
        assert f.read() == "mine, not the tree's\n"
    assert _left_beside(out) == ["dest"]


def test_a_filesystem_without_renameat2_flags_still_gets_the_whole_tree(
    world: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from veloverlay import _libc
    from veloverlay.verbs.repo import Repo

    store, src, out = world

    def refuse(*_a: object) -> None:
        raise OSError(errno.EINVAL, "not supported")

    monkeypatch.setattr(_libc, "renameat2", refuse)
    repo = Repo.open(store)
    try:
        for dest in (os.path.join(out, "new"), os.path.join(out, "empty")):
            if dest.endswith("empty"):
                os.mkdir(dest)
            repo.checkout("t", dest)
            assert_same_tree(src, dest)
    finally:
        repo.m.close()
    assert _left_beside(out) == ["empty", "new"]


@pytest.mark.parametrize("how", [".", "absolute"])
def test_checkout_into_the_callers_working_directory_keeps_it(
    world: tuple[str, str, str], how: str
) -> None:
    """`mkdir d && cd d && veloverlay checkout REF . && ls`: the tree is in the directory the
    shell is in. Replacing the empty DEST by the finished tree left the shell in a deleted,
    empty directory (`ls` showed nothing, later commands ran nowhere)."""
    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest)
    target = "." if how == "." else dest
    script = f'"$1" -m veloverlay checkout t {target} >/dev/null && ls -A'
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    env.pop("VELO_INTERNAL__TEST_FAULT", None)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    p = subprocess.run(
        ["sh", "-c", script, "sh", sys.executable],
        cwd=dest,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.decode().split()) == sorted(os.listdir(src))  # old: nothing
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]


def _rename(parent: str, old: str, new: str) -> None:
    os.rename(os.path.join(parent, old), os.path.join(parent, new))


@pytest.mark.skipif(os.geteuid() != 0, reason="root checks out into another user's directory")
@pytest.mark.parametrize("parent_mode", ["theirs", "group-writable"])
def test_a_directory_renamed_to_a_partial_name_by_another_user_is_not_removed(
    world: tuple[str, str, str], parent_mode: str
) -> None:
    """Who may rename entries of DEST's parent can give any of root's directories there the name
    of a killed checkout's leftover (`.DEST.velo-partial-<a gone pid>-<random>`): root-owned,
    unlocked, so the next checkout to DEST emptied and removed it, files that user could not
    remove themselves (found by renaming a 0755 directory of root's as uid 1500). Leftovers
    are reclaimed only in a parent no one but its user (or root) can change; elsewhere they
    stay, and the checkout works all the same."""
    from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged

    store, src, out = world
    os.chmod(os.path.dirname(out), 0o755)
    shared = os.path.join(out, "shared")
    os.mkdir(shared)
    if parent_mode == "theirs":
        os.chown(shared, UNPRIV_UID, UNPRIV_UID)
    else:
        os.chown(shared, 0, UNPRIV_UID)
        os.chmod(shared, 0o775)
    keep = os.path.join(shared, "keep")
    os.makedirs(os.path.join(keep, "sub"))
    with open(os.path.join(keep, "sub", "data"), "w") as f:
        f.write("root's, not a checkout's\n")
    gone = 4194305  # above the largest pid Linux allows (PID_MAX_LIMIT): no such process
    fake = f".dest.velo-partial-{gone}-{'0' * 16}"
    run_unprivileged(_rename, shared, "keep", fake)  # they cannot remove sub/data themselves
    p = velo(store, "checkout", "t", os.path.join(shared, "dest"))
    assert p.returncode == 0, p.stderr
    assert_same_tree(src, os.path.join(shared, "dest"))
    assert sorted(os.listdir(shared)) == sorted(["dest", fake])  # old: the directory was removed
    with open(os.path.join(shared, fake, "sub", "data")) as f:
        assert f.read() == "root's, not a checkout's\n"


def test_a_killed_checkout_s_leftover_in_a_shared_parent_stays_and_the_rerun_works(
    world: tuple[str, str, str],
) -> None:
    """In a parent others may change, what a killed checkout left is not reclaimed (it could be
    a directory renamed there): the rerun still puts the whole tree at DEST."""
    store, src, out = world
    os.chmod(out, 0o777)
    dest = os.path.join(out, "dest")
    killed = velo(store, "checkout", "t", dest, fault="checkout.file:5")
    assert killed.returncode == -9, killed.stderr
    [left] = _left_beside(out)
    assert left.startswith(".dest.velo-partial-")
    again = velo(store, "checkout", "t", dest)
    assert again.returncode == 0, again.stderr
    assert_same_tree(src, dest)
    assert _left_beside(out) == sorted(["dest", left])


def _posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's xattr form of a POSIX ACL: version 2, then (tag, perm, id) per entry."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_an_empty_destination_with_a_default_acl_keeps_it(world: tuple[str, str, str]) -> None:
    """`mkdir d && setfacl -d -m u:alice:rwx d && checkout REF d`: the tree's files are to
    inherit the ACL. Replaced by the finished tree, d lost its ACLs (found by setting one and
    listing d's xattrs after the checkout: none). It is now written into, its ACLs kept."""
    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest, 0o755)
    anyone = 0xFFFFFFFF
    acl = _posix_acl(
        (1, 7, anyone), (2, 7, 1500), (4, 5, anyone), (0x10, 7, anyone), (0x20, 5, anyone)
    )
    try:
        os.setxattr(dest, "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    before = os.lstat(dest)
    p = velo(store, "checkout", "t", dest)
    assert p.returncode == 0, p.stderr
    assert os.lstat(dest).st_ino == before.st_ino
    assert os.getxattr(dest, "system.posix_acl_default") == acl  # old: ENODATA
    assert "system.posix_acl_default" in os.listxattr(os.path.join(dest, "d1"))  # inherited
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]


@pytest.mark.parametrize(
    "name",
    [b"\xff-not-utf8", b"a" + "\u20ac".encode() * 79],  # 238 bytes: its partial name is cut
    ids=["non-utf8", "cut-mid-character"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new-dest", "empty-dest"])
def test_a_destination_name_that_is_not_utf8_is_checked_out(
    world: tuple[str, str, str], name: bytes, existing: bool
) -> None:
    """Linux names are bytes. A DEST name that is no UTF-8 (or a long one whose partial name
    is cut inside a character) crashed at the final rename, after the whole tree was written
    (UnicodeEncodeError, reason internal): the names were encoded as UTF-8, not as the
    filesystem's bytes."""
    store, src, out = world
    dest = os.path.join(os.fsencode(out), name)
    if existing:
        os.mkdir(dest)
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    env.pop("VELO_INTERNAL__TEST_FAULT", None)
    p = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"veloverlay", b"checkout", b"t", dest],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert_same_tree(src, dest)
    assert os.listdir(os.fsencode(out)) == [name]


@pytest.mark.parametrize("mode", [0o555, 0o500, 0o700])
def test_a_refused_non_empty_destination_keeps_its_mode(
    world: tuple[str, str, str], mode: int
) -> None:
    """`checkout REF DIR` onto a non-empty DIR is refused (exists) and must change nothing of
    DIR: one its user made read-only (0555) came back 0755 (found by stat-ing DIR after the
    refusal; the emptiness check opened it up to u+rwx and left it so)."""
    store, _src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest)
    with open(os.path.join(dest, "mine"), "w") as f:
        f.write("keep\n")
    os.chmod(dest, mode)
    p = velo(store, "--debug", "checkout", "t", dest)
    assert p.returncode == 1 and b"reason: exists" in p.stderr, p.stderr
    assert stat.S_IMODE(os.lstat(dest).st_mode) == mode  # old: 0o755 / 0o700
    assert os.listdir(dest) == ["mine"]
    assert _left_beside(out) == ["dest"]


def test_an_empty_read_only_destination_of_a_killed_checkout_keeps_its_mode(
    world: tuple[str, str, str],
) -> None:
    """A checkout killed midway leaves an empty DEST as it was, its mode too (0555 became 0755)."""
    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest, 0o555)
    os.chmod(dest, 0o555)
    killed = velo(store, "checkout", "t", dest, fault="checkout.file:5")
    assert killed.returncode == -9, killed.stderr
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o555  # old: 0o755
    assert os.listdir(dest) == []
    again = velo(store, "checkout", "t", dest)
    assert again.returncode == 0, again.stderr
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]


def test_a_failure_in_place_removes_only_the_entries_it_made(
    world: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written in place (here: DEST is the working directory), a failed checkout removes what
    it made at DEST's top, and nothing else: an entry someone put in place of one of them
    meanwhile (same name, their directory) stays, and so does ours they moved elsewhere."""
    import errno

    from veloverlay import faults
    from veloverlay.errors import SysError
    from veloverlay.verbs.repo import Repo

    store, _src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest)
    monkeypatch.chdir(dest)
    calls: list[str] = []

    def meddle(name: str) -> None:
        if name != "checkout.file":
            return
        calls.append(name)
        if len(calls) == 1:  # a file of d0 is written: d0 is replaced by theirs
            os.rename(os.path.join(dest, "d0"), os.path.join(dest, "moved"))
            os.mkdir(os.path.join(dest, "d0"))
            with open(os.path.join(dest, "d0", "theirs"), "w") as f:
                f.write("theirs\n")
        elif len(calls) == 25:
            raise OSError(errno.EIO, "a failing disk")

    monkeypatch.setattr(faults, "point", meddle)
    repo = Repo.open(store)
    try:
        with pytest.raises(SysError):
            repo.checkout("t", dest)
    finally:
        repo.m.close()
    assert sorted(os.listdir(dest)) == ["d0", "moved"]  # d1, d2, ... (ours) are gone
    assert os.listdir(os.path.join(dest, "d0")) == ["theirs"]
    assert _left_beside(out) == ["dest"]


def test_an_empty_destination_with_inode_flags_keeps_them_and_its_inode(
    world: tuple[str, str, str],
) -> None:
    """`chattr +d +A DEST` (nodump, noatime; +C and a project id alike, where the filesystem has
    them) on an empty DEST were lost: the tree was renamed over DEST, a new inode with the
    parent's flags. Such a DEST is written into, as one with a default ACL is."""
    from veloverlay import fsflags

    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest)
    subprocess.run(["chattr", "+d", "+A", dest], check=True)
    before = os.stat(dest)
    p = velo(store, "checkout", "t", dest)
    assert p.returncode == 0, p.stderr
    assert_same_tree(src, dest)
    assert _left_beside(out) == ["dest"]
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags, _projid = fsflags.dir_attrs(fd)
    finally:
        os.close(fd)
    assert flags & 0xC0 == 0xC0, hex(flags)  # old: 0, the flags were gone
    assert os.stat(dest).st_ino == before.st_ino


def test_an_empty_destination_another_process_works_in_stays_that_directory(
    world: tuple[str, str, str],
) -> None:
    """A shell that did `cd DEST` (another one than the checkout's) was left in a deleted, empty
    directory: the tree was renamed over DEST. It now finds the tree where it is."""
    store, src, out = world
    dest = os.path.join(out, "dest")
    os.mkdir(dest)
    shell = subprocess.Popen(["sleep", "300"], cwd=dest)
    try:
        p = velo(store, "checkout", "t", dest)
        assert p.returncode == 0, p.stderr
        assert_same_tree(src, dest)
        assert _left_beside(out) == ["dest"]
        here = os.stat(f"/proc/{shell.pid}/cwd")  # old: the deleted directory
        now = os.stat(dest)
        assert (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino)
        assert sorted(os.listdir(f"/proc/{shell.pid}/cwd")) == sorted(os.listdir(src))
    finally:
        shell.kill()
        shell.wait()
