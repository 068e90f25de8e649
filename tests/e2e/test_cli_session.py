"""The session verbs through the real command line (`python -m veloverlay run …`), as root with
overlay: what a user sees at the start and end of a session, and what scripts read."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from typing import Any

import pytest

import veloverlay
from tests.conftest import must_work
from tests.e2e.test_cli import _bar_line
from tests.helpers.cli import VELO, LiveSession, data, live_session, ok, velo, velo_env
from tests.helpers.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.needs("root", "overlay_root")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(veloverlay.__file__)))


_PROJ_SPEC: dict[str, object] = {
    "README": b"hello\n",
    "src/main.c": b"int main(){}\n",
    "old.txt": b"x\n",
}


@pytest.fixture
def proj(store: str, shm_tmp: str) -> str:
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, _PROJ_SPEC)
    ok(velo(store, "ingest", src, "-n", "proj", "--adopt"))
    return src


def test_run_json_report_is_not_mixed_with_the_command_output(store: str, proj: str) -> None:
    """`run --json`: stdout is the report alone; the command's stdout goes to stderr (15.7)."""
    p = velo(
        store,
        "run",
        "--json",
        "proj",
        "--",
        "sh",
        "-c",
        f"echo from-the-command; echo x > {proj}/new",
    )
    report = json.loads(p.stdout)  # the whole of stdout parses
    assert p.returncode == 0, p.stderr
    assert report["exit_status"] == 0 and report["commit"] and report["changed"] >= 1
    assert b"from-the-command" in p.stderr
    # the exit status still passes through
    p = velo(store, "run", "proj", "--json", "--", "sh", "-c", "echo out; exit 3")
    assert p.returncode == 3 and json.loads(p.stdout)["exit_status"] == 3


def test_run_says_nothing_before_the_command_unless_verbose(store: str, proj: str) -> None:
    """`run` leaves stdout and stderr to the command until it ends (no banner); --verbose puts
    one line on stderr, before the command's first output, naming where and which session."""
    p = velo(store, "run", "proj", "--", "sh", "-c", "echo out; echo err >&2")
    assert p.returncode == 0 and p.stdout == b"out\n", p
    assert p.stderr.decode().splitlines()[0] == "err", p.stderr  # nothing before the command's
    assert b"projected at" not in p.stderr
    p = velo(store, "run", "-v", "proj", "--", "sh", "-c", "echo out; echo err >&2")
    assert p.returncode == 0 and p.stdout == b"out\n", p
    first, second = p.stderr.decode().splitlines()[:2]
    [sess] = [s for s in data(velo(store, "sessions", "--json")) if s["id"] in first]
    assert first.startswith(f"veloverlay: proj projected at {os.path.realpath(proj)} (overlay, ")
    assert first.endswith(f"), session {sess['id']}") and second == "err", first
    p = velo(store, "run", "-v", "--json", "proj", "--", "true")  # --json: the report alone
    assert p.returncode == 0 and b"projected" not in p.stderr and json.loads(p.stdout)


def test_status_lists_only_running_or_unharvested_sessions(store: str, proj: str) -> None:
    ok(velo(store, "run", "proj", "--", "true"))
    assert [s["state"] for s in data(velo(store, "sessions", "--json"))] == ["harvested"]
    assert data(velo(store, "status", "--json"))["sessions"] == []
    shown = ok(velo(store, "status")).splitlines()  # ("sessions" may name a part of disk use)
    assert not [line for line in shown if line.startswith("session ")], shown


def test_doctor_names_the_backend_a_session_gets(shm_tmp: str) -> None:
    """One rule (session/select.py): on a filesystem without user xattrs a session takes the
    shim, and doctor says so (it used to say overlay there)."""
    mnt = os.path.join(shm_tmp, "ramfs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "ramfs", "none", mnt], check=True)
    try:
        store = os.path.join(mnt, "store")
        src = os.path.join(shm_tmp, "src")
        make_tree(src, {"a.txt": b"a\n"})
        ok(velo(store, "ingest", src, "-n", "r"))
        report = data(velo(store, "doctor", "--json"))
        assert report["store_xattrs"]["ok"] is False
        at = os.path.join(shm_tmp, "at")
        p = velo(store, "run", "r", "--at", at, "--json", "--", "true")
        assert p.returncode == 0, p.stderr
        assert report["chosen"]["backend"] == json.loads(p.stdout)["backend"] == "shim"
        assert report["features"]["store_xattrs"]["matters"] == "for overlay"
        # and where the store holds xattrs, both say overlay
        good = os.path.join(shm_tmp, "store2")
        ok(velo(good, "ingest", src, "-n", "r"))
        p = velo(good, "run", "r", "--at", os.path.join(shm_tmp, "at2"), "--json", "--", "true")
        chosen = data(velo(good, "doctor", "--json"))["chosen"]["backend"]
        assert chosen == json.loads(p.stdout)["backend"] == "overlay"
    finally:
        subprocess.run(["umount", "-l", mnt], check=True)


def test_doctor_explains_each_feature(store: str) -> None:
    out = ok(velo(store, "doctor"))
    report = data(velo(store, "doctor", "--json"))
    for name, f in report["features"].items():
        assert f["purpose"] and f["matters"], name
        assert name in out


# -- a session you can see into (issue 15.5) ------------------------------------------------------


def _checkout(store: str, spec: str, dest: str) -> str:
    ok(velo(store, "checkout", spec, dest))
    return dest


def _end_lines(stderr: bytes) -> dict[str, str]:
    """The paths an end line lists: path -> status letter."""
    out = {}
    for line in stderr.decode().splitlines():
        parts = line.split(" ", 3)
        if line.startswith("  ") and len(parts) == 4 and len(parts[2]) == 1:
            out[parts[3]] = parts[2]
    return out


def test_the_end_line_lists_the_changes_and_the_undo_works(
    store: str, proj: str, shm_tmp: str
) -> None:
    from tests.e2e.test_cli import _expected_changes

    before = _checkout(store, "proj", os.path.join(shm_tmp, "before"))
    script = "echo more >> README && rm old.txt && mkdir -p new/dir && echo n > new/dir/f"
    p = velo(store, "run", "proj", "--", "sh", "-c", f"cd {proj} && {script}")
    assert p.returncode == 0, p.stderr
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    assert _end_lines(p.stderr) == _expected_changes(before, after)
    assert b"\nundo: veloverlay rollback proj\n" in p.stderr
    ok(velo(store, "rollback", "proj"))
    again = _checkout(store, "proj", os.path.join(shm_tmp, "again"))
    assert _expected_changes(before, again) == {}
    # the JSON report carries the same list
    p = velo(store, "run", "proj", "--json", "--", "sh", "-c", f"cd {proj} && {script}")
    listed = {c["path"]: c["status"] for c in json.loads(p.stdout)["changes"]}
    assert listed == _expected_changes(before, after)


def test_the_end_line_counts_the_changes_in_the_numbers_grammar(store: str, proj: str) -> None:
    """The end line says how many changes the session committed: one path changed, then two
    (as `diff REF@{1} REF` of each commit lists them), each in its number's grammar."""
    for script, n in (("echo 1 >> README", 1), ("echo 2 >> README && rm old.txt", 2)):
        p = velo(store, "run", "proj", "--", "sh", "-c", f"cd {proj} && {script}")
        assert p.returncode == 0, p.stderr
        assert len(data(velo(store, "diff", "proj@{1}", "proj", "--json"))) == n
        said = "1 change" if n == 1 else f"{n} changes"
        assert f"proj: committed {said} (commit " in p.stderr.decode(), p.stderr


def _processes_with(argv: list[str]) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == [a.encode() for a in argv]:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _live_run(
    store: str, base: str, backend: str, command: str, *extra: str, **kw: Any
) -> AbstractContextManager[LiveSession]:
    """`run proj --backend BACKEND EXTRA` of `command`, live (tests.helpers.cli.live_session)."""
    return live_session(
        store, "run", "proj", "--backend", backend, *extra, command=command, base=base, **kw
    )


def _the_same_in_a_plain_directory(shm_tmp: str, commands: str) -> str:
    """The source tree in a plain directory after `commands` ran in it: what a commit must be."""
    plain = os.path.join(shm_tmp, "plain")
    make_tree(plain, _PROJ_SPEC)
    subprocess.run(["sh", "-c", f"cd {plain} && {commands}"], check=True)
    return plain


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_sigterm_or_sighup_to_run_reaches_the_commands_trap_and_harvests(
    store: str, proj: str, shm_tmp: str, backend: str, sig: signal.Signals
) -> None:
    """`kill`, `docker stop` or a closed terminal of `run`: the command used to be SIGKILLed at
    once (exit 137), so its TERM/HUP trap never ran (a database flushing, a build removing its
    temporary files). The signal now reaches the command, what it wrote before and in its trap is
    committed, what it left is ended, and `run` exits with the command's status: 128+N for a
    command that the signal ended, as in a shell."""
    leftover = ["sleep", f"1000.{os.getpid()}"]
    name = sig.name[3:]
    writes = "echo n > added && mkdir -p d && echo x > d/f"
    trap = f"echo trapped-{name} > trapped; rm -f old.txt; echo more >> added"
    command = (
        f"cd {proj} && {writes} && ({' '.join(leftover)} &) && "
        f"trap '{trap}; trap - {name}; kill -{name} $$' {name}"
    )
    with _live_run(store, shm_tmp, backend, command) as session:
        sid = session.sid()
        try:
            session.proc.send_signal(sig)
            session.proc.wait(timeout=120)  # (a command left running holds its stdout, stderr)
        finally:
            left = _processes_with(leftover)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
    err = session.err
    assert left == [], err
    assert session.returncode == 128 + sig, err
    states = {s["id"]: s["state"] for s in data(velo(store, "sessions", "--json"))}
    assert states[sid] == "harvested"
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    plain = _the_same_in_a_plain_directory(shm_tmp, f"{writes} && {trap}")
    assert_same_tree(after, plain, mtimes=False, dir_mtimes=False)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_other_signals_to_run_are_passed_on_or_ignored_never_ending_the_manager(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """SIGXCPU (default action: terminate) killed the manager at once and left the session
    dead and unharvested; SIGUSR1 and SIGUSR2 did too, and never reached the command. The
    manager now ignores what is its own (SIGXCPU, SIGPIPE) and passes the rest on."""
    got = os.path.join(shm_tmp, "got")
    command = (
        f"cd {proj} && trap 'echo usr1 >> log; touch {got}' USR1 && "
        "trap 'echo usr2 >> log; exit 7' USR2"
    )
    with _live_run(store, shm_tmp, backend, command) as session:
        sid = session.sid()
        for sig in (signal.SIGXCPU, signal.SIGPIPE, signal.SIGUSR1):
            session.proc.send_signal(sig)
        session.wait_for(got)
        session.proc.send_signal(signal.SIGUSR2)
        session.proc.wait(timeout=120)
    assert session.returncode == 7, session.err
    states = {s["id"]: s["state"] for s in data(velo(store, "sessions", "--json"))}
    assert states[sid] == "harvested"
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    plain = _the_same_in_a_plain_directory(shm_tmp, "echo usr1 >> log; echo usr2 >> log")
    assert_same_tree(after, plain, mtimes=False, dir_mtimes=False)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_second_sigterm_ends_the_grace_period_at_once(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """A command that handles SIGTERM without exiting gets `--grace` seconds after the first
    one; a second SIGTERM (an impatient user, a supervisor escalating) ends it at once. Its
    trap's write from the first one is committed."""
    trapped = os.path.join(shm_tmp, "trapped")
    command = f"cd {proj} && trap 'echo term >> log; touch {trapped}' TERM"
    with _live_run(store, shm_tmp, backend, command, "--grace", "600") as session:
        session.sid()
        session.proc.send_signal(signal.SIGTERM)
        session.wait_for(trapped)
        t0 = time.monotonic()
        session.proc.send_signal(signal.SIGTERM)
        session.proc.wait(timeout=120)
        took = time.monotonic() - t0
    err = session.err
    assert session.returncode == 128 + signal.SIGKILL, err
    assert took < 60, err  # not the 600 s of --grace
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    plain = _the_same_in_a_plain_directory(shm_tmp, "echo term >> log")
    assert_same_tree(after, plain, mtimes=False, dir_mtimes=False)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_sigterm_to_the_whole_process_group_is_one_sigterm_not_two(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """`kill -TERM -PGID`, a closed terminal (SIGHUP to the foreground group) and systemd's stop
    (every process of the cgroup) reach the command, its reaper and the manager at once: the
    reaper got the signal twice (itself and relayed by the manager) and took the second for an
    impatient user's, SIGKILLing the command in its trap. It is one signal: the command's trap
    runs to its end, and the command exits with the status it chose."""
    writes = "echo n > added"
    trap = "echo trapped > trapped; rm -f old.txt"
    command = f"cd {proj} && {writes} && trap '{trap}; exit 3' TERM"
    with _live_run(
        store, shm_tmp, backend, command, "--grace", "600",
        start_new_session=True,  # its own process group, which the command shares
    ) as session:  # fmt: skip
        session.sid()
        os.killpg(session.proc.pid, signal.SIGTERM)
        session.proc.wait(timeout=120)
    assert session.returncode == 3, session.err
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    plain = _the_same_in_a_plain_directory(shm_tmp, f"{writes} && {trap}")
    assert_same_tree(after, plain, mtimes=False, dir_mtimes=False)


@pytest.mark.parametrize("sig", ["TERM", "HUP", "USR1"])
def test_a_signal_that_comes_while_the_session_is_harvested_lets_the_harvest_finish(
    store: str, proj: str, shm_tmp: str, sig: str
) -> None:
    """SIGTERM or SIGHUP to `run` once its command had ended stopped the harvest halfway (exit
    143, the session left dead and unharvested until a `harvest --resume`); SIGUSR1 killed the
    manager outright. Whoever sent it is answered as for the command: it has ended; the
    harvest finishes and commits, and `run` exits with the command's status."""
    writes = "echo a > a1 && echo b > b1 && mkdir nd && echo c > nd/c && rm old.txt"
    p = subprocess.run(
        [sys.executable, "-m", "veloverlay", "run", "proj", "--backend", "overlay", "--"]
        + ["sh", "-c", f"cd {proj} && {writes}"],
        env={
            **os.environ,
            "VELO_STORE": store,
            "NO_COLOR": "1",
            # the signal, sent to the manager as it stages the session's first file
            "VELO_INTERNAL__TEST_FAULT": f"harvest.file:1:{sig}",
        },
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert [s["state"] for s in data(velo(store, "sessions", "--json"))] == ["harvested"]
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    plain = _the_same_in_a_plain_directory(shm_tmp, writes)
    assert_same_tree(after, plain, mtimes=False, dir_mtimes=False)


def test_a_conflict_exits_1_and_names_the_paths(store: str, proj: str, shm_tmp: str) -> None:
    command = f"cd {proj} && echo first > README && touch mine"
    with live_session(store, "run", "proj", command=command, base=shm_tmp) as first:
        first.sid()
        ok(velo(store, "run", "proj", "--", "sh", "-c", f"cd {proj} && echo second > README"))
    assert first.returncode == 1, first.err
    text = first.err.decode()
    assert (
        "both changed: README" in text and "mine" not in text.split("conflict")[1].split("see:")[0]
    )
    kept = [r["name"] for r in data(velo(store, "refs", "--json")) if r["name"].startswith("proj@")]
    assert len(kept) == 1 and kept[0] in text
    # the hint's way to take the session's tree whole works, and gives exactly that tree
    take = re.search(r"veloverlay (rollback proj \S+)", text)
    assert take is not None, text
    ok(velo(store, *take.group(1).split()))
    got = _checkout(store, "proj", os.path.join(shm_tmp, "taken"))
    with open(os.path.join(got, "README"), "rb") as f:
        assert f.read() == b"first\n"
    assert os.path.exists(os.path.join(got, "mine"))


def test_status_and_diff_see_into_a_running_session(store: str, proj: str, shm_tmp: str) -> None:
    from tests.e2e.test_cli import _expected_changes

    before = _checkout(store, "proj", os.path.join(shm_tmp, "before"))
    command = (
        f"cd {proj} && echo more >> README && rm old.txt && echo n > added && "
        "printf n > \"$(printf 'not-utf8-\\377')\""  # a name given back exactly (JSON)
    )
    with live_session(store, "run", "proj", command=command, base=shm_tmp) as session:
        sid = session.sid()
        live = {
            c["path"]: c["status"] for c in data(velo(store, "diff", "--session", sid, "--json"))
        }
        status = data(velo(store, "status", "--json"))["sessions"]
        text = ok(velo(store, "status"))
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    assert live == _expected_changes(before, after)
    assert [s["id"] for s in status] == [sid]
    assert {c["path"]: c["status"] for c in status[0]["changes"]} == live
    assert f"veloverlay diff --session {sid}" in text and "  D old.txt" in text
    # a finished session is not running any more: a usage error that says so
    p = velo(store, "diff", "--session", sid)
    assert p.returncode == 2 and b"harvested" in p.stderr


def _hunks(patch: str) -> dict[str, str]:
    """path -> its hunks, from `diff -p` output (everything after the `+++` line)."""
    out: dict[str, str] = {}
    for block in patch.split("diff --velo a/")[1:]:
        name = block.split(" b/", 1)[0]
        out[name] = block.split("\n+++ ", 1)[1].split("\n", 1)[1] if "\n+++ " in block else ""
    return out


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_diff_of_a_running_session_stat_and_patch(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """`diff --session ID -p / --stat` while the command still runs, against `diff -u` of the
    tree before and the tree the session commits."""
    before = _checkout(store, "proj", os.path.join(shm_tmp, "before"))
    command = (
        f"cd {proj} && printf 'hello\\nmore\\n' > README && rm old.txt && echo n > added && "
        "chmod 700 src/main.c && printf 'a\\0b' > blob"
    )
    with _live_run(store, shm_tmp, backend, command) as session:
        sid = session.sid()
        patch = ok(velo(store, "diff", "--session", sid, "-p"))
        stat = ok(velo(store, "diff", "--session", sid, "--stat")).splitlines()
        as_json = data(velo(store, "diff", "--session", sid, "-p", "--json"))
        stat_json = data(velo(store, "diff", "--session", sid, "--stat", "--json"))
    assert session.returncode == 0, session.err
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    counted = {d["path"]: (d["added"], d["removed"]) for d in stat_json}
    assert counted["blob"] == (None, None) and counted["src/main.c"] == (0, 0)
    got = _hunks(patch)
    assert set(got) == {"README", "old.txt", "added", "src/main.c", "blob"}, patch
    for name in ("README", "old.txt", "added"):  # -N: an absent side reads as empty
        real = subprocess.run(
            ["diff", "-uN", os.path.join(before, name), os.path.join(after, name)],
            capture_output=True,
            text=True,
        ).stdout
        assert got[name] == real.split("\n", 2)[2], (name, patch)
        body = real.splitlines()[2:]
        assert counted[name] == (
            sum(1 for x in body if x.startswith("+")),
            sum(1 for x in body if x.startswith("-")),
        ), (name, stat_json)
    assert "diff --velo a/src/main.c b/src/main.c\nold mode 644\nnew mode 700\n" in patch
    assert "Binary files /dev/null and b/blob differ" in patch
    assert {d["path"]: d["patch"] is None for d in as_json}["blob"]
    rows = {x.split("|")[0].strip(): x.split("|")[1].split() for x in stat[:-1]}
    assert rows["README"][0] == "1" and rows["old.txt"][0] == "1" and rows["added"][0] == "1"
    assert rows["blob"] == ["Bin", "0", "->", "3", "bytes"]
    assert stat[-1] == " 5 files changed, 2 insertions(+), 1 deletion(-)", stat


def _enter_in_a_terminal(store: str, shell: str, home: str, cwd: str, proj: str) -> str:
    """`veloverlay enter proj` on a pseudo-terminal: wait for the prompt, create a file, exit."""
    env = {**os.environ, "VELO_STORE": store, "SHELL": shell, "HOME": home, "TERM": "dumb"}
    env.pop("NO_COLOR", None)
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "veloverlay", "enter", "proj"], env)
        finally:
            os._exit(127)
    out, sent, left = b"", False, False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not sent and b"(velo:proj) " in out:
                os.write(fd, f"cd {proj} && echo hi > from-the-shell\n".encode())
                sent = True
            elif sent and not left and out.count(b"(velo:proj) ") >= 2:  # the next prompt too
                os.write(fd, b"exit\n")
                left = True
    if not left:  # no prompt came: end the session rather than wait for a shell forever
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    return out.decode(errors="replace")


def _shell(name: str) -> str:
    """The shell's path; a test for a shell this host lacks is skipped, saying which."""
    import shutil

    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed here (apt-get install {name})"
        if "tools" in must_work() or "all" in must_work():  # CI: the README's set-up installs it
            pytest.fail(f"VELO_TEST_MUST_WORK names 'tools' but {why}")
        pytest.skip(why)
    return path


@pytest.mark.parametrize(
    ("shell", "prompt"),
    [("bash", "custom> "), ("sh", "$ "), ("zsh", "custom> "), ("fish", "custom> ")],
)
def test_enter_says_where_and_how_to_leave_and_keeps_its_prompt_marker(
    store: str, proj: str, shm_tmp: str, shell: str, prompt: str
) -> None:
    shell = _shell(shell)
    home = os.path.join(shm_tmp, "home")
    os.makedirs(os.path.join(home, ".config", "fish"), exist_ok=True)
    # the user's start-up files set their own prompts, each shell's way
    with open(os.path.join(home, ".bashrc"), "w") as f:
        f.write("PS1='custom> '\n")
    with open(os.path.join(home, ".zshrc"), "w") as f:  # a theme that rebuilds it: a precmd
        f.write(
            "PROMPT='custom> '\nmy_theme() { PROMPT='custom> ' }\nprecmd_functions+=(my_theme)\n"
        )
    with open(os.path.join(home, ".config", "fish", "config.fish"), "w") as f:
        f.write("function fish_prompt\n    echo -n 'custom> '\nend\n")
    out = _enter_in_a_terminal(store, shell, home, shm_tmp, proj)
    lines = out.replace("\r", "").splitlines()
    assert lines[0] == f"veloverlay: proj projected at {proj} (overlay, {lines[0].split(', ')[-1]}"
    assert "leave with 'exit' or Ctrl-D" in lines[1]
    # the marker survived the user's start-up files, on the prompt after a command too; no \w
    assert out.count(f"(velo:proj) {prompt}") >= 2, out
    assert "\\w" not in out
    assert "  A from-the-shell" in lines


def test_a_layer_build_shows_progress_and_a_warm_start_none(store: str, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "many")
    make_tree(src, {f"d{i // 100}/f{i}": b"x" * (i % 7) for i in range(600)})
    ok(velo(store, "ingest", src, "-n", "many", "--adopt"))
    env = {
        "VELO_INTERNAL__TEST_PROGRESS": "1",
        "VELO_RUNTIME_DIR": os.path.join(shm_tmp, "fresh-cache"),  # a cold build
    }
    os.mkdir(env["VELO_RUNTIME_DIR"])
    try:
        cold = velo(store, "run", "many", "--", "true", env=env)
        assert cold.returncode == 0, cold.stderr
        line = _bar_line(cold.stderr.decode(), "preparing the tree")
        assert "/600 entries" in line and "entries/s" in line and "ETA" in line, line
        warm = velo(store, "run", "many", "--", "true", env=env)
        assert warm.returncode == 0 and b"preparing the tree" not in warm.stderr
    finally:
        subprocess.run(["chattr", "-R", "-i", env["VELO_RUNTIME_DIR"]], check=False)


def test_the_shims_materialisation_shows_bytes_rate_and_eta(store: str, shm_tmp: str) -> None:
    """The shim writes the whole tree before the command starts: its bar counts entries and
    bytes against totals known up front; with --json nothing but the report is written."""
    src = os.path.join(shm_tmp, "many")
    make_tree(src, {f"d{i // 100}/f{i}": os.urandom(10_000) for i in range(300)})
    ok(velo(store, "ingest", src, "-n", "many"))
    at = os.path.join(shm_tmp, "at")
    env = {"VELO_INTERNAL__TEST_PROGRESS": "1"}
    p = velo(store, "run", "many", "--backend", "shim", "--at", at, "--", "true", env=env)
    assert p.returncode == 0, p.stderr
    line = _bar_line(p.stderr.decode(), "preparing the tree")
    size = f"{300 * 10_000 / 2**20:.1f} MiB"
    assert f"{size} / {size}" in line and "MiB/s" in line and "303/303 entries" in line, line
    assert "ETA" in line, line
    p = velo(store, "run", "--json", "many", "--backend", "shim", "--at", at, "--", "true", env=env)
    assert p.returncode == 0 and b"preparing" not in p.stderr, p.stderr
    assert json.loads(p.stdout)["exit_status"] == 0


def test_the_end_of_session_report_escapes_the_names_of_new_files(store: str, proj: str) -> None:
    """A file the command made with an escape sequence and a newline in its name is reported
    as one line with both shown as \\xNN: it neither retitles the terminal nor forges a line."""
    name = "t\x1b]0;owned\x07\nA forged"
    p = velo(store, "run", "proj", "--", "sh", "-c", 'printf x > "$1/$2"', "sh", proj, name)
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "\x1b" not in err and "\x07" not in err
    assert "  A t\\x1b]0;owned\\x07\\x0aA forged\n" in err
    assert name in {e["path"] for e in data(velo(store, "ls", "proj", "--json"))}


def test_the_session_reports_names_that_are_not_utf8_exactly(store: str, proj: str) -> None:
    """A name that is not UTF-8 (or holds a backslash) is one name: `run --json` gives its bytes
    back as surrogate escapes, as every `--json` does, and the end line shows each byte once as
    \\xNN. Both were escaped twice (JSON: the four characters `\\xff`; the end line:
    `bad\\\\xffname`, a name holding a backslash), found by projecting real trees with such
    names."""
    names = [os.fsdecode(b"bad\xffname"), "back\\slash"]
    write = 'printf %s "$1" > "$3/$2"; printf %s "$1" > "$3/$4"'
    args = ["sh", "-c", write, "sh", "x", names[0], proj, names[1]]
    p = velo(store, "run", "--json", "proj", "--", *args)
    assert p.returncode == 0, p.stderr
    assert {c["path"] for c in json.loads(p.stdout)["changes"]} == set(names)
    args[4] = "y"
    p = velo(store, "run", "proj", "--", *args)
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "  M bad\\xffname\n" in err and "  M back\\\\slash\n" in err, err


def test_run_with_stdout_closed_gives_the_command_dev_null(store: str, proj: str) -> None:
    """`veloverlay run REF -- CMD >&-` died with a traceback before the command ran (the
    backend flushes sys.stdout, None for a closed fd 1); now CMD's stdout is /dev/null."""
    env = {**os.environ, "NO_COLOR": "1", "VELO_STORE": store}
    cmd = 'x=$(readlink /proc/$$/fd/1); echo "fd1=$x" >&2; echo new > "$1/new"'
    p = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "veloverlay"]
        + ["run", "proj", "--", "sh", "-c", cmd, "sh", proj],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert b"fd1=/dev/null\n" in p.stderr and b"Traceback" not in p.stderr
    assert "new" in {e["path"] for e in data(velo(store, "ls", "proj", "--json"))}


def test_enter_keeps_a_prompt_command_that_ends_in_a_semicolon(
    store: str, proj: str, shm_tmp: str
) -> None:
    """pyenv-virtualenv's init leaves PROMPT_COMMAND='_pyenv_virtualenv_hook;': appending
    ';__velo_prompt' made ';;', a syntax error at every prompt, and the user's hook never ran."""
    shell = _shell("bash")
    home = os.path.join(shm_tmp, "home")
    os.makedirs(home)
    with open(os.path.join(home, ".bashrc"), "w") as f:
        f.write(
            "my_hook() { PS1='custom> '; touch \"$HOME/hook-ran\"; }\nPROMPT_COMMAND='my_hook;'\n"
        )
    out = _enter_in_a_terminal(store, shell, home, shm_tmp, proj)
    assert "syntax error" not in out, out
    assert out.count("(velo:proj) custom> ") >= 2, out
    assert os.path.exists(os.path.join(home, "hook-ran"))


def test_a_leftover_process_is_reported_once(store: str, proj: str) -> None:
    """An overlay session said each leftover process twice (a warning and the killed line);
    the shim once. Once now, in either backend, naming the process."""
    tag = f"1000.{os.getpid()}"
    # the command ends once its child has exec'd sleep (before, the child could still be `sh`:
    # its comm changes at the exec; its cmdline held the tag before it, in the script's text)
    script = f'sleep {tag} & p=$!; until [ "$(cat /proc/$p/comm)" = sleep ]; do :; done; exit 0'
    p = velo(store, "run", "proj", "--grace", "0.2", "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    lines = [line for line in err.splitlines() if "sleep" in line]
    assert len(lines) == 1 and "killed leftover process" in lines[0], err


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_session_started_in_another_pid_namespace_is_not_taken_for_dead(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """A session whose manager runs in another pid namespace (started inside another session,
    a container, `unshare -p`) records a pid that names another process or none here:
    `sessions` showed it dead-unharvested while it ran, and `harvest --all` took it over (shim:
    committed half its work and removed its tree under the running command, whose next write
    failed; overlay: exit 1, 'its manager ended'). Now the manager holds a lock that any
    namespace sees: it is running, and only its own end commits it, whole."""
    with _live_run(
        store, shm_tmp, backend, f"cd {proj} && echo n > added", then="echo m > later",
        wrap=["unshare", "--pid", "--fork", "--mount-proc"],
    ) as session:  # fmt: skip
        shown = [s["state"] for s in data(velo(store, "sessions", "--json"))]
        resumed = velo(store, "harvest", "--all")
    assert shown == ["running"], shown
    assert resumed.returncode == 0, resumed.stderr
    assert session.returncode == 0, session.err
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    for name, want in (("added", b"n\n"), ("later", b"m\n")):
        with open(os.path.join(after, name), "rb") as f:
            assert f.read() == want, name


def test_a_pid_shared_with_another_namespace_is_not_called_a_damaged_database(
    store: str, proj: str, shm_tmp: str
) -> None:
    """LMDB marks a live reader by a lock on byte <pid> of lock.mdb: a veloverlay process whose
    pid number a process of the same store has in another pid namespace (two sessions' commands,
    two containers: small pids) cannot begin a transaction (EAGAIN). That said 'LMDB: ...
    Resource temporarily unavailable', reason manifest-corrupt, hint 'restore manifests.lmdb
    from a backup' - of a sound database. Now reason locked, saying what happened."""
    pid1 = ["unshare", "--pid", "--fork", "--mount-proc"]
    # the manager of the first: pid 1, all along
    with live_session(store, "run", "proj", base=shm_tmp, wrap=pid1) as first:
        second = subprocess.run(
            [*pid1, *VELO, "--json", "ls", "proj"], env=velo_env(store), capture_output=True
        )
    assert first.returncode == 0, first.err
    doc = json.loads(second.stdout)
    assert second.returncode == 1 and doc["reason"] == "locked", doc
    assert "backup" not in str(doc["hint"]) and "pid namespace" in doc["error"], doc
    assert b"Traceback" not in second.stderr


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_run_from_a_deleted_directory_starts_in_the_tree_with_either_backend(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """`run` from a directory deleted meanwhile (a shell left in a removed build dir): the
    overlay backend runs the command at the projection's root, as it does for any working
    directory it cannot enter; the shim backend failed to start, 'error: fork: No such file or
    directory (ENOENT)' - blaming fork for a getcwd that failed. Both now run it at the root."""
    gone = os.path.join(shm_tmp, "gone")
    out = os.path.join(shm_tmp, "pwd")
    script = f"pwd > {out}; echo r > rel"
    p = subprocess.run(
        ["sh", "-c", f'mkdir {gone} && cd {gone} && rmdir {gone} && exec "$@"', "sh"]
        + [sys.executable, "-m", "veloverlay", "run", "proj", "--backend", backend]
        + ["--", "sh", "-c", script],
        # (no working directory to find the package in: name the one under test)
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1", "PYTHONPATH": _PACKAGE_PARENT},
        capture_output=True,
    )
    assert p.returncode == 0, p.stderr
    with open(out) as f:
        assert f.read().strip() == proj
    after = _checkout(store, "proj", os.path.join(shm_tmp, "after"))
    with open(os.path.join(after, "rel"), "rb") as f:
        assert f.read() == b"r\n"


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_directory_as_the_command_is_said_to_be_one(
    store: str, proj: str, shm_tmp: str, backend: str
) -> None:
    """`run REF -- DIR` exited 126 saying 'DIR: permission denied', sending the user to look
    at modes; a shell says 'Is a directory' (126). A file without x is still 'permission
    denied'."""
    plain = os.path.join(shm_tmp, "plain")
    with open(plain, "w") as f:
        f.write("echo hi\n")
    for cmd, says in ((shm_tmp, "is a directory"), (plain, "permission denied")):
        p = velo(store, "run", "proj", "--backend", backend, "--", cmd)
        assert p.returncode == 126, p.stderr
        assert f"veloverlay: {cmd}: {says}".encode() in p.stderr, p.stderr


def test_diff_patch_says_what_a_mask_does(store: str, shm_tmp: str) -> None:
    """`diff -p` of a stacked session's deletion of a lower ref's path (a MASK in the top ref)
    printed the `diff --velo` header alone: no line said that anything was deleted (a mask has
    no content of its own, and no mode to show as `deleted file mode`). It now says the path
    is masked; a mask removed again says the lower ref's path shows again."""
    lo, hi, at = (os.path.join(shm_tmp, n) for n in ("lo", "hi", "at"))
    make_tree(lo, {"x": b"lower\n"})
    make_tree(hi, {"y": b"top\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    ok(velo(store, "run", "lo", "hi", "--at", at, "--", "rm", os.path.join(at, "x")))
    patch = ok(velo(store, "diff", "hi@{1}", "hi", "-p"))
    assert patch.splitlines()[:2] == [
        "diff --velo a/x b/x",
        "masked: deletes what the refs below provide at this path",
    ], patch
    back = ok(velo(store, "diff", "hi", "hi@{1}", "-p"))
    assert back.splitlines()[:2] == [
        "diff --velo a/x b/x",
        "unmasked: what the refs below provide at this path shows again",
    ], back


def test_diff_of_a_top_ref_file_replaced_by_a_mask_says_it_hides_the_lower_one(
    store: str, shm_tmp: str
) -> None:
    """Both refs of a stack have `x`; the session deletes it, so the top ref's file becomes a
    MASK that hides the lower ref's `x` too. `diff` showed a plain deletion of the top ref's
    file (`--json`: no new side; `-p`: no word of the mask), as if `lo`'s `x` would show again."""
    lo, hi, at = (os.path.join(shm_tmp, n) for n in ("lo", "hi", "at"))
    make_tree(lo, {"x": b"lower\n"})
    make_tree(hi, {"x": b"top\n", "y": b"y\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    ok(velo(store, "run", "lo", "hi", "--at", at, "--", "rm", os.path.join(at, "x")))
    # the stack shows no x at all now: neither the top ref's nor the lower ref's
    gone = velo(store, "run", "lo", "hi", "--at", at, "--discard", "--", "test", "-e", f"{at}/x")
    assert gone.returncode == 1, gone.stderr
    [change] = data(velo(store, "diff", "hi@{1}", "hi", "--json"))
    assert (change["status"], change["old"]["kind"], change["new"]["kind"]) == ("D", "file", "mask")
    patch = ok(velo(store, "diff", "hi@{1}", "hi", "-p")).splitlines()
    assert patch[:5] == [
        "diff --velo a/x b/x",
        f"deleted file mode {stat.S_IMODE(os.lstat(os.path.join(hi, 'x')).st_mode):o}",
        "masked: deletes what the refs below provide at this path",
        "--- a/x",
        "+++ /dev/null",
    ], patch


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_the_live_diff_of_a_stack_says_what_its_harvest_will(
    store: str, shm_tmp: str, backend: str
) -> None:
    """`diff --session` of a stacked session showed a deletion of the lower ref's path as the
    lower ref's content deleted, without the `masked:` line, while `diff REF@{1} REF` of what
    its harvest committed (a MASK in the top ref) says `masked:` and deletes no content of the
    top ref. Both now say the same: -p, --stat and --name-status, and `masked` in --json."""
    lo, hi, at = (os.path.join(shm_tmp, n) for n in ("lo", "hi", "at"))
    make_tree(lo, {"x": b"lower\n", "both": b"low\n", "d/k": b"keep\n"})
    make_tree(hi, {"both": b"top\n", "y": b"y\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    with live_session(
        store, "run", "lo", "hi", "--at", at, "--backend", backend,
        command=f"cd {at} && rm -r x both d && echo n > n", base=shm_tmp,
    ) as session:  # fmt: skip
        sid = session.sid()
        live = {how: ok(velo(store, "diff", "--session", sid, *how)) for how in _DIFF_FORMS}
        as_json = data(velo(store, "diff", "--session", sid, "-p", "--json"))
    assert session.returncode == 0, session.err
    harvested = {how: ok(velo(store, "diff", "hi@{1}", "hi", *how)) for how in _DIFF_FORMS}
    assert live == harvested
    masked = "masked: deletes what the refs below provide at this path"
    patch = live[("-p",)]
    for name in ("x", "d"):  # only the lower ref has them: nothing of the top ref is deleted
        assert f"diff --velo a/{name} b/{name}\n{masked}\n" in patch, patch
    assert f"{masked}\n--- a/both\n+++ /dev/null\n@@ -1 +0,0 @@\n-top\n" in patch, patch
    assert "-lower" not in patch and "-low\n" not in patch, patch
    assert {c["path"]: c["masked"] for c in as_json} == {
        "both": True,
        "d": True,
        "n": False,
        "x": True,
    }


_DIFF_FORMS = [("-p",), ("--stat",), ("--name-status",), ()]


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_an_empty_at_is_a_usage_error_not_the_refs_path(
    store: str, proj: str, backend: str
) -> None:
    """`--at ''` was taken for no --at: the session projected at the ref's recorded path (or
    said the ref had none). It names no directory: a usage error, and nothing ran."""
    marker = os.path.join(proj, "ran")
    p = velo(store, "run", "proj", "--backend", backend, "--at", "", "--", "touch", marker)
    assert p.returncode == 2, p.stderr
    assert "empty path" in p.stderr.decode()  # exit 2: a usage error
    assert not os.path.exists(marker)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_a_session_commit_says_what_a_shared_store_opens_to_every_user(
    shm_tmp: str, shared: bool
) -> None:
    """As ingest (`exposed`): the files a session leaves that other users could not read there
    (0600; a 0644 file in a 0700 directory) become every local user's in a shared store, and
    the session's end says so; a 0644 file in an open directory, or a private store, says
    nothing."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"README": b"r\n"})
    ok(velo(store, "init", *(["--shared"] if shared else [])))
    ok(velo(store, "ingest", src, "-n", "p"))
    script = (
        "umask 022; echo k > key; chmod 600 key; mkdir -m 700 priv; echo i > priv/in; echo o > open"
    )
    at = os.path.join(shm_tmp, "at")
    report = data(
        velo(store, "--json", "run", "p", "--at", at, "--", "sh", "-c", f"cd {at} && {script}")
    )
    assert sorted(c["path"] for c in report["changes"]) == ["key", "open", "priv/in"]
    said = [w for w in report["warnings"] if "readable by every local user" in w]
    if shared:
        assert len(said) == 1 and said[0].startswith("2 files or directories other users"), said
    else:
        assert said == []


def test_diff_back_over_masks_says_the_masks_go(store: str, shm_tmp: str) -> None:
    """A stacked session deletes `x` (a file of both refs) and `d` (a directory of both): the
    top ref's file and directory become MASKs, which `diff hi@{1} hi` shows (x's D with the
    mask as its new side; d's files' D and the mask's own D). `diff hi hi@{1}`, the way back,
    showed the files coming and nothing of the masks going: x an A from nothing, d's files
    only. It now shows each as the mirror: x's A with the mask as its old side, d's files' A
    and the mask's own A (`-p`: "unmasked"). Expected from the trees made here."""
    lo, hi, at = (os.path.join(shm_tmp, n) for n in ("lo", "hi", "at"))
    make_tree(lo, {"x": b"lower\n", "d/k": b"low\n"})
    make_tree(hi, {"x": b"top\n", "d/f": b"top\n", "y": b"y\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    rm = ["rm", "-r", os.path.join(at, "x"), os.path.join(at, "d")]
    ok(velo(store, "run", "lo", "hi", "--at", at, "--", *rm))

    def kinds(args: list[str]) -> dict[str, tuple[str, str | None, str | None]]:
        return {
            c["path"]: (c["status"], (c["old"] or {}).get("kind"), (c["new"] or {}).get("kind"))
            for c in data(velo(store, "diff", *args, "--json"))
        }

    assert kinds(["hi@{1}", "hi"]) == {
        "x": ("D", "file", "mask"),
        "d/f": ("D", "file", None),
        "d": ("D", None, "mask"),
    }
    assert kinds(["hi", "hi@{1}"]) == {
        "x": ("A", "mask", "file"),
        "d/f": ("A", None, "file"),
        "d": ("A", "mask", None),
    }
    assert ok(velo(store, "diff", "--name-status", "hi", "hi@{1}")).splitlines() == [
        "A\td",
        "A\td/f",
        "A\tx",
    ]
    patch = ok(velo(store, "diff", "-p", "hi", "hi@{1}"))
    unmasked = "unmasked: what the refs below provide at this path shows again"
    assert f"diff --velo a/d b/d\n{unmasked}\n" in patch, patch
    mode = f"{stat.S_IMODE(os.lstat(os.path.join(hi, 'x')).st_mode):o}"
    taken = "unmasked: this ref's own entry takes the mask's place"
    assert f"diff --velo a/x b/x\nnew file mode {mode}\n{taken}\n--- /dev/null\n" in patch, patch
