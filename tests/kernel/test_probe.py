"""Capability detection: every feature answered with a reason, cheap, cached, side-effect free."""

from __future__ import annotations

import errno
import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.unpriv import mount_lines
from veloverlay import _libc, probe
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.probe import Capabilities
from veloverlay.session import select

EXPECTED = {
    "root",
    "userns",
    "overlay_root",
    "overlay_userns",
    "overlay_native",
    "data_only_root",
    "data_only_userns",
    "data_only_native",
    "userns_root",
    "lowerdir_append",
    "fsconfig_fd",
    "whiteout_mknod",
    "chattr",
    "fsverity",
    "reflink",
    "userns_unrestricted",
    "fuse",
}


def _leftovers() -> set[str]:
    """This process's probe scratch dirs (named with its pid: other processes probe too)."""
    mine = f"velo-probe-{os.getpid()}-*"
    return set(glob.glob(f"/dev/shm/{mine}")) | set(
        glob.glob(os.path.join(tempfile.gettempdir(), mine))
    )


@pytest.fixture(scope="module")
def fresh() -> Capabilities:
    return probe.detect(refresh=True)


def test_every_feature_is_answered_with_a_reason(fresh: Capabilities) -> None:
    assert set(fresh.features) == EXPECTED == set(probe.FEATURES)
    for name, feature in fresh.features.items():
        assert isinstance(feature.ok, bool), name
        assert feature.reason.strip(), name
    assert fresh.kernel == os.uname().release


def test_failures_name_the_call_and_errno(fresh: Capabilities) -> None:
    for name in ("fsverity", "reflink", "chattr"):
        feature = fresh.feature(name)
        if not feature.ok:
            assert "ioctl(" in feature.reason and ": E" in feature.reason, feature.reason


def test_root_follows_capeff(fresh: Capabilities) -> None:
    with open("/proc/self/status") as f:
        capeff = int(next(line.split()[1] for line in f if line.startswith("CapEff")), 16)
    assert fresh.feature("root").ok == bool(capeff >> 21 & 1)


def test_fuse_is_probed_as_an_unprivileged_uid(fresh: Capabilities) -> None:
    # root always opens /dev/fuse; the probe must answer for an unprivileged uid (0600 here)
    try:
        st = os.stat("/dev/fuse")
    except FileNotFoundError:
        assert not fresh.feature("fuse").ok
        return
    if os.getuid() == 0:
        expected = st.st_mode & 0o006 == 0o006
    else:
        expected = os.access("/dev/fuse", os.R_OK | os.W_OK)
    assert fresh.feature("fuse").ok == expected, fresh.feature("fuse").reason


def test_unknown_feature() -> None:
    feature = probe.detect().feature("no_such_thing")
    assert not feature.ok
    assert "unknown feature" in feature.reason


def test_cached_per_process_and_refreshable() -> None:
    first = probe.detect()
    assert probe.detect() is first
    again = probe.detect(refresh=True)
    assert again is not first
    assert again.features == first.features


def test_cheap_and_leaves_nothing_behind() -> None:
    mounts, temps = mount_lines(), _leftovers()
    start = time.monotonic()
    probe.detect(refresh=True)
    assert time.monotonic() - start < 1.0
    assert mount_lines() == mounts
    assert _leftovers() == temps


def test_to_dict_is_json(fresh: Capabilities) -> None:
    data = json.loads(json.dumps(fresh.to_dict()))
    assert data["kernel"] == fresh.kernel
    assert set(data["features"]) == EXPECTED
    assert data["features"]["root"] == {
        "ok": fresh.feature("root").ok,
        "reason": fresh.feature("root").reason,
    }


# --- the lower form (session/select.py: the one rule, over the probe's answers) --------------
def _caps(**ok: bool) -> select.Caps:
    return select.Caps(
        {
            n: (ok.get(n, True), f"synthetic {n}")
            for n in [*EXPECTED, "store_xattrs", "store_trusted_xattrs"]
        }
    )


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("VELO_FORCE_LOWER", raising=False)
    monkeypatch.delenv("VELO_OVERLAY_MODE", raising=False)
    yield monkeypatch


def test_overlay_mode_rule(synthetic: pytest.MonkeyPatch) -> None:
    """Real root gets the root-native mount where the probe made one — also where no user
    namespace can mount an overlay (Linux 5.10) or exist at all (max_user_namespaces=0); root-free
    and root without it get userns; the reason is reported; forcing an impossible mode is an
    error, not a silent fallback."""
    c = select.decide(_caps())
    assert (c.backend, c.mode, c.locked) == ("overlay", "native", True)
    assert "synthetic overlay_native" in c.mode_reason
    old = select.decide(_caps(overlay_root=False, overlay_userns=False, data_only_native=False))
    assert (old.backend, old.mode, old.form) == ("overlay", "native", "links")
    no_userns = select.decide(
        _caps(userns=False, userns_root=False, overlay_root=False, overlay_userns=False)
    )
    assert (no_userns.backend, no_userns.mode, no_userns.locked) == ("overlay", "native", False)
    assert "NOT locked" in select.mounts_note(no_userns)
    fallback = select.decide(_caps(overlay_native=False))
    assert (fallback.mode, fallback.form) == ("userns", "data-only")
    assert "synthetic overlay_native" in fallback.mode_reason
    unpriv = select.decide(_caps(root=False))
    assert (unpriv.mode, unpriv.privileged) == ("userns", False)
    assert select.decide(_caps(), "shim").mode == ""
    synthetic.setenv("VELO_OVERLAY_MODE", "userns")
    assert select.decide(_caps()).mode == "userns"
    synthetic.setenv("VELO_OVERLAY_MODE", "native")
    refused = select.decide(_caps(root=False))
    assert refused.error_reason == Reason.BACKEND_UNAVAILABLE.value
    synthetic.setenv("VELO_OVERLAY_MODE", "rootful")
    with pytest.raises(VeloError) as info:
        select.decide(_caps())
    assert info.value.reason is Reason.USAGE


def test_lower_form_prefers_data_only(synthetic: pytest.MonkeyPatch) -> None:
    assert select.choose_form(_caps(), privileged=True) == ("data-only", False)
    caps = _caps(data_only_userns=False)
    assert select.choose_form(caps, privileged=False) == ("links", False)
    assert select.choose_form(caps, privileged=True) == ("data-only", False)


@pytest.mark.parametrize("form", ["links", "data-only"])
def test_force_lower_wins(synthetic: pytest.MonkeyPatch, form: str) -> None:
    synthetic.setenv("VELO_FORCE_LOWER", form)
    assert select.choose_form(_caps(), privileged=False) == (form, True)
    assert select.choose_form(_caps(), privileged=True) == (form, True)


def test_forcing_an_unavailable_form_raises(synthetic: pytest.MonkeyPatch) -> None:
    synthetic.setenv("VELO_FORCE_LOWER", "data-only")
    with pytest.raises(VeloError) as info:
        select.choose_form(_caps(data_only_root=False), privileged=True)
    assert info.value.reason is Reason.OVERLAY_UNSUPPORTED
    assert "synthetic data_only_root" in info.value.message
    synthetic.setenv("VELO_FORCE_LOWER", "hardlinks")
    with pytest.raises(VeloError) as usage:
        select.choose_form(_caps(), privileged=False)
    assert usage.value.reason is Reason.USAGE


def test_backend_rule(synthetic: pytest.MonkeyPatch) -> None:
    """Overlay where it mounts for this privilege and the store holds the xattrs its mode keeps
    markers in (userns: user.*, root-native: trusted.*), else the shim; asking for overlay where
    it cannot work is an error with its reason, not a silent shim."""
    assert select.decide(_caps()).backend == "overlay"
    # root-native needs trusted xattrs only (tmpfs before Linux 6.6 has them, not user ones)
    native = select.decide(_caps(store_xattrs=False))
    assert (native.backend, native.mode) == ("overlay", "native")
    no_trusted = select.decide(_caps(store_trusted_xattrs=False))
    assert no_trusted.backend == "shim" and "store_trusted_xattrs" in no_trusted.backend_reason
    no_xattrs = _caps(store_xattrs=False, overlay_native=False)  # userns mode
    assert select.decide(no_xattrs).backend == "shim"
    assert "synthetic store_xattrs" in select.decide(no_xattrs).backend_reason
    asked = select.decide(no_xattrs, "overlay")
    assert asked.backend == "overlay" and asked.error_reason == Reason.BACKEND_UNAVAILABLE.value
    with pytest.raises(VeloError) as info:
        asked.raise_error()
    assert info.value.reason is Reason.BACKEND_UNAVAILABLE
    unpriv = _caps(root=False, overlay_userns=False)
    assert select.decide(unpriv).backend == "shim"
    assert select.decide(_caps(root=False)).privileged is False
    assert select.decide(_caps(), "shim").backend == "shim"


def test_lower_form_on_this_host(synthetic: pytest.MonkeyPatch) -> None:
    caps = probe.detect()
    want = "data-only" if caps.feature("data_only_userns").ok else "links"
    feats = {n: (f.ok, f.reason) for n, f in caps.features.items()}
    if caps.feature("overlay_userns").ok:
        assert select.choose_form(select.Caps(feats), privileged=False)[0] == want


@pytest.mark.needs("root", "userns")
def test_probe_without_the_overlay_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without overlayfs (fsopen and mount answer ENODEV): every overlay feature is
    "no" with that reason, as root too — the VM matrix's no-overlay box once crashed here."""
    real_fsopen, real_mount = _libc.fsopen, _libc.mount

    def fsopen(fsname: str, flags: int = _libc.FSOPEN_CLOEXEC) -> int:
        if fsname == "overlay":
            raise SysError(errno.ENODEV, "fsopen", fsname)
        return real_fsopen(fsname, flags)

    def mount(source: object, target: object, fstype: object, *a: object, **k: object) -> None:
        if fstype == "overlay":
            raise SysError(errno.ENODEV, "mount", target)  # type: ignore[arg-type]
        real_mount(source, target, fstype, *a, **k)  # type: ignore[arg-type]

    real = probe.detect(refresh=True)
    monkeypatch.setattr(_libc, "fsopen", fsopen)
    monkeypatch.setattr(_libc, "mount", mount)
    caps = probe.detect(refresh=True)
    try:
        for name in (
            "overlay_root",
            "overlay_userns",
            "overlay_native",
            "data_only_root",
            "data_only_native",
            "fsconfig_fd",
        ):
            feature = caps.feature(name)
            assert not feature.ok, (name, feature)
            # with that reason, unless a step before the mount already fails on this kernel
            # (data-only lowers on 6.1: no user xattrs on tmpfs, ENOTSUP)
            if real.feature(name).ok or "ENODEV" in real.feature(name).reason:
                assert "ENODEV" in feature.reason, (name, feature)
        assert caps.feature("userns").ok  # namespaces themselves still work
    finally:
        monkeypatch.undo()
        probe.detect(refresh=True)  # later tests see the real host again


def test_the_scratch_of_another_uid_is_removed_by_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root's probes work in a scratch directory with a subdirectory it gives to nobody, and
    remove it afterwards. The old removal walked it by path: a directory checked not to be a
    link, then chmod-ed by path (chmod follows links). The subdirectory's owner swaps a directory
    of it for a link to one of root's right after the removal listed it: root's directory keeps
    its mode and content."""
    from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged
    from veloverlay import files

    if os.geteuid() != 0:
        pytest.skip("needs root to own the victim and give the scratch to another uid")
    holder = tempfile.mkdtemp(prefix="velo-victim-", dir="/dev/shm")
    victim = os.path.join(holder, "v")
    os.mkdir(victim, 0o750)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("root's\n")
    swapped: list[str] = []

    def attack(d: str) -> None:
        if swapped:
            return
        swapped.append(d)

        def swap() -> None:
            os.rmdir(d)
            os.symlink(victim, d)

        run_unprivileged(swap)

    real_immutable = probe.fsflags.is_immutable
    real_clear = getattr(files, "_clear_files", None)  # (absent from the old code)
    scratch = ""

    def is_immutable(path: str) -> bool:  # the old walk: listed, not a link, then chmod
        if path == os.path.join(scratch, "d"):
            attack(path)
        return real_immutable(path)

    def clear_files(dfd: int, unflag: files.Unflag | None) -> list[str]:  # the new one
        assert real_clear is not None
        subdirs: list[str] = real_clear(dfd, unflag)
        if "d" in subdirs and os.path.samestat(os.fstat(dfd), os.stat(scratch)):
            attack(os.path.join(scratch, "d"))
        return subdirs

    try:
        with probe._scratch(mode=0o711) as base:
            scratch = probe._subdir(base, "theirs", owner=UNPRIV_UID)
            run_unprivileged(lambda: os.mkdir(os.path.join(scratch, "d")))
            monkeypatch.setattr(probe.fsflags, "is_immutable", is_immutable)
            monkeypatch.setattr(files, "_clear_files", clear_files, raising=False)
        assert swapped, "the removal never reached the attacker's moment"
        assert os.stat(victim).st_mode & 0o7777 == 0o750
        assert os.listdir(victim) == ["keep"]
        assert not os.path.lexists(scratch)  # the link went, the scratch too
    finally:
        monkeypatch.undo()
        if scratch:
            files.force_rmtree(scratch)
        files.force_rmtree(holder)


def test_nobody_cannot_point_roots_probe_work_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root's probe gives nobody a place to work in. Were the scratch nobody's, nobody could
    rename what root makes in it right after root made it and leave a link in its place: root
    then chown-ed a file of its own to nobody (os.chown follows links) and made, wrote and
    mounted its own probes' files under a directory of its own. Here nobody tries that at each
    directory root makes in the scratch (`unpriv`, `root`, `native`), as soon as it exists: the
    file and the directory keep owner, mode and content, and the probe answers as before."""
    from veloverlay import files, ns

    if os.geteuid() != 0:
        pytest.skip("needs root: the probe hands a directory to nobody only then")
    clean = probe.detect(refresh=True)
    holder = tempfile.mkdtemp(prefix="velo-victim-", dir="/dev/shm")
    os.chmod(holder, 0o755)
    victim_file, victim_dir = os.path.join(holder, "file"), os.path.join(holder, "dir")
    with open(victim_file, "w") as f:
        f.write("root's\n")
    os.chmod(victim_file, 0o644)
    os.mkdir(victim_dir, 0o755)
    with open(os.path.join(victim_dir, "keep"), "w") as f:
        f.write("root's\n")
    targets = {"unpriv": victim_file, "root": victim_dir, "native": victim_dir}
    me, real_mkdir, tried = os.getpid(), os.mkdir, dict[str, str]()

    def swap(path: str, target: str) -> str:
        ns.drop_to_user(probe._NOBODY, probe._NOBODY)
        try:
            os.rename(path, path + ".moved")
            os.symlink(target, path)
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        return "swapped"

    def mkdir(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        full = os.path.join(where, path)
        scratch = os.path.basename(os.path.dirname(full))
        name = os.path.basename(full)
        if os.getpid() == me and scratch.startswith(f"velo-probe-{me}-") and name in targets:
            tried[name] = ns.run_in_child(swap, full, targets[name])

    try:
        monkeypatch.setattr(os, "mkdir", mkdir)  # the probe's mkdir, in this process only
        try:
            caps = probe.detect(refresh=True)
        finally:
            monkeypatch.undo()
        assert set(tried) == set(targets), "nobody never got its moment"
        fst, dst = os.stat(victim_file), os.stat(victim_dir)
        with open(victim_file) as f:
            content = f.read()
        seen = {
            "file": (fst.st_uid, fst.st_gid, oct(fst.st_mode & 0o7777), content),
            "dir": (
                dst.st_uid,
                dst.st_gid,
                oct(dst.st_mode & 0o7777),
                sorted(os.listdir(victim_dir)),
            ),
        }
        assert seen == {"file": (0, 0, "0o644", "root's\n"), "dir": (0, 0, "0o755", ["keep"])}, (
            tried
        )
        assert caps.features == clean.features, tried
        assert set(tried.values()) == {"EACCES"}, tried  # base is root's: no rename in it
    finally:
        monkeypatch.undo()
        probe.detect(refresh=True)
        files.force_rmtree(holder)


@pytest.mark.skipif(os.geteuid() != 0, reason="root's probe drops to nobody")
def test_a_dropped_childs_answer_is_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child that became nobody is dumpable (it writes its own uid_map), so any process of
    nobody's may ptrace it and have it write anything to root's pipe. Here it writes a pickle
    that creates a file when loaded: root must not load it (the probe just fails)."""
    import pickle

    from veloverlay import ns

    marker = tmp_path / "ran-as-root"
    evil = pickle.dumps(("ok", _Touch(str(marker))))
    monkeypatch.setattr(ns, "_write_all", lambda fd, data: os.write(fd, evil))
    got = probe._in_child(str(tmp_path), drop=True, extras=False)
    assert not marker.exists(), "root unpickled what nobody's child wrote"
    assert got["userns"][0] is False and "probe child failed" in got["userns"][1], got


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))  # loading it creates the file


def _fill(path: str) -> None:
    """A small tmpfs on `path` (this mount namespace only), filled to its last byte."""
    from veloverlay import mount

    mount.mount_tmpfs(path, "size=64k,mode=1777")
    fd = os.open(os.path.join(path, "fill"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _probe_while_full(store_root: str, full: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    from veloverlay import mount, ns
    from veloverlay.store.cas import Store

    ns.enter_mountns()
    mount.make_rprivate("/")
    store = Store.open(store_root)
    for path in full:
        _fill(path)
    during = select.capabilities(store).features["overlay_root"]
    for path in full:
        mount.umount(path)
    after = select.capabilities(store).features["overlay_root"]
    return {"during": during, "after": after}


@pytest.fixture
def root_store() -> Iterator[str]:
    from tests.helpers.trees import force_rmtree
    from veloverlay.store.cas import Store

    base = tempfile.mkdtemp(prefix="velo-test-", dir="/var/tmp")
    try:
        Store.init(os.path.join(base, "store"))
        yield os.path.join(base, "store")
    finally:
        force_rmtree(base)


@pytest.mark.needs("root", "overlay_root")
def test_a_full_dev_shm_does_not_spoil_the_probe(root_store: str) -> None:
    """Any user can fill /dev/shm, where the probes mount their overlays: root's probe then
    failed with ENOSPC, overlay sessions were 'unavailable', and that answer was cached in the
    store for the rest of the boot (every session used the shim). The probes now work in the
    temp dir when /dev/shm has no room."""
    from veloverlay import ns

    r = ns.run_in_child(_probe_while_full, root_store, ("/dev/shm",))
    assert r["during"][0], r
    assert r["after"][0], r


@pytest.mark.needs("root", "overlay_root")
def test_a_probe_that_ran_out_of_room_is_not_cached(root_store: str) -> None:
    """With no room anywhere to probe in, the answer (overlay unavailable: ENOSPC) serves that
    process only: the next one, with room again, probes afresh and gets overlay."""
    from veloverlay import ns

    r = ns.run_in_child(_probe_while_full, root_store, ("/dev/shm", tempfile.gettempdir()))
    assert not r["during"][0] and "ENOSPC" in r["during"][1], r
    assert r["after"][0], r
