"""P0-a on the shim backend: writers that bypass the shim (a static binary, raw syscalls,
chmod-then-write) cannot change a store object in the default (copy) mode; in --link mode the
same attack changes a shared proxy, which verify_proxies (fsck) detects — the documented limit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, fsck_ok, mode_params, new_store
from tests.shim._util import PY, run_shim
from veloverlay import ns
from veloverlay.session.shim.materialize import verify_proxies
from veloverlay.store.cas import Store


def _objects(store: Store) -> dict[str, str]:
    out = {}
    for name, path in store.iter_objects():
        with open(path, "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _attack(base: str, link: bool, exe: str) -> tuple[bool, list[str], list[str], bytes, list[str]]:
    store, _src = new_store(base)
    before = _objects(store)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj}; {exe} raw_write f1 -- raw_chmod_write f3 -- raw_chmod_write exec.sh; "
        # a shimmed process writing through the Tier-1 symlink is refused (EROFS)
        "if printf x >> model.gguf; then exit 9; fi"
    )
    res = run_shim(store, "t", ["sh", "-c", script], link=link, at=proj)
    assert res.exit_status == 0, res
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    f1 = Path(got, "f1").read_bytes()
    findings = [f"{f.kind} {f.path}" for f in verify_proxies(store)]
    after = _objects(store)
    same = all(after.get(name) == h for name, h in before.items())
    return same, fsck_ok(store), findings, f1, res.warnings


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_copy_mode_objects_cannot_be_reached(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        same, fsck, proxies, f1, warnings = as_mode(
            mode, _attack, base, False, os.fspath(try_syscall)
        )
    assert same, "an object changed"
    assert not fsck and not proxies
    assert f1 == b"raw\n"  # the session's own tree changed, and the stat-diff committed it
    assert any("refused" in w for w in warnings), warnings


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_link_mode_attack_is_detected(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        same, fsck, proxies, f1, _w = as_mode(mode, _attack, base, True, os.fspath(try_syscall))
    assert same, "objects are never linked, even in --link mode"
    assert any(p.startswith("proxy-corrupt") for p in proxies), proxies
    # fsck reports it too (the documented limit of --link is detection), and nothing else.
    assert fsck and all(f.startswith("proxy-corrupt") for f in fsck), fsck
    assert f1 == b"raw\n"


def _shared_link_session(base: str) -> list[str]:
    """The owner's shared store, a 0666 file in the tree, one --link session; the proxies left
    in the store (a store made before proxies were private had a 0755 proxies/: it is again)."""
    from veloverlay.ingest import ingest
    from veloverlay.session.shim.materialize import proxies_dir
    from veloverlay.store.manifest import Manifests

    src = os.path.join(base, "src")
    os.mkdir(src)
    for name, mode in (("open", 0o666), ("mine", 0o644)):
        with open(os.path.join(src, name), "w") as f:
            f.write(f"{name}\n")
        os.chmod(os.path.join(src, name), mode)
    store = Store.init(os.path.join(base, "store"), shared=True)
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    os.makedirs(proxies_dir(store), 0o755)  # as an older version left it
    os.chmod(proxies_dir(store), 0o755)
    res = run_shim(store, "t", ["true"], link=True, at=os.path.join(base, "proj"))
    assert (res.exit_status, res.lower_form) == (0, "link"), res
    found = [os.path.join(d, n) for d, _s, names in os.walk(proxies_dir(store)) for n in names]
    assert any(p.endswith("-0666") for p in found), found
    return found


def _open_for_writing(paths: list[str]) -> list[str]:
    opened = []
    for p in paths:
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
            opened.append(p)
        except OSError:
            pass
    return opened


def test_no_other_user_can_write_the_proxies_of_a_shared_store() -> None:
    """A proxy carries its file's mode: the proxy of a 0666 file was writable by every local
    user through the shared store's 0755 shim-v1/proxies/, and what they wrote showed in every
    tree linking it (and a live session committed it to the owner's ref)."""
    from tests.helpers.unpriv import run_unprivileged

    if os.geteuid() != 0:
        pytest.skip("needs root to be the owner and another uid the attacker")
    with unpriv_tmpdir() as base:
        proxies = as_mode("root", _shared_link_session, base)
        assert run_unprivileged(_open_for_writing, proxies) == []
        assert os.stat(os.path.dirname(os.path.dirname(proxies[0]))).st_mode & 0o777 == 0o700
        # a reader of the shared store still runs fsck's proxy check (nothing it can read)
        assert (
            run_unprivileged(
                lambda: [f.kind for f in verify_proxies(Store.open(os.path.join(base, "store")))]
            )
            == []
        )


def _replaced_target(base: str) -> tuple[str, list[str]]:
    """Root's session at base/u/proj while uid UNPRIV_UID (the owner of base/u) renames the tree
    away and puts a directory of its own in its place; what ref t holds afterwards. (Root's store
    is in base itself: root uses no store in a directory another user owns.)"""
    from tests.helpers.unpriv import UNPRIV_UID
    from tests.session._util import checkout_ref
    from veloverlay.errors import VeloError

    store, _src = new_store(base)
    theirs = os.path.join(base, "u")
    os.mkdir(theirs)
    os.chown(theirs, UNPRIV_UID, UNPRIV_UID)
    proj = os.path.join(theirs, "proj")
    swap = f"mv {proj} {proj}.old && mkdir {proj} && echo evil > {proj}/injected"
    attacker = f"setpriv --reuid={UNPRIV_UID} --regid={UNPRIV_UID} --clear-groups sh -c '{swap}'"
    try:
        res = run_shim(store, "t", ["sh", "-c", attacker], link=False, at=proj)
        outcome = f"{res.state} {res.exit_status}"
    except VeloError as exc:
        outcome = exc.reason.value
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return outcome, sorted(os.listdir(got))


def test_a_replaced_target_is_never_committed() -> None:
    """Whoever can write the target's parent could swap the materialised tree for a directory of
    their own: the end-of-session stat-diff read that directory and committed its content (and
    the deletion of everything else) to root's ref."""
    if os.geteuid() != 0:
        pytest.skip("needs root to be the owner and another uid the attacker")
    with unpriv_tmpdir() as base:
        outcome, names = as_mode("root", _replaced_target, base)
        assert "injected" not in names and "f1" in names, (outcome, names)
        assert os.path.exists(os.path.join(base, "u", "proj", "injected"))  # theirs: left alone
    assert outcome == "target-invalid", outcome


def test_a_target_of_another_user_is_refused() -> None:
    from tests.helpers.unpriv import UNPRIV_UID
    from veloverlay.errors import Reason, VeloError

    if os.geteuid() != 0:
        pytest.skip("needs root to be the owner and another uid the attacker")
    with unpriv_tmpdir() as base:
        proj = os.path.join(base, "proj")
        os.mkdir(proj)
        os.chown(proj, UNPRIV_UID, UNPRIV_UID)  # empty, theirs: they could add files to it

        def session() -> str:
            store, _src = new_store(base)
            try:
                run_shim(store, "t", ["true"], link=False, at=proj)
            except VeloError as exc:
                return exc.reason.value
            return "ran"

        assert as_mode("root", session) == Reason.TARGET_INVALID.value


# Appends `mb` MiB of well-formed records (UTIME events without a path, this pid) to the
# session's journal, as any process of the session's user can: the journal is theirs.
FLOOD = """import os, struct, sys
journal = os.path.join(os.path.dirname(os.environ["VELO_SHIM_CONFIG"]), "journal")
rec = struct.pack("<IHBBIiiIQQQHHI", 0x31524A56, 56, 14, 0, 4, os.getpid(), 0, 0, 0, 0, 0, 0, 0, 0)
block = rec * (1 << 14)
fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
for _ in range(int(sys.argv[1]) * (1 << 20) // len(block)):
    os.write(fd, block)
open("after-flood", "w").write("kept")
"""


def _flooded(base: str, mb: int) -> tuple[int, int, bytes]:
    import resource

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = os.path.join(base, "flood.py")
    Path(script).write_text(FLOOD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run_shim(
        store, "t", ["sh", "-c", f"cd {proj} && {PY} {script} {mb}"], link=False, at=proj
    )
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return res.exit_status, grew // 1024, Path(got, "after-flood").read_bytes()


def test_a_journal_flooded_by_the_session_is_read_in_bounded_memory() -> None:
    """The session finishes (commits) with memory that does not follow the journal's size: the
    end-of-session pass over the journal (who ran without the shim) once read it whole and
    built an object per record, 1.4 GB for 300 MB of records; a journal larger than memory
    made the session impossible to harvest, even by `harvest --resume`."""
    mb = 128
    with unpriv_tmpdir() as base:
        code, grew_mb, kept = ns.run_in_child(_flooded, base, mb)
    assert code == 0 and kept == b"kept"
    assert grew_mb < mb // 2, f"the manager grew by {grew_mb} MiB for a {mb} MiB journal"


INSIDE = r"""
import json, os, subprocess, sys
py, out, src = sys.argv[1], sys.argv[2], sys.argv[3]
res = {"session": os.environ.get("VELO_SESSION"), "ref": os.environ.get("VELO_SESSION_REF")}
for verb in (["ls", "t"], ["ingest", src, "--name", "u"], ["gc"]):
    p = subprocess.run([py, "-m", "veloverlay", "--json", *verb], capture_output=True, text=True)
    res[verb[0]] = [p.returncode, p.stdout]
with open(out, "w") as f:
    json.dump(res, f)
"""


def _commands_inside(base: str) -> tuple[dict[str, object], str]:
    import json
    import sys

    store, src = new_store(base)
    script, out = os.path.join(base, "inside.py"), os.path.join(base, "inside.json")
    with open(script, "w") as f:
        f.write(INSIDE)
    os.environ["VELO_STORE"] = os.fspath(store.root)
    os.environ["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(ns.__file__)))
    res = run_shim(
        store,
        "t",
        [sys.executable, script, sys.executable, out, src],
        link=False,
        at=os.path.join(base, "proj"),
    )
    assert res.exit_status == 0, res
    with open(out) as f:
        return json.load(f), res.session_id


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_veloverlay_commands_in_a_shim_session_read_and_say_why_they_cannot_write(
    mode: str,
) -> None:
    """In a shim session every veloverlay command failed with 'error: [Errno 30] Read-only
    file system: manifests.lmdb/data.mdb' (reason os-error), reading ones (`ls`) too: the shim
    refuses writes into the store, but access(2) said it could write, so the database was
    opened for writing; and the session did not set VELO_SESSION, which the README promises
    and by which commands say why. Now reading commands work and writing ones are
    store-read-only naming the session, as in an overlay session."""
    import json

    with unpriv_tmpdir() as base:
        res, sid = as_mode(mode, _commands_inside, base)
    assert (res["session"], res["ref"]) == (sid, "t")
    rc, out = res["ls"]
    assert rc == 0 and "f1" in out, res
    for verb in ("ingest", "gc"):
        rc, out = res[verb]
        doc = json.loads(out)
        assert rc == 1 and doc["reason"] == "store-read-only", res
        assert sid in doc["error"], res
