"""The behaviour suite: {root in a user namespace, root-native, root-free} x {data-only, links} x
file operations; data-only both with its layers in the per-boot cache (the default where a tmpfs
allows; a fresh one per test, as after a reboot) and kept in the store. The tree has the modes
real trees have (0444 files as in every git repository, 0555 and setgid directories,
0600/0700/0755). Root-native sessions rename directories with rename(2) (the kernel's redirects,
harvested); the others get EXDEV and `mv` copies + deletes: either way the committed tree must
equal the plain directory.

Each operation runs as a shell script twice: inside a session projecting the ref (then harvested
and committed) and in a plain directory: a `cp -a` copy of the source the ref was ingested from
(never the product's own checkout of it, so that a bug shared by ingest and checkout cannot
cancel out). The committed version, checked out, must equal the plain directory: bytes, modes,
symlink targets, empty dirs and
mtimes (in the links form too, where every file shows the proxies' normalised mtime: a file a
program renames or copies with its times gets its recorded mtime back). Owners, xattrs and
hard-link identity are not modelled in v1 and not compared. fsck must be clean afterwards.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import (
    OVERLAY_MODE,
    checkout_ref,
    compare_trees,
    fsck_ok,
    head_root,
    mode_form_params,
    mode_params,
    new_store,
    run_session,
    sh,
    use_form,
)
from tests.session._util import as_mode as _as_mode

SCENARIOS: dict[str, str] = {
    "write": "printf XY | dd of=f1 bs=1 seek=2 conv=notrunc status=none",
    "append": "printf more >> f2",
    "truncate": "truncate -s 5 f3",
    "otrunc-rewrite": "printf rewritten > f4",
    "create": "printf hello > new.txt; mkdir -p n/m; printf deep > n/m/deep",
    "delete": "rm d/b",
    "rename-file": "mv f5 f5.renamed",
    "rename-dir": "mv dir1 dir1.moved",
    # Stored directories renamed with untouched siblings and children (dir1/sub, d/c, dir2)
    "rename-dir-into": "mv dir1 d/; mv d/dir1/sub sub.out; printf added > d/dir1/added",
    "rename-dir-changed": "mv dir1 dir9; printf changed > dir9/x; rm dir9/sub/y; "
    "mkdir dir9/sub/new; chmod 700 dir9/sub; touch -d @1100000000 dir9",
    "rename-dir-over-empty": "mv -T dir1 emptydir",
    "rename-dir-swap": "mv dir1 tmp.x; mv dir2 dir1; mv tmp.x dir2",
    "rename-dir-twice": "mv dir1 a1; mv a1 a2; mkdir a1; printf n > a1/n",
    "rename-dir-back": "mv dir1 away; mv away dir1",
    "rename-dir-renamed-parent": "mv dir1/sub dir1/sub2; mv dir1 top1; mv top1/sub2 sub3",
    "rename-dir-rmrf": "mv dir1 gone; rm -rf gone",
    "mkdir-rmdir": "mkdir newdir; rmdir emptydir",
    "symlink": "ln -s f1 sl; ln -s /nonexistent/target dangling",
    "hardlink": "ln f1 hl",
    "chmod": "chmod 600 f6; chmod 700 dir2",
    "utime": "touch -d @1000000000 f7; touch -h -d @1000000001 link; touch -d @1000000002 d",
    "delete-recreate": "rm f8; printf again > f8",
    "dir-to-file": "rm -rf dir3; printf now-a-file > dir3",
    # a directory replaced by a new one of the same name: an opaque directory in the upper dir,
    # whose lower entries (x, sub/y) must not come back
    "replace-dir": "rm -rf dir1; mkdir dir1; printf fresh > dir1/x2; mkdir dir1/sub",
    "file-to-dir": "rm f2; mkdir f2; printf inside > f2/x",
    # a stored file and a stored directory replaced by fifos (not modelled: skipped): the stored
    # entries are gone from the tree the session left, so they are deleted, not kept
    "special-replaces": "rm f1; mkfifo f1; rm -rf dir3; mkfifo dir3; rm d/b; mkfifo d/b",
    "copy-tier1": "cp -a model.gguf model2.gguf; mkdir -p w; cp -a model.gguf w/",
    "unreadable": "printf secret > locked; chmod 000 locked; mkdir ro; printf r > ro/r; "
    "chmod 555 ro; chmod 000 emptydir",
    # sparse files that start with a hole (a disk image, a database file): every byte counts,
    # the hole's zeros too; over and under the 1 MiB small-file read
    "sparse": "truncate -s 2M big; printf end >> big; truncate -s 64K small; printf end >> small; "
    "truncate -s 3M f3",
    # directories whose owner cannot look up their entries (0600: readable, not searchable),
    # a stored one with a change inside, and a new one
    "unsearchable": "printf more >> dir1/x; chmod 600 dir1; mkdir nd; printf n > nd/n; "
    "mkdir nd/in; chmod 600 nd; chmod 100 dir2",
    # the same for the tree's root: not searchable, not even readable
    "unsearchable-root": "printf r > rootfile; mkdir -p n/m; chmod 600 .",
    "unreadable-root": "printf r > rootfile; mkdir -p n/m; chmod 000 .",
    "real-modes": "cat ro.h vendor/lib.h private/run secret >/dev/null; printf x >> shared/data; "
    "chmod 644 ro.h; printf y >> ro.h; rm private/run; chmod 640 secret; printf n > shared/n",
}


def _scenario(base: str, form: str, script: str) -> tuple[list[str], list[str], int]:
    reported = use_form(form, fresh_cache=os.path.join(base, "runtime"))
    store, src = new_store(base, real_modes=True)
    proj = os.path.join(base, "proj")
    plain = os.path.join(base, "plain")
    subprocess.run(["cp", "-a", src, plain], check=True)
    since = time.time_ns() - 10**9
    res = run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
    sh(script, plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    problems = compare_trees(got, plain, since_ns=since)
    assert res.lower_form == reported
    return problems, fsck_ok(store), res.exit_status, res.mode


@pytest.mark.parametrize("mode,form", mode_form_params(store_layers=True, native=True))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_operation(mode: str, form: str, name: str) -> None:
    with unpriv_tmpdir() as base:
        problems, findings, status, got_mode = _as_mode(
            mode, _scenario, base, form, SCENARIOS[name]
        )
    assert status == 0
    assert got_mode == OVERLAY_MODE[mode]
    assert not problems, f"{name}: committed tree != plain directory:\n" + "\n".join(problems)
    assert not findings, findings


def _background(base: str, form: str) -> tuple[bytes, list[tuple[int, str]], list[str]]:
    use_form(form)
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj}; "
        "( trap 'printf done > bg.txt; exit 0' TERM; printf start > bg.txt; "
        "while :; do printf . >> ticks; sleep 0.05; done ) & sleep 0.3"
    )
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "bg.txt"), "rb") as f:
        data = f.read()
    return data, res.killed, fsck_ok(store)


@pytest.mark.parametrize("mode,form", mode_form_params(store_layers=True, native=True))
def test_background_writer_ended_and_harvested(mode: str, form: str) -> None:
    """A process still writing when the command exits gets SIGTERM (its trap's last write is
    harvested) and is reported as killed."""
    with unpriv_tmpdir() as base:
        data, killed, findings = _as_mode(mode, _background, base, form)
    assert data == b"done"
    assert killed, "the background writer should be reported"
    assert not findings


def _read_only_root(base: str, form: str) -> tuple[list[int], list[str], list[str]]:
    from tests.session._util import make_base
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    use_form(form, fresh_cache=os.path.join(base, "runtime"))
    src = os.path.join(base, "src")
    make_base(src)
    os.chmod(src, 0o555)  # the top of a Go module or a Nix store path
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    plain = os.path.join(base, "plain")
    subprocess.run(["cp", "-a", src, plain], check=True)
    proj = os.path.join(base, "proj")
    script = "chmod u+w .; printf b > b; chmod 555 .; cat f1 b"
    statuses = []
    for step in (script, "cat f1 b"):  # the second session stacks the commit as a delta layer
        res = run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {step}"], at=proj)
        statuses.append(res.exit_status)
    sh(script, plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return statuses, compare_trees(got, plain, since_ns=0, file_mtimes=False), fsck_ok(store)


@pytest.mark.parametrize("mode,form", mode_form_params(store_layers=True, native=True))
def test_a_tree_whose_top_is_read_only(mode: str, form: str) -> None:
    """A tree whose top directory is 0555 projects root-free too (renaming a built layer into
    place needs write permission on its top, which has the tree's mode), then a change to it
    is committed and projected again (a delta layer on it)."""
    with unpriv_tmpdir() as base:
        statuses, problems, findings = _as_mode(mode, _read_only_root, base, form)
    assert statuses == [0, 0]
    assert not problems, problems
    assert not findings, findings


FAR = "touch -d @9300000000 far f1 fardir; touch -h -d @9300000000 link; touch -d @-9300000000 f2"


def _far_mtimes(
    base: str,
) -> tuple[int, dict[str, tuple[bytes, int]], dict[str, tuple[bytes, int]]]:
    from veloverlay.store.tree import clamp_mtime

    store, src = new_store(base)
    proj = os.path.join(base, "proj")
    plain = os.path.join(base, "plain")
    subprocess.run(["cp", "-a", src, plain], check=True)
    script = f"printf new > far; mkdir fardir; {FAR}"
    res = run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
    sh(script, plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)

    def seen(root: str, clamp: bool) -> dict[str, tuple[bytes, int]]:
        out = {}
        for name in ("far", "f1", "f2", "fardir", "link"):
            p = os.path.join(root, name)
            st = os.lstat(p)
            data = (
                os.readlink(p).encode()
                if os.path.islink(p)
                else b"dir"
                if os.path.isdir(p)
                else open(p, "rb").read()
            )
            out[name] = (data, clamp_mtime(st.st_mtime_ns) if clamp else st.st_mtime_ns)
        return out

    return res.exit_status, seen(got, False), seen(plain, True)


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_mtimes_beyond_what_a_manifest_records(mode: str) -> None:
    """A session that sets mtimes past 2262-04-11 or before 1677-09-21 (`touch -d @9300000000`:
    tmpfs and ext4 keep them, an i64 of nanoseconds cannot) is harvested and committed, those
    mtimes recorded as the nearest bound; it used to fail the harvest with a struct.error
    traceback and stay unharvestable."""
    with unpriv_tmpdir() as base:
        status, got, plain = _as_mode(mode, _far_mtimes, base)
    assert status == 0
    assert plain["far"][1] == 2**63 - 1 and plain["f2"][1] == -(2**63)  # the bounds were hit
    assert got == plain


SPARSE_SIZE = 256 << 20


def _sparse_object(base: str) -> tuple[int, int, int, bytes, list[str]]:
    from veloverlay.store.manifest import Manifests

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    # a file with no blocks in the upper dir, then a few bytes of data at its end
    script = f"truncate -s {SPARSE_SIZE} img; printf end >> img"
    res = run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            e = m.lookup(txn, root, b"img")
    finally:
        m.close()
    assert e is not None
    st = os.stat(store.object_path_b(e.digest))
    with open(store.object_path_b(e.digest), "rb") as f:
        f.seek(SPARSE_SIZE - 1)
        tail = f.read()
    return res.exit_status, e.size, st.st_blocks * 512, tail, fsck_ok(store)


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_sparse_file_stays_sparse_in_the_store(mode: str) -> None:
    """`truncate -s 256M img` in a session costs no blocks in the upper dir; its harvest used to
    copy it with copy_file_range, which writes the holes as allocated zeros: a command could fill
    the store's disk (or a tmpfs store's RAM) with files that cost it nothing. The object keeps
    the holes (and the exact bytes: fsck re-hashes it)."""
    with unpriv_tmpdir() as base:
        status, size, allocated, tail, findings = _as_mode(mode, _sparse_object, base)
    assert status == 0
    assert (size, tail) == (SPARSE_SIZE + 3, b"\0end")
    assert allocated < 8 << 20, allocated
    assert not findings, findings


LINKS = 200


def _many_links(base: str) -> tuple[int, list[int], int, bool, list[str]]:
    from veloverlay.session.overlay import harvest

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = (
        "head -c 2097152 /dev/urandom > big; mkdir ln; i=0; "
        f"while [ $i -lt {LINKS} ]; do ln big ln/$i; i=$((i+1)); done; ln -f big f1"
    )
    read: list[int] = []
    real = harvest.harvest_upper

    def counted(*args: object, **kw: object) -> harvest.HarvestResult:
        got = real(*args, **kw)  # type: ignore[arg-type]
        read.append(got.bytes_read)
        return got

    harvest.harvest_upper = counted  # type: ignore[assignment]  # a forked child
    res = run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "big"), "rb") as f:
        data = f.read()
    names = [os.path.join(got, "ln", str(i)) for i in range(LINKS)] + [os.path.join(got, "f1")]
    same = all(open(p, "rb").read() == data for p in names)
    return res.exit_status, read, len(data), same, fsck_ok(store)


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_many_hard_links_are_read_once(mode: str) -> None:
    """200 hard links to a 2 MiB file made in a session (one over a stored file): each name is
    committed with the file's content, and the harvest reads the inode once. It used to read
    every name in full: 65,000 links to a 1 GB file, which cost the command nothing, made the
    harvest read 65 TB."""
    with unpriv_tmpdir() as base:
        status, read, size, same, findings = _as_mode(mode, _many_links, base)
    assert status == 0
    assert size == 2 << 20 and same
    assert read == [size], read
    assert not findings, findings


# Each file its own mtime; a and b share their content (so one content, two recorded mtimes).
MOVED_FILES = {
    "a": (b"same\n", 1_100_000_000),
    "b": (b"same\n", 1_200_000_000),
    "c": (b"sea\n", 1_300_000_000),
    "e": (b"ee\n", 1_400_000_000),
    "dir1/x": (b"ex\n", 1_500_000_000),
    "dir1/sub/y": (b"why\n", 1_600_000_000),
}
# rename (one of two equal contents), rename over another file, copy with its times, rename
# of a directory (EXDEV and copied in a user-namespace overlay; a redirect root-native)
MOVES = "mv a a.moved; cp -a c c.copy; mv e c; mv dir1 dir1.moved"


def make_moved_src(src: str) -> None:
    for rel, (data, mtime) in MOVED_FILES.items():
        p = os.path.join(src, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, ns=(mtime, mtime))
    for d in ("dir1/sub", "dir1", ""):
        os.utime(os.path.join(src, d), ns=(1_000_000_000_000_000_000,) * 2)


def _moved(base: str, form: str) -> tuple[list[str], list[str]]:
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    use_form(form, fresh_cache=os.path.join(base, "runtime"))
    src = os.path.join(base, "src")
    make_moved_src(src)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    plain = os.path.join(base, "plain")
    subprocess.run(["cp", "-a", src, plain], check=True)
    since = time.time_ns() - 10**9
    proj = os.path.join(base, "proj")
    run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {MOVES}"], at=proj)
    sh(MOVES, plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return compare_trees(got, plain, since_ns=since, file_mtimes=True), fsck_ok(store)


@pytest.mark.parametrize(
    "mode,form", [p for p in mode_form_params(native=True) if p.values[1] == "links"]
)
def test_links_form_a_moved_file_keeps_its_recorded_mtime(mode: str, form: str) -> None:
    """In the links form every Tier-2 file shows the proxies' normalised mtime (1970-01-01
    00:00:01); a file renamed or copied with `cp -a` carried that mtime to its new path and was
    committed with it, where a plain directory keeps the file's own. It gets the mtime the view
    records for its content back (the removed path's where two paths share the content)."""
    with unpriv_tmpdir() as base:
        problems, findings = _as_mode(mode, _moved, base, form)
    assert not problems, "committed tree != plain directory:\n" + "\n".join(problems)
    assert not findings, findings
