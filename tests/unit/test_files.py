"""files.force_rmtree: trees with any modes go; an entry that cannot go is one clean OSError."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pytest

from veloverlay import files, fsflags


def _tree(root: str) -> str:
    """A store-like tree: 0555 and 0000 dirs, 0444 and 0000 files; returns one file's path."""
    leaf = os.path.join(root, "objects-v1", "ab", "cd")
    os.makedirs(leaf)
    for name, mode in (("obj", 0o444), ("secret", 0)):
        with open(os.path.join(leaf, name), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(leaf, name), mode)
    os.makedirs(os.path.join(root, "work", "work"))
    os.chmod(os.path.join(root, "work", "work"), 0)
    os.chmod(os.path.join(root, "objects-v1", "ab"), 0o555)
    return os.path.join(leaf, "obj")


def test_any_modes_go(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(tmp_path, "t")
    _tree(root)
    files.force_rmtree(root)
    assert not os.path.lexists(root)


@pytest.mark.needs("chattr")
def test_an_immutable_entry_is_one_clean_error(tmp_path: os.PathLike[str]) -> None:
    """Python >= 3.13's rmtree reports an error raised by the handler as a failure of the
    parent directory: retrying that without a limit recursed until RecursionError (found by
    the matrix box deb13-verity, Python 3.13.5)."""
    root = os.path.join(tmp_path, "t")
    obj = _tree(root)
    fsflags.set_immutable(obj, True)
    try:
        with pytest.raises(PermissionError):
            files.force_rmtree(root)
        assert os.path.exists(obj)
    finally:
        fsflags.set_immutable(obj, False)
    files.force_rmtree(root)
    assert not os.path.lexists(root)
    assert stat.S_IMODE(os.stat(tmp_path).st_mode)  # the parent is untouched


def test_a_directory_swapped_for_a_link_mid_removal_changes_nothing_it_names(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write a directory being removed can swap a subdirectory for a symbolic link
    between the listing and the descent: the link's target keeps its mode and content."""
    root = os.path.join(tmp_path, "t")
    os.makedirs(os.path.join(root, "d"))
    with open(os.path.join(root, "f"), "w"):
        pass  # not only empty directories: the full walk
    victim = os.path.join(tmp_path, "victim")
    os.makedirs(victim)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("mine\n")
    os.chmod(victim, 0o555)
    real = files._clear_files

    def swap_after_listing(dfd: int, unflag: files.Unflag | None) -> list[str]:
        subdirs = real(dfd, unflag)
        if "d" in subdirs:
            os.rmdir("d", dir_fd=dfd)
            os.symlink(victim, "d", dir_fd=dfd)
        return subdirs

    monkeypatch.setattr(files, "_clear_files", swap_after_listing)
    files.force_rmtree(root)  # the descent refuses the link, which goes as a link
    assert not os.path.lexists(root)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o555
    assert os.listdir(victim) == ["keep"]
    monkeypatch.undo()
    os.chmod(victim, 0o755)


def test_a_directory_moved_out_mid_removal_never_leads_the_walk_out(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk climbs back by "..". Whoever can move a directory of the tree (theirs, in a
    world-writable directory of it) while the walk is below it sends ".." elsewhere: the old
    walk went on there, removing what the tree's own pending names named in that other
    directory (as root, a tree moved into /var/tmp leads to /var, then /). Now each ".." must
    be the directory the walk came down from."""
    top = os.path.join(tmp_path, "top")
    outside = os.path.join(tmp_path, "outside")
    os.mkdir(outside)
    ids = {}
    for x in ("a", "z"):
        os.makedirs(os.path.join(top, x, "b"))
        with open(os.path.join(top, x, "b", "f"), "w"):
            pass
        st = os.stat(os.path.join(top, x, "b"))
        ids[(st.st_dev, st.st_ino)] = x
    moved: list[str] = []
    real = os.scandir

    def scandir(arg: Any = ".") -> Any:
        if isinstance(arg, int) and not moved:
            st = os.fstat(arg)
            x = ids.get((st.st_dev, st.st_ino))
            if x is not None:  # the walk is in x/b: x goes elsewhere, next to a "sibling"
                moved.append(x)
                os.rename(os.path.join(top, x), os.path.join(outside, x))
                y = "z" if x == "a" else "a"
                os.mkdir(os.path.join(outside, y))
                with open(os.path.join(outside, y, "keep"), "w") as f:
                    f.write("not the tree's\n")
        return real(arg)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError) as ei:
        files.force_rmtree(top)
    monkeypatch.undo()
    assert moved
    y = "z" if moved[0] == "a" else "a"
    assert os.listdir(os.path.join(outside, y)) == ["keep"]
    assert isinstance(ei.value, files.TreeChanged), ei.value
    assert os.path.isdir(os.path.join(top, y))  # the walk stopped: the rest of the tree stays


def test_an_expected_directory_is_checked_before_anything_goes(
    tmp_path: os.PathLike[str],
) -> None:
    d = os.path.join(tmp_path, "d")
    os.mkdir(d, 0o500)
    with open(os.path.join(tmp_path, "f"), "w"):
        pass
    other = os.stat(tmp_path)
    for path in (d, os.path.join(tmp_path, "f")):
        with pytest.raises(files.TreeChanged):
            files.force_rmtree(path, expect=(other.st_dev, other.st_ino))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o500  # not even opened up
    st = os.stat(d)
    files.force_rmtree(d, expect=(st.st_dev, st.st_ino))
    assert not os.path.lexists(d)
    files.force_rmtree(d)  # gone: no error


def _mounted_tree(base: str) -> tuple[list[str], bool]:
    from veloverlay import mount, ns

    ns.enter_mountns()
    mount.make_rprivate("/")
    m = os.path.join(base, "top", "m")
    os.makedirs(m)
    mount.mount_tmpfs(m)
    with open(os.path.join(m, "data"), "w") as f:
        f.write("on another filesystem\n")
    try:
        files.force_rmtree(os.path.join(base, "top"))
    except OSError as exc:
        return sorted(os.listdir(m)), exc.errno == errno.EBUSY
    return sorted(os.listdir(m)), False


def test_a_mount_point_in_the_tree_is_not_crossed(tmp_path: os.PathLike[str]) -> None:
    """rmdir of a mount point fails (EBUSY) — after the old walk had emptied the filesystem
    mounted there. Now the walk stops at it, before anything below it goes."""
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs (in a mount namespace of its own)")
    left, busy = ns.run_in_child(_mounted_tree, os.fspath(tmp_path))
    assert (left, busy) == (["data"], True)
    files.force_rmtree(os.path.join(tmp_path, "top"))  # the namespace is gone, its mount too


def test_exact_modes_in_many_threads_gives_the_umask_back() -> None:
    """Threads enter exact_modes at once (publish's renames, pull's fetches). Each saving and
    restoring its own left umask 0 for the rest of the process whenever two overlapped (found by
    CI: every later directory of the test process was 0777, and root refused its stores)."""
    import threading
    import time

    old = os.umask(0o027)
    try:
        barrier = threading.Barrier(8)

        def enter() -> None:
            barrier.wait()
            for _ in range(300):
                with files.exact_modes():
                    time.sleep(0)  # another thread may run here, as file creation lets it

        threads = [threading.Thread(target=enter) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def _walk_each(base: str) -> dict[str, object]:
    """As the unprivileged user (root may search any directory): directories made unreadable
    or unsearchable by their owner, each walked with `opened_dir` (one entry looked up in it),
    once with a block that fails; their modes afterwards."""
    out: dict[str, object] = {}
    for mode in (0o000, 0o100, 0o300, 0o600, 0o700):
        for fail in (False, True):
            d = os.path.join(base, f"d{mode:o}-{int(fail)}")
            os.mkdir(d)
            with open(os.path.join(d, "x"), "w") as f:
                f.write("x")
            os.chmod(d, mode)
            parent = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with files.opened_dir(parent, os.fsencode(os.path.basename(d)), mode) as fd:
                    out[f"{mode:o}-{int(fail)} seen"] = os.lstat("x", dir_fd=fd).st_size
                    if fail:
                        raise KeyError("the walk failed")
            except KeyError:
                pass
            finally:
                os.close(parent)
            out[f"{mode:o}-{int(fail)} after"] = stat.S_IMODE(os.stat(d).st_mode)
            os.chmod(d, 0o700)
    return out


def test_opened_dir_walks_any_mode_and_gives_it_back() -> None:
    """A walk (harvest, the shim's tree sync) enters a directory its owner made unreadable or
    unsearchable with u+rwx meanwhile, and gives the owner's mode back when it leaves, also when
    the walk fails there: a walk interrupted and run again finds the modes the session left. No
    test saw a mode left at u+rwx before (checked by breaking the give-back of 0600)."""
    from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir

    with unpriv_tmpdir() as base:
        out = run_unprivileged(_walk_each, base)
    for mode in (0o000, 0o100, 0o300, 0o600, 0o700):
        for fail in (0, 1):
            assert out[f"{mode:o}-{fail} seen"] == 1, out
            assert out[f"{mode:o}-{fail} after"] == mode, out
