"""Root-native overlay sessions (real root, trusted.overlay.*, redirect_dir=on) against the userns
mode: rename(2) of stored directories, layers whose xattr prefix matches the mount, and nothing
of trusted.overlay.* reaching the store."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import (
    FORM_MARKS,
    MODE_MARKS,
    as_mode,
    checkout_ref,
    compare_trees,
    fsck_ok,
    new_store,
    run_session,
    sh,
    use_form,
)

RENAME = (
    "import errno, os, sys\n"
    "os.chdir(sys.argv[1])\n"
    "try:\n"
    "    os.rename('dir1', 'dir1.moved')\n"
    "    os.rename('dir1.moved/sub', 'sub.moved')\n"
    "except OSError as exc:\n"
    "    sys.exit(exc.errno)\n"
)


def _rename(base: str, form: str) -> tuple[int, str, list[str], list[str]]:
    use_form(form)
    store, _src = new_store(base)
    proj, plain = os.path.join(base, "proj"), os.path.join(base, "plain")
    checkout_ref(store, "t", plain)
    res = run_session(store, ["t"], [sys.executable, "-c", RENAME, proj], at=proj)
    if res.exit_status == 0:
        sh("mv dir1 dir1.moved; mv dir1.moved/sub sub.moved", plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return res.exit_status, res.mode, compare_trees(got, plain, since_ns=0), fsck_ok(store)


def _params(modes: tuple[str, ...], *, also: tuple[str, ...] = ()) -> list[pytest.ParameterSet]:
    """(mode, form) with the marks each needs (a data-only form needs the kernel's data-only
    lowers: 6.5+ for root-native and userns alike); `also`: modes whose data-only support the
    test needs too (it mounts their view as well)."""
    out = []
    for m in modes:
        for f in ("data-only", "links"):
            marks = [*MODE_MARKS[m], *FORM_MARKS[m, f]]
            for other in also:
                marks += [*MODE_MARKS[other], *FORM_MARKS[other, f]]
            out.append(pytest.param(m, f, marks=pytest.mark.needs(*marks), id=f"{m}-{f}"))
    return out


@pytest.mark.parametrize(("mode", "form"), _params(("native", "root")))
def test_rename_of_a_stored_directory(mode: str, form: str) -> None:
    """rename(2) of a lower directory (and of a child of the renamed one) succeeds root-native
    and the commit equals a plain directory given the same renames; in a user namespace it is
    EXDEV (userxattr allows no redirect_dir) and nothing changes."""
    with unpriv_tmpdir() as base:
        status, got_mode, problems, findings = as_mode(mode, _rename, base, form)
    if mode == "native":
        assert (status, got_mode) == (0, "native")
    else:
        assert (status, got_mode) == (errno.EXDEV, "userns")
    assert not problems, problems
    assert not findings


def _overlay_xattrs(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            try:
                keys = os.listxattr(p, follow_symlinks=False)
            except OSError:
                continue
            found += [f"{p}: {k}" for k in keys if ".overlay." in k]
    return found


def _prefixes(base: str, form: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """A replaced directory (opaque in the next delta layer) and a deleted file (whiteout),
    committed root-native; then sessions in both modes must see exactly the committed tree."""
    use_form(form)
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    os.environ["VELO_OVERLAY_MODE"] = "native"
    script = (
        "rm -rf dir3; mkdir dir3; printf n > dir3/new; rm d/b; mv dir1 dir1.moved; "
        "rm f2; mkdir f2; printf inside > f2/x"
    )
    run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
    seen = []
    for mode in ("userns", "native"):
        os.environ["VELO_OVERLAY_MODE"] = mode
        out = os.path.join(base, f"seen-{mode}")
        listing = (
            f"cd {proj}; cat f1 f2/x d/c > {out}; ls dir3 d dir1.moved dir1.moved/sub >> {out}; "
            f"ls -d dir1 >> {out} 2>&1 || true"
        )
        res = run_session(store, ["t"], ["sh", "-c", listing], at=proj)
        assert res.mode == mode
        with open(out) as f:
            seen.append(f.read())
    layer_xattrs = _overlay_xattrs(os.path.join(store.root, "trees-v1"))
    boot = os.environ.get("VELO_RUNTIME_DIR")
    if boot != "off":
        from veloverlay.lower import homes

        d = homes.boot_dir(store.root)
        if d is not None:
            layer_xattrs += _overlay_xattrs(os.fspath(d))
    objects = _overlay_xattrs(os.fspath(store.objects))
    return seen, layer_xattrs, objects, fsck_ok(store)


@pytest.mark.parametrize(("mode", "form"), _params(("native",), also=("root",)))
def test_layers_carry_the_prefix_of_their_mount(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        seen, layer_xattrs, objects, findings = as_mode(mode, _prefixes, base, form)
    assert seen[0] == seen[1], seen  # the userns and the root-native view agree
    # nothing resurrected (dir3/w, d/b), dir1 gone, dir1.moved with its children
    want = "one\ninsidesea\nd:\nc\n\ndir1.moved:\nsub\nx\n\ndir1.moved/sub:\ny\n\ndir3:\nnew\n"
    assert seen[0].startswith(want), seen[0]
    assert "No such file" in seen[0][len(want) :]
    # Each layer set carries its own prefix: userns layers user.overlay.*, root-native ones
    # (named <form>-trusted-...) trusted.overlay.*; the store's objects carry neither.
    trusted = [x for x in layer_xattrs if "-trusted-" in x.split("/layers/")[1].split("/")[0]]
    user = [x for x in layer_xattrs if x not in trusted]
    assert trusted and all(x.split(": ")[-1].startswith("trusted.overlay.") for x in trusted)
    assert all(x.split(": ")[-1].startswith("user.overlay.") for x in user), user
    assert any(x.endswith("trusted.overlay.opaque") for x in trusted), trusted  # f2: file->dir
    if form == "data-only":
        assert any(x.endswith("trusted.overlay.metacopy") for x in trusted)
        assert any(x.endswith("user.overlay.metacopy") for x in user)
    assert not objects, objects
    assert not findings
