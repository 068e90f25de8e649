"""Mounts, in forked children that enter their own user namespace (as root mapped 0->0, or as the
unprivileged test uid): overlays through the new API and mount(2), data-only lowers, read-only
binds, proc and tmpfs. The test process itself never unshares, and no mount may outlive a test."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import mount_lines, run_in_userns, unpriv_tmpdir
from veloverlay import mount, ns
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.mount import MountApi

ROOT_OVERLAY = pytest.param(True, marks=pytest.mark.needs("overlay_root"), id="root")
UNPRIV_OVERLAY = pytest.param(False, marks=pytest.mark.needs("overlay_userns"), id="unpriv")
ROOT_DATA = pytest.param(True, marks=pytest.mark.needs("data_only_root"), id="root")
UNPRIV_DATA = pytest.param(False, marks=pytest.mark.needs("data_only_userns"), id="unpriv")
APIS = [
    pytest.param(MountApi.NEW, marks=pytest.mark.needs("lowerdir_append", "fsconfig_fd"), id="new"),
    pytest.param(MountApi.CLASSIC, id="classic"),
]


@pytest.fixture(autouse=True)
def _no_leaked_mounts() -> Iterator[None]:
    before = mount_lines()
    yield
    after = mount_lines()
    assert [line for line in after if "overlay" in line] == [
        line for line in before if "overlay" in line
    ]
    assert after == before


@pytest.fixture
def base() -> Iterator[str]:
    with unpriv_tmpdir() as path:
        yield path


def _dirs(base: str, *names: str) -> list[str]:
    paths = [os.path.join(base, n) for n in names]
    for p in paths:
        os.makedirs(p)
    return paths


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _mountinfo_options(target: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return line.split(" - ")[1]
    raise AssertionError(f"{target} is not mounted")


# --- overlay basics ---------------------------------------------------------------------------
def _basic(base: str, api: MountApi) -> dict[str, object]:
    lower, upper, work, merged = _dirs(base, "lower", "upper", "work", "merged")
    _write(f"{lower}/keep", b"keep")
    _write(f"{lower}/gone", b"gone")
    _write(f"{lower}/tree/a", b"a")
    _write(f"{lower}/tree/sub/b", b"b")
    used = mount.overlay(
        lowers=[lower], upper=upper, work=work, target=merged, userxattr=True, api=api
    )
    try:
        options = _mountinfo_options(merged)
        _write(f"{merged}/new", b"fresh")
        os.unlink(f"{merged}/gone")
        shutil.rmtree(f"{merged}/tree")  # needs userxattr for the opaque/whiteout dirs (EIO else)
        wh_gone, wh_tree = os.lstat(f"{upper}/gone"), os.lstat(f"{upper}/tree")
        seen = sorted(os.listdir(merged))
        keep = _read(f"{merged}/keep")
    finally:
        mount.umount(merged)
    return {
        "used": used,
        "options": options,
        "upper_new": _read(f"{upper}/new"),
        "whiteouts": [
            (stat.S_ISCHR(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev))
            for st in (wh_gone, wh_tree)
        ],
        "seen": seen,
        "keep": keep,
        "lower_after": sorted(os.listdir(lower)),
        "merged_after": os.listdir(merged),
    }


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("privileged", [ROOT_OVERLAY, UNPRIV_OVERLAY])
def test_overlay_write_delete_rmtree(base: str, privileged: bool, api: MountApi) -> None:
    got = run_in_userns(_basic, base, api, privileged=privileged)
    assert got["used"] is api
    options = str(got["options"])
    assert "userxattr" in options and "redirect_dir=nofollow" in options
    assert got["upper_new"] == b"fresh"
    assert got["whiteouts"] == [(True, 0, 0), (True, 0, 0)]
    assert got["seen"] == ["keep", "new"]
    assert got["keep"] == b"keep"
    assert got["lower_after"] == ["gone", "keep", "tree"]  # lowers are never written
    assert got["merged_after"] == []  # unmounted: the bare mount point again


# --- data-only lowers -------------------------------------------------------------------------
OBJECT = b"the object's bytes\n" * 100
MTIME_NS = 1_600_000_000_123_456_789


def _data_only(base: str, api: MountApi) -> dict[str, object]:
    meta, objs, upper, work, merged = _dirs(base, "meta", "objs", "upper", "work", "merged")
    obj = f"{objs}/ab/cdef"
    _write(obj, OBJECT)
    os.chmod(obj, 0o444)
    mfile = f"{meta}/pkg/file.py"
    _write(mfile, b"")
    os.truncate(mfile, len(OBJECT))  # sparse, of the real size
    os.chmod(mfile, 0o750)
    os.utime(mfile, ns=(MTIME_NS, MTIME_NS))
    os.setxattr(mfile, "user.overlay.metacopy", b"")
    os.setxattr(mfile, "user.overlay.redirect", b"/ab/cdef")
    used = mount.overlay(
        lowers=[meta], data_lowers=[objs], upper=upper, work=work, target=merged,
        userxattr=True, api=api,
    )  # fmt: skip
    try:
        merged_file = f"{merged}/pkg/file.py"
        first_read = _read(merged_file)
        st = os.stat(merged_file)
        copied_up_before = os.path.exists(f"{upper}/pkg/file.py")
        with open(merged_file, "ab") as f:
            f.write(b"appended\n")
        after_append = _read(merged_file)
    finally:
        mount.umount(merged)
    return {
        "used": used,
        "read": first_read,
        "stat": (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size),
        "copied_up_before": copied_up_before,
        "after_append": after_append,
        "upper": _read(f"{upper}/pkg/file.py"),
        "object": (_read(obj), stat.S_IMODE(os.stat(obj).st_mode)),
    }


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("privileged", [ROOT_DATA, UNPRIV_DATA])
def test_data_only_lower(base: str, privileged: bool, api: MountApi) -> None:
    got = run_in_userns(_data_only, base, api, privileged=privileged)
    assert got["used"] is api
    assert got["read"] == OBJECT  # the bytes come from the data-only object
    assert got["stat"] == (0o750, MTIME_NS, len(OBJECT))  # the metadata file's mode/mtime/size
    assert got["copied_up_before"] is False  # reading never copies up
    assert got["after_append"] == OBJECT + b"appended\n"
    assert got["upper"] == OBJECT + b"appended\n"  # a full copy-up, not a metacopy
    assert got["object"] == (OBJECT, 0o444)  # the object is unchanged


# --- limits and pre-checks --------------------------------------------------------------------
def test_more_than_500_lowers_are_refused(base: str) -> None:
    with pytest.raises(VeloError) as info:
        mount.overlay(
            lowers=[base] * 400, data_lowers=[base] * 101, upper=None, work=None,
            target=base, userxattr=True,
        )  # fmt: skip
    assert info.value.reason is Reason.TOO_MANY_LAYERS


@pytest.mark.parametrize("missing", ["upper", "work", "lower2", "merged"])
def test_a_missing_directory_is_named(base: str, missing: str) -> None:
    dirs = dict(
        zip(
            ["lower1", "lower2", "upper", "work", "merged"],
            _dirs(base, "l1", "l2", "u", "w", "m"),
            strict=True,
        )
    )
    os.rmdir(dirs[missing])
    with pytest.raises(VeloError) as info:
        mount.overlay(
            lowers=[dirs["lower1"], dirs["lower2"]], upper=dirs["upper"], work=dirs["work"],
            target=dirs["merged"], userxattr=True,
        )  # fmt: skip
    assert info.value.reason is Reason.NOT_FOUND
    assert info.value.path == dirs[missing]
    assert dirs[missing] in info.value.message


def _many_layers(base: str, n: int, api: MountApi | None) -> tuple[MountApi, list[str]]:
    layers = []
    for i in range(n):
        layer = os.path.join(base, "layers", f"{i:04d}" + "0123456789abcdef" * 4)
        _write(f"{layer}/f{i}", b"%d" % i)
        layers.append(layer)
    _write(f"{layers[0]}/shadowed", b"top")
    _write(f"{layers[-1]}/shadowed", b"bottom")
    upper, work, merged = _dirs(base, "u", "w", "m")
    used = mount.overlay(
        lowers=layers, upper=upper, work=work, target=merged, userxattr=True, api=api
    )
    try:
        return used, [str(len(os.listdir(merged))), _read(f"{merged}/shadowed").decode()]
    finally:
        mount.umount(merged)


@pytest.mark.needs("overlay_userns", "fsconfig_fd")
def test_500_long_lowers_mount_through_the_new_api(base: str) -> None:
    # ~90-byte paths: 45 KB of lowerdir, far past mount(2)'s one page; SET_FD has no limit
    used, (count, shadowed) = run_in_userns(_many_layers, base, 500, None, privileged=False)
    assert used is MountApi.NEW
    assert count == str(500 + 1)
    assert shadowed == "top"  # lowers are topmost first


def test_classic_refuses_an_option_string_over_one_page(base: str) -> None:
    layers = _dirs(base, *(f"{i:03d}" + "x" * 60 for i in range(70)))
    upper, work, merged = _dirs(base, "u", "w", "m")
    with pytest.raises(VeloError) as info:
        mount.overlay(
            lowers=layers, upper=upper, work=work, target=merged, userxattr=True,
            api=MountApi.CLASSIC,
        )  # fmt: skip
    assert info.value.reason is Reason.TOO_MANY_LAYERS
    assert "4095" in info.value.message


def _long_path(base: str, api: MountApi) -> bytes:
    deep = os.path.join(base, *(["d" * 60] * 5))  # > 255 bytes
    assert len(deep) > 300
    _write(f"{deep}/file", b"deep")
    upper, work, merged = _dirs(base, "u", "w", "m")
    mount.overlay(lowers=[deep], upper=upper, work=work, target=merged, userxattr=True, api=api)
    try:
        return _read(f"{merged}/file")
    finally:
        mount.umount(merged)


@pytest.mark.needs("overlay_userns", "fsconfig_fd")
def test_a_lower_path_over_255_bytes_mounts_with_set_fd(base: str) -> None:
    assert run_in_userns(_long_path, base, MountApi.NEW, privileged=False) == b"deep"


def _weird_names(base: str, api: MountApi) -> bytes:
    weird = os.path.join(base, "we,ird:na\\me dir")
    _write(f"{weird}/file", b"escaped")
    other = os.path.join(base, "two,::")
    _write(f"{other}/other", b"x")
    upper, work, merged = _dirs(base, "u", "w", "m")
    mount.overlay(
        lowers=[weird, other], upper=upper, work=work, target=merged, userxattr=True, api=api
    )
    try:
        return _read(f"{merged}/file") + _read(f"{merged}/other")
    finally:
        mount.umount(merged)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.needs("overlay_userns")
def test_paths_with_comma_colon_backslash_space(base: str, api: MountApi) -> None:
    assert run_in_userns(_weird_names, base, api, privileged=False) == b"escapedx"


def test_legacy_option_string() -> None:
    opts = mount.legacy_options(
        lowers=["/a", "/b,c"], data_lowers=["/d1", "/d:2"], upper="/u", work="/w",
        userxattr=True, extra={"volatile": "", "index": "on"},
    )  # fmt: skip
    assert opts == (
        "lowerdir=/a:/b\\,c::/d1::/d\\:2,upperdir=/u,workdir=/w,"
        "index=on,metacopy=off,redirect_dir=nofollow,userxattr,volatile"
    )


def _conflict(base: str, api: MountApi) -> None:
    lower, upper, work, merged = _dirs(base, "l", "u", "w", "m")
    mount.overlay(
        lowers=[lower], upper=upper, work=work, target=merged, userxattr=True,
        extra={"metacopy": "on"}, api=api,
    )  # fmt: skip


@pytest.mark.parametrize("api", APIS)
@pytest.mark.needs("overlay_userns")
def test_einval_explains_the_options(base: str, api: MountApi) -> None:
    # metacopy=on conflicts with userxattr (measured); the error must show what was asked
    with pytest.raises(SysError) as info:
        run_in_userns(_conflict, base, api, privileged=False)
    assert info.value.errno == errno.EINVAL
    assert info.value.hint is not None and "metacopy=on" in info.value.hint


# --- binds, proc, tmpfs -----------------------------------------------------------------------
def _store_layout(base: str, api: MountApi) -> dict[str, object]:
    """DESIGN order: mount the overlay first, then bind the store read-only."""
    objects, lower, upper, work, merged = _dirs(
        base, "objects-v1", "lower", "sessions/1/upper", "sessions/1/work", "merged"
    )
    _write(f"{objects}/ab/obj", b"object")
    sub = os.path.join(objects, "sub")
    os.mkdir(sub)
    mount.mount_tmpfs(sub, "size=1m")  # a submount: a recursive read-only bind covers it too
    mount.overlay(lowers=[lower], upper=upper, work=work, target=merged, userxattr=True)
    used = mount.bind(objects, objects, readonly=True, api=api)
    errors: dict[str, str] = {}
    try:
        for name, path, mode in [
            ("append_object", f"{objects}/ab/obj", "ab"),
            ("create_in_store", f"{objects}/new", "wb"),
            ("create_in_submount", f"{sub}/new", "wb"),
        ]:
            try:
                with open(path, mode):
                    errors[name] = "ok"
            except OSError as exc:
                errors[name] = errno.errorcode[exc.errno or 0]
        _write(f"{merged}/written", b"session write")
        upper_has = _read(f"{upper}/written")
    finally:
        mount.umount(objects)
        mount.umount(sub)
        mount.umount(merged)
    return {"used": used, "errors": errors, "upper": upper_has}


@pytest.mark.parametrize("api", [MountApi.NEW, MountApi.CLASSIC], ids=["new", "classic"])
@pytest.mark.parametrize("privileged", [ROOT_OVERLAY, UNPRIV_OVERLAY])
def test_readonly_store_bind_after_overlay(base: str, privileged: bool, api: MountApi) -> None:
    got = run_in_userns(_store_layout, base, api, privileged=privileged)
    assert got["used"] is api
    errors = got["errors"]
    assert isinstance(errors, dict)
    assert errors["append_object"] == "EROFS"
    assert errors["create_in_store"] == "EROFS"
    # new API: mount_setattr(AT_RECURSIVE) reaches submounts; the classic remount does not
    assert errors["create_in_submount"] == ("EROFS" if api is MountApi.NEW else "ok")
    assert got["upper"] == b"session write"  # the upper stays writable


def _proc_and_tmpfs(base: str) -> dict[str, object]:
    proc_dir, tmp_dir = _dirs(base, "proc", "tmp")
    dev_before = os.stat(tmp_dir).st_dev
    mount.mount_tmpfs(tmp_dir, "size=1m,mode=0701")
    mode = stat.S_IMODE(os.stat(tmp_dir).st_mode)
    dev_during = os.stat(tmp_dir).st_dev
    mount.umount(tmp_dir, detach=False)
    dev_after = os.stat(tmp_dir).st_dev

    def in_pid_ns() -> str:  # pid 1 of the new pid namespace mounts its procfs
        mount.mount_proc(proc_dir)
        try:
            return os.readlink(f"{proc_dir}/self")
        finally:
            mount.umount(proc_dir)

    return {
        "tmpfs": (mode, dev_during != dev_before, dev_after == dev_before),
        "proc_self": ns.run_in_child(in_pid_ns),
    }


def _enter_pid_ns_and(base: str) -> dict[str, object]:
    ns.enter_userns(map_root=True, pid=True)
    mount.make_rprivate("/")
    return _proc_and_tmpfs(base)


@pytest.mark.needs("userns")
def test_proc_in_pid_namespace_and_tmpfs(base: str) -> None:
    from tests.helpers.unpriv import run_unprivileged

    got = run_unprivileged(_enter_pid_ns_and, base)
    assert got["tmpfs"] == (0o701, True, True)
    assert got["proc_self"] == "1"


def _set_fd_refused(base: str, err: int) -> dict[str, object]:
    """Kernel 6.12 has `lowerdir+` but refuses FSCONFIG_SET_FD for it with EBADF (found by the
    VM matrix): the new API must go on with SET_STRING, not give up on overlay."""
    from veloverlay import _libc

    real = _libc.fsconfig

    def fsconfig(fd: int, cmd: int, key: str | None = None, value: object = None, aux: int = 0):  # type: ignore[no-untyped-def]
        if cmd == _libc.FSCONFIG_SET_FD and key == "lowerdir+":
            raise SysError(err, "fsconfig", key)
        return real(fd, cmd, key, value, aux)  # type: ignore[arg-type]

    _libc.fsconfig = fsconfig  # type: ignore[assignment]
    return _basic(base, MountApi.NEW)


@pytest.mark.needs("overlay_root", "lowerdir_append")
@pytest.mark.parametrize("err", [errno.EBADF, errno.EINVAL])
def test_new_api_falls_back_to_strings_when_set_fd_is_refused(base: str, err: int) -> None:
    got = run_in_userns(_set_fd_refused, base, err, privileged=True)
    assert got["used"] is MountApi.NEW
    assert got["upper_new"] == b"fresh" and got["seen"] == ["keep", "new"]


# --- read-only for every mount of a filesystem (a session's seal) ---------------------------
def _remount_super(base: str) -> dict[str, object]:
    a, b = _dirs(base, "a", "b")
    mount.mount_tmpfs(a)  # nosuid,nodev: mount(2) would drop them on a remount not repeating them
    mount.bind(a, b)  # a second mount of the same filesystem (as another namespace's copy is)
    _write(os.path.join(a, "f"), b"x")
    out: dict[str, object] = {}
    with open(os.path.join(b, "f"), "ab"):  # held open for writing
        try:
            mount.remount_super(a, readonly=True)
        except SysError as exc:
            out["busy"] = exc.errno
    try:
        mount.remount_super(a, readonly=True)
        try:
            _write(os.path.join(b, "g"), b"y")  # through the other mount
            out["write_b"] = "ok"
        except OSError as exc:
            out["write_b"] = errno.errorcode[exc.errno or 0]
        flags = os.statvfs(a).f_flag
        out["kept"] = (bool(flags & os.ST_NOSUID), bool(flags & os.ST_NODEV))
        mount.remount_super(a, readonly=False)
        _write(os.path.join(b, "g"), b"y")
        out["after"] = _read(os.path.join(a, "g"))
    finally:
        mount.umount(b)
        mount.umount(a)
    return out


@pytest.mark.parametrize("privileged", [True, False], ids=["root", "unpriv"])
def test_remount_super_makes_every_mount_read_only(base: str, privileged: bool) -> None:
    got = run_in_userns(_remount_super, base, privileged=privileged)
    assert got["busy"] == errno.EBUSY  # a file open for writing, through the other mount
    # The filesystem, not one mount (a bind remount would leave b writable: ST_RELATIME passed
    # through as a mount flag is MS_BIND), keeps its nosuid/nodev, and is writable again after.
    assert got["write_b"] == "EROFS"
    assert got["kept"] == (True, True)
    assert got["after"] == b"y"
