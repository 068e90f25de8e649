"""How a shim session ends: commit, --discard, --no-commit, a ref that moved meanwhile (merged
when disjoint, kept as REF@<session> on conflict)."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import veloverlay
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, fsck_ok, mode_params, new_store, ref_modes
from tests.shim._util import run_shim
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.verbs.repo import Repo


def _cat(store: Store, spec: str, path: str) -> bytes:
    r = Repo.open(os.fspath(store.root))
    try:
        out = io.BytesIO()
        r.cat(spec, path, out)
        return out.getvalue()
    finally:
        r.close()


def _refs(store: Store) -> list[str]:
    r = Repo.open(os.fspath(store.root))
    try:
        return sorted(ref.name for ref, _c in r.refs())
    finally:
        r.close()


def test_discard_and_no_commit() -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        proj = os.path.join(base, "proj")
        cmd = ["sh", "-c", f"cd {proj} && printf changed > f1"]
        res = run_shim(store, "t", cmd, link=False, at=proj, discard=True)
        assert res.commit is None and res.state == "discarded"
        assert _cat(store, "t", "f1") == b"one\n" and _refs(store) == ["t"]
        assert not os.path.exists(proj)
        res = run_shim(store, "t", cmd, link=False, at=proj, commit=False)
        assert res.commit is None and res.conflict_ref == f"t@{res.session_id}"
        assert _cat(store, res.conflict_ref, "f1") == b"changed"
        assert _cat(store, "t", "f1") == b"one\n"
        assert not fsck_ok(store)


_SECRET_WRITER = """
import glob, json, os, sys
from veloverlay.session.shim.daemon import request_sync
store, proj, out = sys.argv[1:4]
os.umask(0o077)
with open(os.path.join(proj, "secret"), "wb") as f:
    f.write(b"discard me, private %d" % os.getpid())
(state,) = glob.glob(os.path.join(store, "sessions", "*", "state.json"))
with open(out, "w") as f:  # the daemon has folded the journal in (it commits then, if ever)
    f.write(str(request_sync(json.load(open(state))["socket"], timeout=10.0)))
"""


def test_discard_publishes_nothing_the_session_wrote() -> None:
    """--discard keeps nothing: the live view's commits published what the session wrote as
    store objects (0444) that outlived it; in a shared store every local user could read a file
    the session wrote under umask 077. Now the daemon commits nothing live for such a session.
    Its command asks the daemon to sync (as `status` does) before it exits."""
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        os.chmod(store.root, 0o755)  # a shared store: readable by every local user
        proj, out = os.path.join(base, "proj"), os.path.join(base, "synced")
        env = f"PYTHONPATH={os.path.dirname(os.path.dirname(veloverlay.__file__))}"
        cmd = ["env", env, sys.executable, "-c", _SECRET_WRITER, os.fspath(store.root), proj, out]
        res = run_shim(store, "t", cmd, link=False, at=proj, discard=True)
        assert res.exit_status == 0 and res.state == "discarded"
        with open(out) as f:
            assert f.read() == "True"  # the daemon answered: its tick ran after the write
        leaked = [
            name
            for _dir, _dirs, names in os.walk(store.root / "objects-v2")
            for name in names
            if _content_has(store.root / "objects-v2" / name[:2] / name, b"discard me, private")
        ]
        assert leaked == []
        assert _refs(store) == ["t"]


def _content_has(path: os.PathLike[str], needle: bytes) -> bool:
    with open(path, "rb") as f:
        return needle in f.read()


def _move_ref(store: Store, path: bytes, data: bytes) -> None:
    m = Manifests(store)
    try:
        with store.stage() as stage:
            digest = stage.add_bytes(data)
            stage.publish()
        with m.write() as txn:
            ref, c = m.resolve(txn, "t")
            e = Entry(path.rsplit(b"/", 1)[-1], Kind.FILE, 0o644, len(data), 1, digest, b"", 2)
            root = m.apply(txn, bytes.fromhex(c.root), [Op(OpKind.PUT, path, e)])
            m.commit(txn, "t", root, expect_head=ref.head, message="moved meanwhile")
    finally:
        m.close()


def _session_while_ref_moves(base: str, store: Store, path: bytes, data: bytes):  # type: ignore[no-untyped-def]
    proj = os.path.join(base, "proj")
    go, started = os.path.join(base, "go"), os.path.join(base, "started")
    script = (
        f"cd {proj}; printf mine > f1; touch {started}; while [ ! -e {go} ]; do sleep 0.02; done"
    )
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            res = run_shim(store, "t", ["sh", "-c", script], link=False, at=proj)
            os.write(wfd, repr((res.commit, res.conflict_ref, res.conflicts)).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    deadline = time.monotonic() + 10
    while not os.path.exists(started):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _move_ref(store, path, data)
    Path(go).touch()
    out = b""
    while chunk := os.read(rfd, 4096):
        out += chunk
    os.waitpid(pid, 0)
    return eval(out.decode())  # noqa: S307 - our own repr


def test_ref_moved_disjoint_changes_merge() -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        commit, kept, conflicts = _session_while_ref_moves(base, store, b"f2", b"theirs")
        assert commit and kept is None and not conflicts
        assert _cat(store, "t", "f1") == b"mine" and _cat(store, "t", "f2") == b"theirs"
        assert _refs(store) == ["t"]


def test_ref_moved_conflict_keeps_the_session() -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        commit, kept, conflicts = _session_while_ref_moves(base, store, b"f1", b"theirs")
        assert commit is None and kept and conflicts == ["f1"]
        assert _cat(store, "t", "f1") == b"theirs" and _cat(store, kept, "f1") == b"mine"
        assert not fsck_ok(store)


def test_command_not_found_is_127_and_no_false_alarm() -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        proj = os.path.join(base, "proj")
        res = run_shim(store, "t", ["/nonexistent/program"], link=False, at=proj)
        assert res.exit_status == 127 and res.commit is None
        assert not [w for w in res.warnings if "without the shim" in w], res.warnings
        assert not os.path.exists(proj) and _refs(store) == ["t"]


def test_an_empty_command_name_is_127_as_in_a_shell() -> None:
    """The shim's reaper (fork + exec) exited 126, 'execve: argv first element cannot be
    empty', for `run REF -- ''`; a shell says 'command not found', 127."""
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        res = run_shim(store, "t", [""], link=False, at=os.path.join(base, "proj"))
        assert res.exit_status == 127 and res.commit is None


def _setid_session(base: str, backend: str) -> tuple[dict[str, int], list[str], list[str]]:
    from tests.session._util import run_session

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = f"cd {proj} && : > s && chmod 6755 s && : > g && chmod 2711 g && chmod 1755 f1"
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj, backend=backend)
    return ref_modes(store, "t", ("s", "g", "f1")), res.warnings, fsck_ok(store)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_setid_bits_a_session_sets_are_not_committed(mode: str, backend: str) -> None:
    """Both backends, as ingest does unless asked: a session does not mint setuid/setgid files
    (the shim committed 6755), and says so; the sticky bit is kept."""
    with unpriv_tmpdir() as base:
        modes, warnings, findings = as_mode(mode, _setid_session, base, backend)
    assert modes == {"s": 0o755, "g": 0o711, "f1": 0o1755}
    assert any("setuid/setgid bits removed from 2 file(s)" in w for w in warnings), warnings
    assert findings == []


def _setid_rewritten(base: str, backend: str) -> tuple[dict[str, int], bytes, list[str]]:
    from tests.session._util import run_session

    store, _src = new_store(base, modes={"exec.sh": 0o4755, "f2": 0o2755}, keep_setid=True)
    proj = os.path.join(base, "proj")
    # New content behind the setuid path, and the bit set again after the write (the kernel
    # clears it on a write); f2 is only touched (copied up, content the manifest's).
    script = f"cd {proj} && printf '#!/bin/sh\\nid\\n' > exec.sh && chmod 4755 exec.sh && touch f2"
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj, backend=backend)
    modes = ref_modes(store, "t", ("exec.sh", "f2"))
    return modes, _cat(store, "t", "exec.sh"), res.warnings


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_new_content_under_kept_setid_bits_loses_them(mode: str, backend: str) -> None:
    """A setuid file of the ref (ingested --keep-setid) that the command rewrote and made
    setuid again kept the bit with the command's content: a root-free user's program, setuid
    root in a later root checkout --keep-setid or root session. Bits are kept only with the
    content they were stored with."""
    with unpriv_tmpdir() as base:
        modes, content, warnings = as_mode(mode, _setid_rewritten, base, backend)
    assert content == b"#!/bin/sh\nid\n"  # what the command wrote, committed
    assert modes == {"exec.sh": 0o755, "f2": 0o2755}  # (a touch keeps them, as on a plain dir)
    assert any("setuid/setgid bits removed from 1 file(s)" in w for w in warnings), warnings


def _setid_on_host(base: str, link: bool) -> tuple[str, dict[str, int], list[str], list[str]]:
    """A shim session of a ref with a setuid and a setgid file (kept at ingest): what the
    command finds with setid bits in the projection (a real tree on the host) and in the
    store's proxies, and the modes committed after it touched one and left the other."""
    store, _src = new_store(base, modes={"exec.sh": 0o4755, "f2": 0o2755}, keep_setid=True)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "found")
    find = f"find {proj} {store.root} -type f -perm /6000 > {out}"
    res = run_shim(store, "t", ["sh", "-c", f"{find} && touch {proj}/f2"], link=link, at=proj)
    assert res.exit_status == 0, res
    modes = ref_modes(store, "t", ("exec.sh", "f2"))
    with open(out) as f:
        return f.read(), modes, res.warnings, fsck_ok(store)


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_shim_projection_writes_no_setid_file_and_keeps_the_refs_bits(
    mode: str, link: bool
) -> None:
    """The shim wrote a setuid file's bits into its tree on the host (and into the --link
    proxy the tree links to): a root session made a setuid-root program any user reaching the
    target could run, which `checkout` never writes unless asked. Root-free, the data written
    after the create cleared the bits instead, and the touched f2 was committed without its
    setgid bit, where a plain directory keeps it. Now no setid file is written; the ref keeps
    the bits of files whose content the session did not change, and the session says so."""
    with unpriv_tmpdir() as base:
        found, modes, warnings, findings = as_mode(mode, _setid_on_host, base, link)
    assert found == ""
    assert modes == {"exec.sh": 0o4755, "f2": 0o2755}
    assert any("2 setuid/setgid file(s) projected without" in w for w in warnings), warnings
    assert findings == []


def test_a_file_that_kept_changing_at_the_end_keeps_the_tree(monkeypatch: Any) -> None:
    """A file still changing when the final sync read it (a writer outside the session that
    opens, writes and closes it again and again) is left out of the commit. The session's tree
    was removed all the same, and with it the only copy of that file's last bytes. The tree is
    kept now, and the warning says where."""
    from veloverlay.session.shim import treesync

    real = treesync.TreeSync._compare_one

    def unstable(self: Any, dfd: int, name: bytes, *a: Any, **kw: Any) -> Any:
        if name == b"changing":
            raise treesync.Unstable()
        return real(self, dfd, name, *a, **kw)

    monkeypatch.setattr(treesync.TreeSync, "_compare_one", unstable)
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        proj = os.path.join(base, "proj")
        cmd = ["sh", "-c", f"cd {proj} && printf last > changing && printf two > f1"]
        res = run_shim(store, "t", cmd, link=False, at=proj)
        assert res.exit_status == 0 and res.commit is not None
        assert _cat(store, "t", "f1") == b"two"  # the rest is committed
        with open(os.path.join(proj, "changing"), "rb") as f:  # (removed with the tree before)
            assert f.read() == b"last"
        assert any("kept changing" in w and proj in w for w in res.warnings), res.warnings


def _live_view_meddled(base: str, meddle: str) -> dict[str, Any]:
    """A shim session of t that changes f1, waits, then writes `late`; while it waits the live
    view t@<session> is used: an overlay session run on it ("session"), or a rollback of it."""
    from veloverlay import session
    from veloverlay.errors import VeloError

    store, _src = new_store(base)
    proj, other = os.path.join(base, "proj"), os.path.join(base, "other")
    go, started = os.path.join(base, "go"), os.path.join(base, "started")
    script = (
        f"cd {proj}; printf mine > f1; touch {started}; "
        f"while [ ! -e {go} ]; do sleep 0.02; done; printf late > late"
    )
    pid = os.fork()
    if pid == 0:
        try:
            run_shim(store, "t", ["sh", "-c", script], link=False, at=proj)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not os.path.exists(started):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (live,) = [r for r in _refs(store) if "@" in r]
    while _cat(store, live, "f1") != b"mine":  # the daemon commits the live view every ~0.2 s
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = ""
    live_follows, live_commits = False, 0
    try:
        if meddle == "session":
            try:
                opts = session.SessionOptions(refs=[live], at=other, backend="overlay", grace=1.0)
                session.run(store, opts, ["sh", "-c", f"printf x > {other}/x"])
            except VeloError as exc:
                refused = exc.reason.value
        else:
            r = Repo.open(os.fspath(store.root))
            try:
                if meddle == "rollback":
                    r.rollback(live, 1)
                else:
                    r.delete_ref(live)
            except VeloError as exc:
                refused = exc.reason.value
            finally:
                r.close()
            daemon = os.path.join(store.sessions, live.split("@", 1)[1], "daemon.json")
            commits = _daemon_commits(daemon)
            Path(os.path.join(proj, "f2")).write_bytes(b"meanwhile")  # (the shim is not here)
            Path(os.path.join(proj, "f1")).write_bytes(b"mine again")
            deadline = time.monotonic() + 10
            while _live_f1(store, live) != b"mine again" and time.monotonic() < deadline:
                time.sleep(0.05)  # the daemon's stat of a hot path commits it to the live view
            live_follows = _live_f1(store, live) == b"mine again"
            live_commits = _daemon_commits(daemon) - commits
            Path(os.path.join(proj, "f1")).write_bytes(b"mine")
    finally:
        Path(go).touch()  # the session ends whatever failed here (no process left waiting)
        os.waitpid(pid, 0)
    return {
        "refused": refused,
        "live_follows": live_follows if meddle != "session" else None,
        "live_commits": live_commits if meddle != "session" else None,
        "f1": _cat(store, "t", "f1"),
        "late": _cat(store, "t", "late") if b"late" in _ls(store, "t") else None,
    }


def _live_f1(store: Store, live: str) -> bytes | None:
    from veloverlay.errors import VeloError

    try:
        return _cat(store, live, "f1")
    except VeloError:  # (the live view deleted)
        return None


def _daemon_commits(report: str) -> int:
    import json

    try:
        with open(report) as f:
            return int(json.load(f)["commits"])
    except (OSError, ValueError, KeyError):
        return 0


def _ls(store: Store, spec: str) -> list[bytes]:
    m = Manifests(store)
    try:
        with m.read() as txn:
            _r, c = m.resolve(txn, spec)
            return [p for p, _e, _n in m.walk(txn, bytes.fromhex(c.root))]
    finally:
        m.close()


@pytest.mark.parametrize("mode", mode_params("root"))
def test_a_session_on_a_live_view_is_refused(mode: str) -> None:
    """An overlay session of a running shim session's live view `t@<id>` committed into it; the
    shim session then took that commit for its own kept result, skipped its harvest, and what
    it wrote after was lost (its tree removed, exit 0). Such a session is refused."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _live_view_meddled, base, "session")
    assert r["refused"] == "session-active", r
    assert r["f1"] == b"mine" and r["late"] == b"late", r


@pytest.mark.parametrize("meddle", ["rollback", "delete"])
def test_a_rollback_or_deletion_of_the_live_view_is_refused(meddle: str) -> None:
    """A rollback of the live view put a commit that is not the daemon's at its head: the shim
    session's end took it for its own kept result and harvested nothing. Later, the daemon's
    next live commit (which expects its own head) failed and the daemon died: the live view
    stood still for the rest of the session, and the rollback was silently undone at its end
    (a deletion alike). Both are refused while the session runs (session-active); the live
    view goes on following the tree and the end commits everything."""
    with unpriv_tmpdir() as base:
        r = as_mode("root", _live_view_meddled, base, meddle)
    assert r["refused"] == "session-active", r
    assert r["live_follows"] and r["live_commits"] > 0, r
    assert r["f1"] == b"mine" and r["late"] == b"late", r
