"""Mounting on, and unmounting from, a directory and not its path (what `veloverlay mount` and
`umount` do as root on paths other users may be able to change): `pin_dir` refuses a path that
no longer leads where it was resolved to, an overlay mounted through the pinned fd lands on that
directory after the path was re-pointed, `umount_exact` refuses a mount stacked over the expected
one and unmounts exactly that one, and `overlay_upper` reads an overlay's upper dir back from
mountinfo whatever characters its path has. Each case runs in a forked child with its own user +
mount namespace (the test process never mounts)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import mount_lines, run_in_userns, unpriv_tmpdir
from veloverlay import mount, mountinfo
from veloverlay.errors import Reason, VeloError
from veloverlay.mount import MountApi

APIS = [
    pytest.param(MountApi.NEW, marks=pytest.mark.needs("lowerdir_append", "fsconfig_fd"), id="new"),
    pytest.param(MountApi.CLASSIC, id="classic"),
]


@pytest.fixture(autouse=True)
def _no_leaked_overlay() -> Iterator[None]:
    before = [line for line in mount_lines() if "overlay" in line]
    yield
    assert [line for line in mount_lines() if "overlay" in line] == before


@pytest.fixture
def base() -> Iterator[str]:
    with unpriv_tmpdir() as path:
        yield os.path.realpath(path)


def _overlay_dirs(base: str, upper_name: str = "upper") -> dict[str, str]:
    dirs = {
        k: os.path.join(base, v)
        for k, v in {"lower": "lower", "upper": upper_name, "work": "work", "at": "d/at"}.items()
    }
    for path in dirs.values():
        os.makedirs(path)
    with open(os.path.join(dirs["lower"], "file"), "w") as f:
        f.write("lower\n")
    return dirs


def _mount(dirs: dict[str, str], api: MountApi, target_fd: int | None = None) -> None:
    mount.overlay(
        lowers=[dirs["lower"]],
        upper=dirs["upper"],
        work=dirs["work"],
        target=dirs["at"],
        userxattr=True,
        api=api,
        target_fd=target_fd,
    )


def test_pin_dir_refuses_a_path_through_a_symlink(base: str) -> None:
    real = os.path.join(base, "real")
    os.makedirs(os.path.join(real, "at"))
    os.symlink(real, os.path.join(base, "link"))
    with pytest.raises(VeloError) as exc:
        mount.pin_dir(os.path.join(base, "link", "at"))
    assert exc.value.reason is Reason.TARGET_INVALID
    assert "now leads to" in str(exc.value) and f"{real}/at" in str(exc.value)
    os.symlink(os.path.join(real, "at"), os.path.join(base, "last"))
    with pytest.raises(VeloError) as exc:  # a symlink as the last component: never followed
        mount.pin_dir(os.path.join(base, "last"))
    assert exc.value.reason is Reason.TARGET_INVALID
    fd = mount.pin_dir(os.path.join(real, "at"))
    os.close(fd)


def _repoint(base: str) -> str:
    """Re-point the overlay's path (`d/at`) after it was resolved: `d` is renamed to `d-moved`
    and a symlink `d` -> `victim` takes its place. Returns where the directory now is."""
    os.rename(os.path.join(base, "d"), os.path.join(base, "d-moved"))
    os.symlink(os.path.join(base, "victim"), os.path.join(base, "d"))
    return os.path.join(base, "d-moved", "at")


def _swap_then_mount(base: str, api: MountApi) -> dict[str, object]:
    dirs = _overlay_dirs(base)
    victim = os.path.join(base, "victim", "at")
    os.makedirs(victim)
    fd = mount.pin_dir(dirs["at"])
    try:
        moved = _repoint(base)  # after the path was resolved and pinned
        _mount(dirs, api, target_fd=fd)
    finally:
        os.close(fd)
    got = {
        "moved_is_mount": os.path.ismount(moved),
        "victim_is_mount": os.path.ismount(victim),
        "moved_file": open(os.path.join(moved, "file")).read(),
        "victim_entries": os.listdir(victim),
    }
    mount.umount(moved)
    return got


@pytest.mark.parametrize("api", APIS)
@pytest.mark.needs("overlay_userns")
def test_an_overlay_on_a_pinned_dir_lands_there_after_a_swap(base: str, api: MountApi) -> None:
    got = run_in_userns(_swap_then_mount, base, api, privileged=False)
    assert got == {
        "moved_is_mount": True,
        "victim_is_mount": False,
        "moved_file": "lower\n",
        "victim_entries": [],
    }


def _cover_then_umount(base: str, api: MountApi) -> dict[str, object]:
    dirs = _overlay_dirs(base)
    at = dirs["at"]
    _mount(dirs, api)
    ours = [e for e in mountinfo.mounts() if e.point == at and mountinfo.overlay_upper(e)]
    assert len(ours) == 1
    mount.mount_tmpfs(at)  # something mounted over the overlay
    got: dict[str, object] = {}
    try:
        mount.umount_exact(at, ours[0].mnt_id)
    except VeloError as exc:
        got["refused"] = exc.reason.value
    got["still"] = sorted(e.fstype for e in mountinfo.mounts() if e.point == at)
    mount.umount(at, detach=False)  # the tmpfs, by hand
    mount.umount_exact(at, ours[0].mnt_id)
    got["after"] = [e.fstype for e in mountinfo.mounts() if e.point == at]
    # Unmounting by a path re-pointed (a symlink swapped in for a directory on the way) is
    # refused before umount2 could take whatever mount the new path leads to.
    _mount(dirs, api)
    again = [e for e in mountinfo.mounts() if e.point == at][0]
    victim = os.path.join(base, "victim", "at")
    os.makedirs(victim)
    mount.mount_tmpfs(victim)
    moved = _repoint(base)
    try:
        mount.umount_exact(at, again.mnt_id)
    except VeloError as exc:
        got["swapped"] = exc.reason.value
    got["victim_mounted"] = os.path.ismount(victim)
    mount.umount(victim)
    mount.umount(moved)
    return got


@pytest.mark.parametrize("api", APIS)
@pytest.mark.needs("overlay_userns")
def test_umount_exact_takes_only_the_expected_mount(base: str, api: MountApi) -> None:
    got = run_in_userns(_cover_then_umount, base, api, privileged=False)
    assert got == {
        "refused": "target-invalid",
        "still": ["overlay", "tmpfs"],
        "after": [],
        "swapped": "target-invalid",
        "victim_mounted": True,
    }


def _upper_back(base: str, api: MountApi, name: str) -> str | None:
    dirs = _overlay_dirs(base, name)
    _mount(dirs, api)
    try:
        found = [mountinfo.overlay_upper(e) for e in mountinfo.mounts() if e.point == dirs["at"]]
        return found[0] if len(found) == 1 else None
    finally:
        mount.umount(dirs["at"])


@pytest.mark.parametrize("api", APIS)
@pytest.mark.needs("overlay_userns")
@pytest.mark.parametrize("name", ["upper", "u p,p=er\\x", "ü\tnew"], ids=["plain", "odd", "tab"])
def test_overlay_upper_reads_back_the_path(base: str, api: MountApi, name: str) -> None:
    got = run_in_userns(_upper_back, base, api, name, privileged=False)
    path = os.path.join(base, name)
    # mount(2) shows the escaped option string it was given; the new API the path itself.
    assert got == (path if api is MountApi.NEW else mount.escape_option_path(path))


def _pin_without_proc(base: str) -> dict[str, object]:
    """pin_dir in a mount namespace whose /proc is hidden under an empty tmpfs (a chroot or a
    container without /proc): /proc/self/fd cannot say where the descriptor is."""
    from veloverlay import _libc

    _libc.mount("none", "/proc", "tmpfs", 0, None)
    assert not os.path.exists("/proc/self")
    got: dict[str, object] = {}
    fd = mount.pin_dir(os.path.join(base, "real", "at"))
    got["plain"] = os.path.samestat(os.fstat(fd), os.stat(os.path.join(base, "real", "at")))
    os.close(fd)
    for case in ("link/at", "last"):
        try:
            os.close(mount.pin_dir(os.path.join(base, case)))
            got[case] = "pinned"
        except VeloError as exc:
            got[case] = (exc.reason, str(exc))
    return got


def test_pin_dir_without_proc_checks_the_path_name_by_name(base: str) -> None:
    """Without /proc the check walks the path from / a name at a time, following no symlink:
    a plain path is pinned (it said 'it now leads to ?' and refused every path), a path through
    a symlink or ending in one is still refused."""
    real = os.path.join(base, "real")
    os.makedirs(os.path.join(real, "at"))
    os.symlink(real, os.path.join(base, "link"))
    os.symlink(os.path.join(real, "at"), os.path.join(base, "last"))
    got = run_in_userns(_pin_without_proc, base, privileged=True)
    assert got["plain"] is True
    for case in ("link/at", "last"):
        reason, text = got[case]  # type: ignore[misc]
        assert reason is Reason.TARGET_INVALID, text
        assert "?" not in text
