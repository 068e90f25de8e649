"""One change of a session, described the same way wherever it is shown: the end-of-session
summary (`run --json` `changes`), `status`, `diff --session` while it runs, and `diff REF@{1}
REF` of what it committed; each checked against the real trees (checkouts of the top ref before
and after, the source directories the refs were ingested from)."""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

import pytest

from tests.e2e.test_cli import _expected_changes
from tests.e2e.test_cli_session import _checkout
from tests.helpers.cli import data, live_session, ok, velo
from tests.helpers.trees import make_tree

pytestmark = pytest.mark.needs("root", "overlay_root")


def _stack(store: str, shm_tmp: str) -> tuple[str, str]:
    """Refs `lo` and `hi` (stacked `lo hi`): `d` in both, `e` in lo alone, `f` in hi alone."""
    lo, hi = os.path.join(shm_tmp, "lo"), os.path.join(shm_tmp, "hi")
    make_tree(lo, {"d/k": b"low\n", "d/lowonly": b"lo\n", "e/x": b"e\n", "e/s/t": b"t\n"})
    make_tree(hi, {"d/k": b"top\n", "d/hionly": b"hi\n", "f/y": b"f\n", "g/z": b"g\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    return lo, hi


def _pairs(rows: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["status"], r["path"]) for r in rows]


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_stacked_sessions_summary_says_what_diff_of_its_commit_says(
    store: str, shm_tmp: str, backend: str
) -> None:
    """The summary of a stacked session listed its changes as the stacked view saw them: `D
    e/x`, `D e/s/t` for a directory only the lower ref had, deleted whole, and `M` for a lower
    ref's file changed, where `diff hi@{1} hi` of what it committed says `D e` (one mask) and
    `A` (the top ref gained the file). It now says what that diff says."""
    _stack(store, shm_tmp)
    before = _checkout(store, "hi", os.path.join(shm_tmp, "before"))
    at = os.path.join(shm_tmp, "at")
    script = f"cd {at} && rm -r e g && echo more >> d/lowonly && echo new > n"
    p = velo(
        store, "run", "lo", "hi", "--at", at, "--backend", backend, "--json", "--",
        "sh", "-c", script,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = _pairs(json.loads(p.stdout)["changes"])
    after = _checkout(store, "hi", os.path.join(shm_tmp, "after"))
    # the real thing: the top ref's own files before and after, and one mask for `e`, the
    # directory of the lower ref alone the command deleted whole
    want = {**_expected_changes(before, after), "e": "D"}
    assert {path: status for status, path in summary} == want and len(summary) == len(want)
    assert summary == _pairs(data(velo(store, "diff", "hi@{1}", "hi", "--json")))


_FORMS = [("-p",), ("--stat",), ("--name-status",), ()]

# What the command does: a directory both refs have, deleted whole (`d`); one of the lower ref
# alone (`e`); one of the top ref alone, made anew with other content (`f`, opaque in overlay);
# a lower ref's file changed (`d2/w`, in a directory of the lower ref) and one of the top
# ref's (`g/z`); a file replaced by a directory and a new file.
_SCRIPT = (
    "rm -r d e f && mkdir f && echo again > f/new && echo more >> d2/w && echo zz >> g/z && "
    "rm h && mkdir h && echo in > h/i && echo n > n && mv d2 d3 && mv g g2 && echo r >> g2/z"
)


def _live_then_harvested(
    store: str, shm_tmp: str, refs: list[str], backend: str, command: str = _SCRIPT
) -> tuple[dict[tuple[str, ...], str], list[dict[str, object]], list[object]]:
    """Run `command` in a session of `refs`; while it waits: `diff --session` in each of
    `_FORMS`, with `-p --json`, and `status --json`'s changes of it."""
    at = os.path.join(shm_tmp, "at")
    with live_session(
        store, "run", *refs, "--at", at, "--backend", backend,
        command=f"cd {at} && {command}", base=shm_tmp,
    ) as session:  # fmt: skip
        sid = session.sid()
        live = {how: ok(velo(store, "diff", "--session", sid, *how)) for how in _FORMS}
        as_json = data(velo(store, "diff", "--session", sid, "-p", "--json"))
        [running] = data(velo(store, "status", "--json"))["sessions"]
    assert session.returncode == 0, session.err
    return live, as_json, running["changes"]


def _all_agree(
    store: str,
    want: dict[str, str],
    live: dict[tuple[str, ...], str],
    harvested: dict[tuple[str, ...], str],
    as_json: list[dict[str, object]],
    status: list[object],
) -> list[dict[str, Any]]:
    """The harvested diff of hi lists `want` (path -> status: the real change), the live views
    (each text form, `-p --json`, `status --json`) said the same, and its `--json`: returned."""
    got = [tuple(x.split("\t")) for x in harvested[("--name-status",)].splitlines()]
    assert {p: s for s, p in got} == want and len(got) == len(want), got
    assert live == harvested
    committed: list[dict[str, Any]] = data(velo(store, "diff", "hi@{1}", "hi", "--json"))
    assert status == [{"status": c["status"], "path": c["path"]} for c in committed]
    assert [(c["status"], c["path"]) for c in as_json] == [
        (c["status"], c["path"]) for c in committed
    ]
    return committed


@pytest.mark.parametrize("stacked", [True, False], ids=["stack", "one-ref"])
@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_running_sessions_diff_and_status_say_what_its_harvest_commits(
    store: str, shm_tmp: str, backend: str, stacked: bool
) -> None:
    """`diff --session` and `status` of a running session compared its live tree with the view
    it saw; its harvest's `diff hi@{1} hi` compares the top ref's versions. They differed: an
    overlay session's deleted directory was one `D d` (`d | 0` in --stat) where the harvest's
    diff lists each file; in a stack, a directory both refs have, deleted whole, listed the
    lower ref's entries too, and a lower ref's changed file was `M`, which the top ref gains
    (`A`). Now they say the same, in every form; and the harvest's diff is the real change of
    the top ref's own files (checkouts before and after) plus one mask per path of the lower
    ref the command removed whole. `d`, which both refs have, was its top-ref files' `D` alone,
    though the mask that replaced it hides the lower ref's `d/lowonly` too: it is a masked `D d`
    as well (the stack seen again afterwards has no `d`; the lower ref still has it)."""
    lo = {"d/k": b"low\n", "d/lowonly": b"lo\n", "e/x": b"e\n", "e/s/t": b"t\n", "d2/w": b"w\n"}
    hi = {"d/k": b"top\n", "d/hionly": b"hi\n", "f/y": b"f\n", "g/z": b"g\n", "h": b"h\n"}
    if stacked:
        make_tree(os.path.join(shm_tmp, "lo"), lo)
        ok(velo(store, "ingest", os.path.join(shm_tmp, "lo"), "-n", "lo"))
    make_tree(os.path.join(shm_tmp, "hi"), hi if stacked else {**lo, **hi})
    ok(velo(store, "ingest", os.path.join(shm_tmp, "hi"), "-n", "hi"))
    refs = ["lo", "hi"] if stacked else ["hi"]
    before = _checkout(store, "hi", os.path.join(shm_tmp, "before"))
    live, as_json, status = _live_then_harvested(store, shm_tmp, refs, backend)
    harvested = {how: ok(velo(store, "diff", "hi@{1}", "hi", *how)) for how in _FORMS}
    after = _checkout(store, "hi", os.path.join(shm_tmp, "after"))
    # the lower ref's directories the command removed whole (deleted, moved away): one mask each
    masks = ["d", "d2", "e"] if stacked else []
    want = {**_expected_changes(before, after), **dict.fromkeys(masks, "D")}
    committed = _all_agree(store, want, live, harvested, as_json, status)
    masked = [c["path"] for c in committed if (c["new"] or {}).get("kind") == "mask"]
    assert [c["path"] for c in as_json if c["masked"]] == masked == masks
    if stacked:  # what the masks do: the lower ref keeps its entries, the stack shows none
        assert os.path.isfile(os.path.join(_checkout(store, "lo", f"{shm_tmp}/lo2"), "d/lowonly"))
        at2 = os.path.join(shm_tmp, "at2")
        seen = ok(velo(store, "run", "lo", "hi", "--at", at2, "--", "sh", "-c", f"ls -A {at2}"))
        assert sorted(seen.split()) == sorted(os.listdir(after))


# user::rw-, user:1501:r--, group::---, mask::r--, other::---: stat shows 0640, the owning
# group may read nothing (0600 stored)
_SECRET_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", *e)
    for e in (
        (1, 6, 0xFFFFFFFF),
        (2, 4, 1501),
        (4, 0, 0xFFFFFFFF),
        (16, 4, 0xFFFFFFFF),
        (32, 0, 0xFFFFFFFF),
    )
)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_copied_up_store_link_is_told_as_the_file_its_harvest_records(
    store: str, shm_tmp: str, backend: str
) -> None:
    """A Tier-1 file is a symlink into the store in the session's tree. A metadata change to it
    (`chown -h`: copied up as it was; `touch -h`: a new mtime) copies that symlink up, and the
    harvest records the file again (unchanged, or with that mtime); a `cp -a` of it is a new
    file. The live view of an overlay session read the copied-up link as a symlink: `T` for
    both, and a symlink's mode for the copy (`-p`); and a changed file's mode as stat gives it
    (a setuid bit the harvest removes, the mask where an ACL gives the group nothing). Now it
    says what the harvest commits; that is the real change (checkouts before and after:
    contents, kinds, modes, the mtime `touch -h` gave)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.gguf": b"w a\n", "b.gguf": b"w b\n", "t.txt": b"t\n", "s.txt": b"s\n"})
    ok(velo(store, "ingest", src, "-n", "hi"))
    before = _checkout(store, "hi", os.path.join(shm_tmp, "before"))
    command = (
        "chown -h 0:0 a.gguf && touch -h -d @1000000000 b.gguf && cp -a a.gguf c.gguf && "
        f"echo more >> t.txt && chmod u+s t.txt && echo more >> s.txt && {sys.executable} -c "
        f"\"import os; os.setxattr('s.txt', 'system.posix_acl_access', {_SECRET_ACL!r})\""
    )
    live, as_json, status = _live_then_harvested(store, shm_tmp, ["hi"], backend, command)
    harvested = {how: ok(velo(store, "diff", "hi@{1}", "hi", *how)) for how in _FORMS}
    after = _checkout(store, "hi", os.path.join(shm_tmp, "after"))
    mtime = os.path.getmtime(os.path.join(after, "b.gguf"))
    assert mtime == 1000000000 != os.path.getmtime(os.path.join(before, "b.gguf"))
    want = _expected_changes(before, after)  # (a diff, as git's, lists no mtime alone)
    assert want == {"c.gguf": "A", "s.txt": "M", "t.txt": "M"}
    # the modes the harvest recorded: no setuid bit minted, the group bits the ACL allows
    assert [os.stat(os.path.join(after, n)).st_mode & 0o7777 for n in ("t.txt", "s.txt")] == [
        0o644,
        0o600,
    ]
    _all_agree(store, want, live, harvested, as_json, status)


@pytest.mark.parametrize("meanwhile", ["part", "all"])
@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_merged_sessions_summary_says_what_the_merged_commit_changed(
    store: str, shm_tmp: str, backend: str, meanwhile: str
) -> None:
    """While the session runs, its ref is ingested again with `f1` changed as the session
    changes it (and, for "all", `n` added as the session adds it: content, mode, mtime). The
    session's end merges into the moved ref; its summary listed the session's own change (`M
    f1`, `A n`), where `diff t@{1} t` of the merged commit (and what `rollback t` undoes) is
    `A n` alone; with every change there already nothing is committed, and the summary listed
    both. Now it says what the merged commit changed, checked against checkouts of the ref
    before and after."""
    res, _err, moved, before = _merge_race(store, shm_tmp, backend, meanwhile, ["--json"])
    after = _checkout(store, "t", os.path.join(shm_tmp, "after"))
    want = _expected_changes(before, after)
    assert want == ({"n": "A"} if meanwhile == "part" else {})
    assert {c["path"]: c["status"] for c in res["changes"]} == want
    assert res["changed"] == len(res["changes"]) == len(want)
    if meanwhile == "all":  # nothing committed: `diff t@{1} t` is the ingest's change
        assert res["commit"] == moved
        assert any("already had every change" in w for w in res["warnings"]), res["warnings"]
    else:
        committed = data(velo(store, "diff", "t@{1}", "t", "--json"))
        assert res["changes"] == [{"status": c["status"], "path": c["path"]} for c in committed]


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_merged_session_with_nothing_new_says_so_in_its_end_line(
    store: str, shm_tmp: str, backend: str
) -> None:
    """The ref got every change of the session meanwhile: nothing is committed, yet the end line
    said "only timestamps changed (commit <the other writer's head>)", as if the session had
    committed. It now says nothing new was committed and where the ref is (its head, read from
    `refs`), and no undo hint (there is nothing of the session's to roll back)."""
    _res, err, moved, _before = _merge_race(store, shm_tmp, backend, "all", [])
    assert "only timestamps changed" not in err, err
    assert f"t: nothing new to commit (the ref is at commit {moved[:12]})" in err, err
    assert "rollback" not in err, err
    [head] = [r["head"] for r in data(velo(store, "refs", "--json")) if r["name"] == "t"]
    assert head == moved


def _merge_race(
    store: str, shm_tmp: str, backend: str, meanwhile: str, flags: list[str]
) -> tuple[Any, str, str, Any]:
    """A session of ref `t` that changes f1 (and adds n) while `t` is ingested again with the
    same change (`part`: f1 only): (its JSON report or stdout, its stderr, the moved head,
    a checkout of the moved ref)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f1": b"one\n", "f2": b"two\n"})
    ok(velo(store, "ingest", src, "-n", "t"))
    at = os.path.join(shm_tmp, "at")
    command = f"cd {at} && echo same > f1 && echo mine > n && touch -d @1500000000 f1 n ."
    with live_session(
        store, *flags, "run", "t", "--at", at, "--backend", backend, command=command,
        base=shm_tmp,
    ) as session:  # fmt: skip
        session.sid()
        same = {"f1": b"same\n", **({"n": b"mine\n"} if meanwhile == "all" else {})}
        make_tree(src, same)
        for name in [*same, "."]:  # the same entries as the session's: content, mode, mtime
            os.utime(os.path.join(src, name), (1500000000, 1500000000))
        ok(velo(store, "ingest", src, "-n", "t"))
        before = _checkout(store, "t", os.path.join(shm_tmp, "before"))  # the moved ref
        [moved] = [r["head"] for r in data(velo(store, "refs", "--json")) if r["name"] == "t"]
    assert session.returncode == 0, (session.out, session.err)
    out = json.loads(session.out) if flags else session.out
    return out, session.err.decode(), moved, before
