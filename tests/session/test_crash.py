"""A manager killed with SIGKILL: the session dies with it, the upper dir stays, `harvest_resume`
commits it later, and nothing stays mounted in the caller's namespace."""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.helpers.cli import ok, velo
from tests.helpers.unpriv import mount_lines, unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, fsck_ok, mode_params, new_store, run_session
from veloverlay import session
from veloverlay.errors import VeloError


def _session_env_procs(sid: str) -> list[int]:
    """Live processes whose environment names the session (ours: same uid, readable)."""
    out = []
    needle = f"VELO_SESSION={sid}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(name))
        except OSError:
            continue
    return out


def _kill_manager(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    pid = os.fork()
    if pid == 0:
        try:
            run_session(
                store,
                ["t"],
                ["sh", "-c", f"cd {proj}; printf x > killed.txt; rm f1; exec sleep 60"],
                at=proj,
            )
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    sid = ""
    while not sid:
        assert time.monotonic() < deadline, "the session did not start"
        for s in os.listdir(store.sessions):
            if os.path.exists(os.path.join(store.sessions, s, "upper", "killed.txt")):
                sid = s
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # The session's processes die with their manager (parent-death signals down the chain).
    deadline = time.monotonic() + 10
    while _session_env_procs(sid):
        assert time.monotonic() < deadline, "session processes outlived their manager"
        time.sleep(0.02)
    states = {i.id: i.state for i in session.list_sessions(store)}
    cleaned = session.clean_sessions(store)
    upper_kept = os.path.exists(os.path.join(store.sessions, sid, "upper", "killed.txt"))
    try:
        session.harvest_resume(store, "no-such-session")
        missing = "ok"
    except VeloError as exc:
        missing = exc.reason.value
    results = session.harvest_resume(store, None)
    again = session.harvest_resume(store, None)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return {
        "state": states[sid],
        "cleaned": cleaned,
        "upper_kept": upper_kept,
        "missing": missing,
        "results": [(r.session_id, r.commit is not None, r.changed) for r in results],
        "again": len(again),
        "sid": sid,
        "killed.txt": open(os.path.join(got, "killed.txt")).read(),
        "f1": os.path.exists(os.path.join(got, "f1")),
        "after": session.list_sessions(store)[0].state,
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_kill_manager_then_resume(mode: str) -> None:
    before = mount_lines()
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _kill_manager, base)
        assert not [line for line in mount_lines() if base in line]
    assert mount_lines() == before
    assert r["state"] == "dead-unharvested"
    assert r["cleaned"] == 0 and r["upper_kept"]
    assert r["missing"] == "session-not-found"
    assert r["results"] == [(r["sid"], True, 2)]  # added, deleted (the root mtime is no change)
    assert r["again"] == 0
    assert r["killed.txt"] == "x" and r["f1"] is False
    assert r["after"] == "harvested"
    assert r["fsck"] == []


def _killed_in_harvest(base: str) -> dict[str, object]:
    """A manager killed by a crash point after the harvest opened up what the session made
    unreadable, then the session harvested again."""
    import stat
    import subprocess
    import sys

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj} && mkdir nd && printf x > nd/x && chmod 000 nd && printf s > locked && "
        "chmod 000 locked && printf z > z"
    )
    env = dict(os.environ, VELO_INTERNAL__TEST_FAULT="harvest.file:3")  # locked, nd/x, z
    r = subprocess.run(
        [sys.executable, "-m", "veloverlay", "--store", os.fspath(store.root), "run", "t"]
        + ["--at", proj, "--", "sh", "-c", script],
        env=env,
        capture_output=True,
    )
    results = session.harvest_resume(store, None)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return {
        "killed": r.returncode == -signal.SIGKILL,
        "resumed": [res.commit is not None for res in results],
        "modes": {
            n: stat.S_IMODE(os.lstat(os.path.join(got, n)).st_mode) for n in ("nd", "locked")
        },
        "fsck": fsck_ok(store),
        "stderr": r.stderr[-800:],
    }


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_resumed_harvest_keeps_the_modes_the_session_set(mode: str) -> None:
    """The harvest opens up what the session made unreadable (a 000 directory, a 000 file) to
    read it, and gives each its mode back at once: a harvest killed midway and resumed commits
    the modes the session left, not the opened-up ones."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _killed_in_harvest, base)
    assert r["killed"] and r["resumed"] == [True], r
    assert r["modes"] == {"nd": 0, "locked": 0}
    assert r["fsck"] == []


def _all_past_a_failure(base: str) -> dict[str, object]:
    """Two sessions killed in their harvest; the first one's upper dir is then damaged (a
    symbolic link in its place), and `harvest --all` runs."""
    import subprocess
    import sys

    store, _src = new_store(base)
    velo = [sys.executable, "-m", "veloverlay", "--store", os.fspath(store.root)]
    env = dict(os.environ, VELO_INTERNAL__TEST_FAULT="harvest.file:1")
    for i in (1, 2):
        proj = os.path.join(base, f"proj{i}")
        script = f"cd {proj} && printf {i} > new{i}"
        subprocess.run([*velo, "run", "t", "--at", proj, "--", "sh", "-c", script], env=env)
    first = sorted(os.listdir(store.sessions))[0]
    upper = os.path.join(store.sessions, first, "upper")
    os.rename(upper, upper + ".gone")
    os.symlink("/", upper)
    r = subprocess.run([*velo, "--json", "harvest", "--all"], capture_output=True)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return {
        "rc": r.returncode,
        "json": json.loads(r.stdout),
        "stderr": r.stderr.decode(),
        "first": first,
        "states": {i.id: i.state for i in session.list_sessions(store)},
        "got": sorted(n for n in os.listdir(got) if n.startswith("new")),
        "lost": sorted(n for n in os.listdir(upper + ".gone") if n.startswith("new")),
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", mode_params("root"))
def test_harvest_all_goes_past_a_session_it_cannot_harvest(mode: str) -> None:
    """`harvest --all` stopped at the first session it could not harvest (a full store, a
    damaged upper dir): every session after it stayed unharvested. It harvests the others, warns
    about each failure and exits 1 with the first one's error."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _all_past_a_failure, base)
    states = dict(r["states"])  # type: ignore[call-overload]
    assert r["rc"] == 1, r
    assert f"warning: session {r['first']} could not be harvested" in str(r["stderr"]), r
    assert str(r["stderr"]).count("could not be harvested") == 2, r  # the warning, the error
    assert states.pop(r["first"]) == "dead-unharvested"
    assert list(states.values()) == ["harvested"], r
    assert len(r["got"]) == 1 and r["got"] != r["lost"], r  # the other one's file
    doc = r["json"]  # one document: what was harvested, what failed, the first failure's fields
    assert isinstance(doc, dict) and doc["reason"] and doc["error"], doc
    assert [h["session_id"] for h in doc["harvested"]] == [s for s in states]
    assert [f["session_id"] for f in doc["failed"]] == [r["first"]]
    # each failure is an error object (docs/errors.md): `error` as every one has (not only
    # `message`), with the first failure's text and reason
    (one,) = doc["failed"]
    assert {"error", "reason", "hint", "detail", "path"} <= set(one), one
    assert (one["error"], one["reason"]) == (doc["error"], doc["reason"]), doc
    assert r["fsck"] == []


def test_a_dead_unharvested_session_points_to_harvest_not_to_the_log(shm_tmp: str) -> None:
    """`diff --session ID` of a session whose manager died said "what it committed: veloverlay
    log REF": it committed nothing, its changes wait in its upper dir. The hint now names the
    command that commits them (a finished session still points to the log)."""
    from veloverlay.session import state as state_mod

    store, _src = new_store(shm_tmp)
    sid = state_mod.new_id()
    os.makedirs(store.sessions / sid)
    # a manager that is not running: this pid with another start time
    st = state_mod.State(
        id=sid, refs=["t"], bases=[""], view_root="", target=shm_tmp, state="running"
    )
    st.pid, st.pid_start = os.getpid(), -1
    state_mod.save(store, st)
    with pytest.raises(VeloError) as ei:
        state_mod.load_running(store, sid)
    assert "dead-unharvested" in ei.value.message
    assert ei.value.hint is not None and f"harvest --resume {sid}" in ei.value.hint
    st.state = "harvested"
    state_mod.save(store, st)
    with pytest.raises(VeloError) as ei:
        state_mod.load_running(store, sid)
    assert ei.value.hint == "what it committed: veloverlay log t"


@pytest.mark.parametrize("tz", ["Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"])
def test_session_ids_carry_utc_whatever_the_time_zone(
    tz: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session ids were made from local time, and sessions are listed and `harvest --all`
    finishes them in the order of their ids: a session a user in UTC+14 started sorted after
    one started later in UTC-11 (25 hours apart), and so did sessions across a DST change.
    The id's time is now the UTC of its making, whatever TZ says."""
    import calendar

    from veloverlay.session import state as state_mod

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        before = int(time.time())
        sid = state_mod.new_id()
        after = time.time()
    finally:
        monkeypatch.undo()
        time.tzset()
    made = calendar.timegm(time.strptime(sid[:15], "%Y%m%d-%H%M%S"))
    assert before <= made <= after, (sid, tz)


def test_sessions_json_start_iso_names_its_utc_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sessions --json` gave start_iso as local time without an offset ("2026-12-07T20:48:07"
    under TZ=Pacific/Kiritimati): a script could not tell the instant. It carries the offset."""
    from datetime import datetime

    from veloverlay.session.options import SessionInfo

    start = 1_796_000_000.0
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        shown = SessionInfo("x", ["t"], "running", start, 1, "/t").to_dict()["start_iso"]
    finally:
        monkeypatch.undo()
        time.tzset()
    when = datetime.fromisoformat(shown)
    assert when.utcoffset() is not None and when.timestamp() == start, shown


def _paused(here: int, there: int, real: Callable[..., None], *a: object) -> None:
    os.write(here, b"x")
    select.select([there], [], [], 3.0)
    real(*a)


def _two_resumes(base: str) -> dict[str, object]:
    """A session whose manager died in its harvest, then two `harvest --resume` of it at once:
    each pauses where it has read the state and checks for holders, until the other one is
    there too (or 3 s have passed: it may be waiting for the first to finish)."""
    import subprocess
    import sys

    from veloverlay.session.overlay import backend

    store, _src = new_store(base)
    velo = [sys.executable, "-m", "veloverlay", "--store", os.fspath(store.root)]
    proj = os.path.join(base, "proj")
    script = f"cd {proj} && mkdir big && for i in $(seq 1 200); do echo $i > big/f$i; done"
    env = dict(os.environ, VELO_INTERNAL__TEST_FAULT="harvest.file:1")
    subprocess.run([*velo, "run", "t", "--at", proj, "--", "sh", "-c", script], env=env)
    (sid,) = os.listdir(store.sessions)
    pipes = [os.pipe(), os.pipe()]
    pids = []
    for me in (0, 1):
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                backend._refuse_if_held = functools.partial(  # type: ignore[assignment]
                    _paused, pipes[me][1], pipes[1 - me][0], backend._refuse_if_held
                )
                try:
                    code = 0 if session.harvest_resume(store, sid) else 5
                except VeloError as exc:
                    code = 3 if "already harvested" in exc.message else 4
            finally:
                os._exit(code)
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    from veloverlay.store.manifest import Manifests

    mf = Manifests(store)
    try:
        with mf.read() as txn:
            ref = mf.get_ref(txn, "t")
            assert ref is not None
            by_session = []
            cid: str | None = ref.head
            while cid is not None:
                c = mf.get_commit(txn, cid)
                by_session += [c.id] if c.session == sid else []
                cid = c.parent
            refs = [r.name for r in mf.refs(txn)]
    finally:
        mf.close()
    (st,) = session.list_sessions(store)
    return {
        "codes": codes,
        "commits": len(by_session),
        "refs": refs,
        "state": st.state,
        "files": len(os.listdir(os.path.join(got, "big"))),
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", mode_params("root"))
def test_two_resumes_at_once_harvest_the_session_once(mode: str) -> None:
    """Two `harvest --resume` (or `--all`) of one dead session at once both harvested it: the
    first removed the upper dir while the second still walked it (a raw ENOENT, or a partial
    tree kept as a conflict). One harvests; the other waits, then finds it harvested."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _two_resumes, base)
    assert r["codes"] == [0, 3], r
    assert r["commits"] == 1 and r["refs"] == ["t"], r
    assert r["state"] == "harvested" and r["files"] == 200, r
    assert r["fsck"] == []


def _resume_after_pid_reuse(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    pid = os.fork()
    if pid == 0:
        try:
            script = f"cd {proj}; printf x > killed.txt; exec sleep 60"
            run_session(store, ["t"], ["sh", "-c", script], at=proj)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    sid = ""
    while not sid:
        assert time.monotonic() < deadline, "the session did not start"
        for s in os.listdir(store.sessions):
            if os.path.exists(os.path.join(store.sessions, s, "upper", "killed.txt")):
                sid = s
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while _session_env_procs(sid):
        assert time.monotonic() < deadline, "session processes outlived their manager"
        time.sleep(0.02)
    # The session's namespace child is gone; its number now belongs to another process of
    # this user (pid reuse, or the same number in the pid namespace `harvest` runs in).
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        path = os.path.join(store.sessions, sid, "state.json")
        with open(path) as f:
            doc = json.load(f)
        doc["child"] = bystander.pid
        with open(path, "w") as f:
            json.dump(doc, f)
        results = session.harvest_resume(store, sid)
        alive = bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    return {"alive": alive, "committed": [r.commit is not None for r in results]}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_resume_never_kills_a_process_that_reused_the_childs_pid(mode: str) -> None:
    """`harvest --resume` of an overlay session whose manager died sent SIGKILL to whatever
    process had the session's recorded child pid, checking only that the number was in use:
    after pid reuse (or from another pid namespace than the session's) root's resume killed an
    unrelated process. Now only the process that started at the recorded time is killed."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _resume_after_pid_reuse, base)
    assert r == {"alive": True, "committed": [True]}


@pytest.mark.needs("root", "overlay_root")
def test_a_file_of_another_session_does_not_hold_a_resume(shm_tmp: str) -> None:
    """`harvest --resume` (and the end of a session whose overlay could not be sealed) refuses
    while a process outside the session can still write its overlay. A file on an overlay whose
    mount the holding process's mount namespace does not show was taken for this session's:
    here a reader with a file of *another* running session open through /proc/PID/root made
    the resume fail with "processes outside the session". The same misreading raced every
    session start (a namespace's mounts read before its new overlay was mounted and pinned),
    which is how a resume failed once in CI while other sessions ran. A mount id is unique
    across namespaces: it is now looked up in every namespace before it counts."""
    store, _src = new_store(shm_tmp)
    root = os.fspath(store.root)
    other, ready = os.path.join(shm_tmp, "other"), os.path.join(shm_tmp, "ready")
    script = f"touch {ready}; exec sleep 60"
    bystander = subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "--store", root, "run", "t", "--at", other]
        + ["--", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reader = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            assert time.monotonic() < deadline and bystander.poll() is None, "no session"
            time.sleep(0.02)
        [sid_other] = [i.id for i in session.list_sessions(store)]
        inside = _session_env_procs(sid_other)  # its command (sleep), in its namespaces
        assert inside, "no process of the running session found"
        reader = subprocess.Popen(
            [
                "sh",
                "-c",
                f"exec 3< /proc/{inside[0]}/root{other}/f1 && echo ready && exec sleep 60",
            ],
            stdout=subprocess.PIPE,
        )
        assert reader.stdout is not None and reader.stdout.readline() == b"ready\n"
        at = os.path.join(shm_tmp, "at")
        p = velo(
            root,
            "run",
            "t",
            "--at",
            at,
            "--",
            "sh",
            "-c",
            f"echo new > {at}/added",
            env={"VELO_INTERNAL__TEST_FAULT": "commit.before:1"},
        )
        assert p.returncode == -signal.SIGKILL, p.stderr
        [sid] = [i.id for i in session.list_sessions(store) if i.id != sid_other]
        ok(velo(root, "harvest", "--resume", sid))
        assert reader.poll() is None and bystander.poll() is None  # both still there
    finally:
        for proc in (reader, bystander):
            if proc is not None:
                proc.kill()
                proc.wait()
    got = os.path.join(shm_tmp, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "added")) as f:
        assert f.read() == "new\n"


def _damaged_state(base: str) -> dict[str, object]:
    """A manager killed in its harvest (dead-unharvested), then its state file cut short."""
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    env = {"VELO_INTERNAL__TEST_FAULT": "harvest.file:1"}
    root = os.fspath(store.root)
    r = velo(root, "run", "t", "--at", proj, "--", "sh", "-c", f"printf x > {proj}/kept", env=env)
    (sid,) = os.listdir(store.sessions)
    path = os.path.join(store.sessions, sid, "state.json")
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    listed = velo(root, "sessions")
    harvested = velo(root, "--json", "harvest", "--all")
    checked = velo(root, "--json", "fsck")
    with open(os.path.join(store.sessions, sid, "upper", "kept"), "rb") as f:
        kept = f.read()
    return {
        "killed": r.returncode == -signal.SIGKILL,
        "sid": sid,
        "listed": (listed.returncode, listed.stderr.decode()),
        "harvest": (harvested.returncode, json.loads(harvested.stdout)),
        "fsck": (checked.returncode, json.loads(checked.stdout)["findings"]),
        "kept": kept,
    }


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_whose_state_file_is_damaged_is_said_not_passed_over(mode: str) -> None:
    """A dead session's state.json cut short: `sessions` did not list it, `harvest --all` said
    'harvested 0 sessions' and exited 0, `fsck` found no problem, though its upper dir still
    held its changes (only gc, refusing to run, named it). Now `sessions` warns about it,
    `harvest --all` fails naming it (with where its changes are), and fsck reports
    `session-unreadable`; its changes stay where they were."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _damaged_state, base)
    sid = r["sid"]
    assert r["killed"], r
    code, err = r["listed"]  # type: ignore[misc]
    assert code == 0 and f"session {sid}: unreadable state file" in err, r["listed"]
    code, out = r["harvest"]  # type: ignore[misc]
    assert code == 1 and [f["session_id"] for f in out["failed"]] == [sid], out
    assert str(sid) in out["hint"], out
    code, findings = r["fsck"]  # type: ignore[misc]
    assert code == 1 and [(f["kind"], f["what"]) for f in findings] == [
        ("session-unreadable", sid)
    ], findings
    assert r["kept"] == b"x"
