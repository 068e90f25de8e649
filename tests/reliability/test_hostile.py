"""P0-a against hostile writers: inside a session, a program tries every route it has to change
store data, and not one object's BLAKE3 changes (nor any file of a lower layer).

Routes: write/append/O_TRUNC/truncate/chmod-then-write on the projected files and on the store
paths themselves, mmap(MAP_SHARED) writes, hard-link then write, rename over, copy_file_range,
fallocate punch hole, writes through a Tier-1 symlink and through /proc/self/fd, and — since the
command is root in its own user namespace — remounting the store read-write or unmounting it.
Run as root and root-free, with both lower forms.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params, new_store
from veloverlay import session
from veloverlay.lower.homes import layer_homes
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck

ATTACK = textwrap.dedent(
    r"""
    import ctypes, errno, json, mmap, os, sys
    target, store, report, per_boot = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    libc = ctypes.CDLL(None, use_errno=True)
    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = "ok"
        except OSError as e:
            results[name] = errno.errorcode.get(e.errno, str(e.errno))
        except Exception as e:  # noqa: BLE001
            results[name] = type(e).__name__

    objs = []
    for d, _dirs, files in os.walk(os.path.join(store, "objects-v2")):
        objs += [os.path.join(d, f) for f in files]
    ids = []
    for d, _dirs, files in os.walk(os.path.join(store, "ids-v1")):
        ids += [os.path.join(d, f) for f in files]
    layers = []
    for d, _dirs, files in os.walk(os.path.join(store, "trees-v1")):
        layers += [os.path.join(d, f) for f in files if os.path.isfile(os.path.join(d, f))
                   and not os.path.islink(os.path.join(d, f))]
    meta = []  # metadata layers in the per-boot cache (data-only form)
    for d, _dirs, files in os.walk(os.path.join(per_boot, "layers")):
        meta += [os.path.join(d, f) for f in files if os.path.isfile(os.path.join(d, f))
                 and not os.path.islink(os.path.join(d, f))]
    victims = objs[:3] + ids[:2] + layers[:3] + meta[:3]
    results["per-boot-files"] = str(len(meta))
    for i, p in enumerate(meta[:3]):
        attempt(f"redirect-xattr-{i}", lambda: os.setxattr(p, "user.overlay.redirect", b"/x"))
        attempt(f"plant-{i}", lambda: open(os.path.join(os.path.dirname(p), "planted"), "w"))

    def write(p, flags):
        fd = os.open(p, flags)
        try:
            os.write(fd, b"EVIL")
        finally:
            os.close(fd)

    for i, p in enumerate(victims):
        attempt(f"append-{i}", lambda: write(p, os.O_WRONLY | os.O_APPEND))
        attempt(f"trunc-{i}", lambda: write(p, os.O_WRONLY | os.O_TRUNC))
        attempt(f"truncate-{i}", lambda: os.truncate(p, 1))
        attempt(f"chmod-write-{i}", lambda: (os.chmod(p, 0o666), write(p, os.O_WRONLY)))
        attempt(f"link-write-{i}", lambda: (os.link(p, p + ".x"), write(p + ".x", os.O_WRONLY)))
        def rename_over():
            with open(p + ".n", "wb") as f:
                f.write(b"EVIL")
            os.rename(p + ".n", p)
        attempt(f"rename-over-{i}", rename_over)
        def mm():
            fd = os.open(p, os.O_RDWR)
            try:
                m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_WRITE)
                m[:1] = b"E"
                m.flush()
            finally:
                os.close(fd)
        attempt(f"mmap-{i}", mm)
        def mm_ro():
            fd = os.open(p, os.O_RDONLY)
            try:
                mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_WRITE)[:1] = b"E"
            finally:
                os.close(fd)
        attempt(f"mmap-rdonly-{i}", mm_ro)
        def cfr():
            src = os.open("/etc/hostname", os.O_RDONLY)
            dst = os.open(p, os.O_WRONLY)
            try:
                os.copy_file_range(src, dst, 4, 0, 0)
            finally:
                os.close(src); os.close(dst)
        attempt(f"copy-file-range-{i}", cfr)
        def punch():
            fd = os.open(p, os.O_RDWR)
            try:
                if libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
                    raise OSError(ctypes.get_errno(), "fallocate")
            finally:
                os.close(fd)
        attempt(f"punch-hole-{i}", punch)
        def procfd():
            fd = os.open(p, os.O_RDONLY)
            try:
                write(f"/proc/self/fd/{fd}", os.O_WRONLY)
            finally:
                os.close(fd)
        attempt(f"proc-fd-{i}", procfd)
    # Through the projection: a Tier-1 symlink, and a Tier-2 file (copy-up: allowed, harmless).
    append = os.O_WRONLY | os.O_APPEND
    attempt("tier1-symlink", lambda: write(os.path.join(target, "model.gguf"), append))
    attempt("tier2-append", lambda: write(os.path.join(target, "f1"), append))
    # Root in its own user namespace: try to make the store writable again, or peel it off.
    def remount():
        for where in (store, os.path.join(store, "objects-v2"), per_boot):
            # MS_REMOUNT | MS_BIND, without MS_RDONLY: make it writable
            if libc.mount(None, where.encode(), None, 0x20 | 0x1000, None) == 0:
                return
        raise OSError(ctypes.get_errno(), "mount")
    attempt("remount-rw", remount)
    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    def setattr_rw():
        attr = MountAttr(0, 0x1, 0, 0)  # clear MOUNT_ATTR_RDONLY
        for where in (os.path.join(store, "objects-v2"), store):
            # mount_setattr(AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr): syscall 442
            if libc.syscall(442, -100, where.encode(), 0x8000, ctypes.byref(attr),
                            ctypes.sizeof(attr)) == 0:
                return
        raise OSError(ctypes.get_errno(), "mount_setattr")
    attempt("setattr-rw", setattr_rw)
    attempt("write-after-setattr", lambda: write(objs[0], os.O_WRONLY | os.O_APPEND))
    attempt("write-after-remount", lambda: write(objs[0], os.O_WRONLY | os.O_APPEND))
    def umount():
        for where in (os.path.join(store, "objects-v2"), store):
            if libc.umount2(where.encode(), 2) != 0:  # MNT_DETACH
                raise OSError(ctypes.get_errno(), "umount2")
    attempt("umount-store", umount)
    attempt("write-after-umount", lambda: (os.chmod(objs[1], 0o644), write(objs[1], append)))
    with open(report, "w") as f:
        json.dump(results, f)
    """
)


def _hash_store(root: str, per_boot: str) -> dict[str, str]:
    """Content and xattrs of every file of the store and of the per-boot layers; names too."""
    out = {}
    dirs = [os.path.join(root, s) for s in ("objects-v2", "ids-v1", "trees-v1")] + [per_boot]
    for top in dirs:
        for d, _dirs, files in os.walk(top):
            for name in files:
                p = os.path.join(d, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    h.update(f.read())
                for x in sorted(os.listxattr(p)):
                    h.update(x.encode() + b"=" + os.getxattr(p, x))
                out[p] = h.hexdigest()
    return out


def _scenario(base: str, form: str) -> dict[str, Any]:
    os.environ["VELO_FORCE_LOWER"] = form
    store, src = new_store(base)
    at = os.path.join(base, "proj")
    script = os.path.join(base, "attack.py")
    with open(script, "w") as f:
        f.write(ATTACK)
    report = os.path.join(base, "report.json")
    # Build the lower layers first (a session), so they exist to be attacked.
    session.run(store, session.SessionOptions(refs=["t"], at=at, discard=True), ["true"])
    per_boot = os.fspath(layer_homes(store)[0])
    before = _hash_store(os.fspath(store.root), per_boot)
    r = session.run(
        store,
        session.SessionOptions(refs=["t"], at=at, discard=True),
        ["/usr/bin/python3", script, at, os.fspath(store.root), report, per_boot],
    )
    after = _hash_store(os.fspath(store.root), per_boot)
    m = Manifests(store)
    try:
        findings = [f"{x.kind} {x.what}" for x in fsck(store, m, jobs=1).findings]
    finally:
        m.close()
    with open(report) as f:
        results = json.load(f)
    changed = sorted(k for k in before.keys() | after.keys() if after.get(k) != before.get(k))
    return {
        "exit": r.exit_status,
        "results": results,
        "changed": changed,
        "fsck": findings,
        "files": len(before),
    }


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_hostile_writers_cannot_change_the_store(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _scenario, base, form)
    assert out["exit"] == 0
    assert out["files"] > 0
    results = out["results"]
    assert results["tier2-append"] == "ok", "copy-up of a Tier-2 file must work"
    assert results["tier1-symlink"] != "ok", "a write through a Tier-1 symlink succeeded"
    assert out["changed"] == [], f"store data changed: {out['changed'][:5]} ({results})"
    assert out["fsck"] == []
    if form == "data-only":  # the metadata layers in the per-boot cache were attacked too
        assert int(results["per-boot-files"]) > 0
        assert all(results[f"redirect-xattr-{i}"] != "ok" for i in range(3)), results
    leaked = {k: v for k, v in results.items() if v == "ok" and k.startswith(("write-after",))}
    assert not leaked, f"the store became writable inside the session: {leaked}"
