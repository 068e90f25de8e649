"""Sessions beyond single file operations: exit codes, the cwd, Tier-1 and the read-only store,
concurrent sessions and conflicts, delta layers, stacked refs, options and refusals."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from tests.helpers.unpriv import run_in_userns, unpriv_tmpdir
from tests.session._util import (
    MODE_MARKS,
    as_mode,
    checkout_ref,
    fsck_ok,
    hash_tree,
    head_root,
    mode_params,
    new_store,
    run_session,
)
from veloverlay import fsflags, session
from veloverlay.errors import Reason, VeloError
from veloverlay.lower import homes, layers, prune, stacks
from veloverlay.session import reaper
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind
from veloverlay.verbs.repo import Repo

BOTH = mode_params("root", "rootfree")


def _exit_codes(base: str) -> list[int]:
    store, src = new_store(base)
    proj = os.path.join(base, "proj")
    out = []
    for argv in (
        ["sh", "-c", "exit 3"],
        ["no-such-command-veloverlay"],
        ["sh", "-c", "kill -9 $$"],
        ["true"],
        ["true", "a NUL\x00byte"],  # no exec can pass it: cannot be executed
    ):
        out.append(run_session(store, ["t"], argv, at=proj).exit_status)
    return out


@pytest.mark.parametrize("mode", BOTH)
def test_exit_status_passes_through(mode: str) -> None:
    with unpriv_tmpdir() as base:
        assert as_mode(mode, _exit_codes, base) == [3, 127, 137, 0, 126]


def _empty_command(base: str) -> list[int]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    os.mkdir(proj)  # kept after the session (one it made would go with it), to chdir into
    # posix_spawn (no cwd to change to) and fork + exec (a working directory in the target)
    out = [run_session(store, ["t"], [""], at=proj).exit_status]
    here = os.getcwd()
    os.chdir(proj)
    try:
        out.append(run_session(store, ["t"], ["", "x"], at=proj).exit_status)
    finally:
        os.chdir(here)
    return out


@pytest.mark.parametrize("mode", BOTH)
def test_an_empty_command_name_is_not_found_as_in_a_shell(mode: str) -> None:
    """`run REF -- ''` (an unset variable in a script: `run REF -- "$TOOL"`) exited 126 with
    'posix_spawn: argv first element cannot be empty'; a shell says 'command not found', 127."""
    with unpriv_tmpdir() as base:
        assert as_mode(mode, _empty_command, base) == [127, 127]


def _how_the_command_starts(base: str) -> list[str]:
    store, src = new_store(base)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    bins = []
    for name, mode in (("bin1", 0o644), ("bin2", 0o755)):  # the first `tool` is not executable
        d = os.path.join(base, name)
        os.mkdir(d)
        with open(os.path.join(d, "tool"), "w") as f:
            f.write(f"#!/bin/sh\necho {name}\n")
        os.chmod(os.path.join(d, "tool"), mode)
        bins.append(d)
    os.environ["PATH"] = ":".join([*bins, os.environ.get("PATH", os.defpath)])
    leaked = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # a descriptor the caller left open, not close-on-exec
    script = (
        f"tool > {out}; grep ^SigIgn /proc/self/status >> {out}; "
        f"[ -e /proc/$$/fd/{leaked} ] && echo leaked >> {out}; echo end >> {out}"
    )
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj)
    with open(out) as f:
        lines = f.read().split()
    noexec = run_session(store, ["t"], [os.path.join(bins[0], "tool")], at=proj).exit_status
    return [*lines, str(res.exit_status), str(noexec)]


@pytest.mark.parametrize("mode", BOTH)
def test_the_command_starts_as_exec_would_start_it(mode: str) -> None:
    # PATH is searched past a match that cannot be executed (as execvp does), the signals the
    # reaper ignores are at their defaults in the command, no descriptor of the caller's leaks
    # in, and a file that cannot be executed is 126.
    with unpriv_tmpdir() as base:
        got = as_mode(mode, _how_the_command_starts, base)
    assert got[0] == "bin2" and got[1] == "SigIgn:" and got[3:] == ["end", "0", "126"], got
    ignored = int(got[2], 16)
    for sig in reaper.CHILD_SIGNALS:
        assert not ignored & (1 << (sig - 1)), (sig, got)


def _first_process_after_the_reaper(base: str) -> list[str]:
    store, _src = new_store(base)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    bindir, afile = os.path.join(base, "bin"), os.path.join(base, "a-file")
    os.mkdir(bindir)
    with open(os.path.join(bindir, "tool"), "w") as f:
        f.write(f"#!/bin/sh\necho $$ > {out}\n")
    os.chmod(os.path.join(bindir, "tool"), 0o755)
    open(afile, "w").close()
    os.symlink(os.path.join(base, "gone"), os.path.join(base, "dangling"))
    # entries without the command: missing, a file (ENOTDIR), a dangling symlink to a directory
    missing = [os.path.join(base, f"none{i}") for i in range(6)]
    os.environ["PATH"] = ":".join([*missing, afile, os.path.join(base, "dangling"), bindir])
    res = run_session(store, ["t"], ["tool"], at=proj)
    lost = run_session(store, ["t"], ["no-such-tool-veloverlay"], at=proj)
    with open(out) as f:
        return [f.read().strip(), str(res.exit_status), str(lost.exit_status)]


@pytest.mark.parametrize("mode", BOTH)
def test_path_entries_without_the_command_start_no_process(mode: str) -> None:
    """Each PATH entry before the command's was tried with a posix_spawn of its own: a vfork and
    a child that failed to exec, eight of them before /usr/bin/true on this machine's PATH. The
    command is now the first process the session's pid 1 starts (pid 2 in its pid namespace),
    and a command on no entry is still 127."""
    with unpriv_tmpdir() as base:
        got = as_mode(mode, _first_process_after_the_reaper, base)
    assert got == ["2", "0", "127"], got


def _cwd_inside_target(base: str) -> tuple[str, str]:
    store, src = new_store(base)
    with open(os.path.join(src, "f1"), "w") as f:
        f.write("host copy, hidden by the projection\n")
    out = os.path.join(base, "out")
    os.chdir(src)  # the ref's recorded path is the default target
    res = run_session(store, ["t"], ["sh", "-c", f"cat f1 > {out}; pwd >> {out}; ls >> {out}"])
    os.chdir("/")
    with open(out) as f:
        return f.read(), res.session_id


@pytest.mark.parametrize("mode", BOTH)
def test_shell_started_inside_target_sees_projection(mode: str) -> None:
    with unpriv_tmpdir() as base:
        text, _sid = as_mode(mode, _cwd_inside_target, base)
    lines = text.splitlines()
    assert lines[0] == "one"
    assert lines[1].endswith("/src")
    assert "model.gguf" in lines and "emptydir" in lines


def _readonly(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    out = os.path.join(base, "out")
    s = os.fspath(store.root)
    # Warm the lower layers so that they exist before the "before" snapshot.
    run_session(store, ["t"], ["true"], at=proj)
    watched = {
        "objects": os.fspath(store.objects),
        "layers": os.fspath(store.trees / "layers"),
        "per-boot layers": os.fspath(homes.layer_homes(store)[0] / "layers"),
        "ids": os.fspath(store.root / "ids-v1"),
        "proxies": os.fspath(store.trees / "proxies"),
    }
    before = {k: hash_tree(v) for k, v in watched.items() if os.path.isdir(v)}
    script = f"""
cd {proj}
r() {{ if "$@" 2>>{out}.err; then echo "$1 ok" >> {out}; else echo "$1 failed" >> {out}; fi; }}
r sh -c 'printf x >> model.gguf'
r sh -c 'printf x > {s}/objects-v2/new'
r sh -c 'printf x >> {s}/manifests.lmdb/data.mdb'
r sh -c 'mkdir {s}/trees-v1/x'
r sh -c 'mkdir {watched["per-boot layers"]}/x'
r sh -c 'mount -o remount,bind,rw {s}'
r sh -c 'umount -l {proj}'
for f in f1 f2 f3 d/b dir1/sub/y exec.sh; do printf appended >> $f; chmod 600 $f; done
r sh -c 'printf new > fresh'
cat model.gguf > model.copy
"""
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj)
    after = {k: hash_tree(v) for k, v in watched.items() if os.path.isdir(v)}
    with open(out) as f:
        lines = f.read().splitlines()
    with open(out + ".err") as f:
        errors = f.read()
    m = Manifests(store)
    try:
        with m.read() as txn:
            objs = [bytes.fromhex(n) for n, _p in store.iter_objects()]
            _r, c = m.resolve(txn, "t")
            e = m.lookup(txn, bytes.fromhex(c.root), b"model.gguf")
            tier = e.tier if e else None
    finally:
        m.close()
    immutable = all(fsflags.is_immutable(store.object_path(d)) for d in objs)
    return {
        "lines": lines,
        "errors": errors,
        # harvest adds objects; nothing that existed may change
        "same": {k: all(after[k].get(p) == v for p, v in before[k].items()) for k in before},
        "protection": res.protection,
        "per_boot": os.path.isdir(watched["per-boot layers"]),
        "form": res.lower_form,
        "immutable": immutable,
        "tier": tier,
        "fsck": fsck_ok(store),
        "changed": res.changed,
    }


@pytest.mark.parametrize("mode", BOTH)
def test_tier1_writes_fail_and_store_is_read_only(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _readonly, base)
    lines = r["lines"]
    assert isinstance(lines, list)
    assert "sh failed" in lines[0], lines  # Tier-1 path
    # store, lmdb, trees, the per-boot layers, mounts
    assert lines[1:7] == ["sh failed"] * 6, (lines, r["errors"])
    assert lines[7] == "sh ok"  # the overlay itself stays writable
    if r["form"] == "data-only":
        assert r["per_boot"], "the data-only layers were not built in the per-boot cache"
    assert "Read-only file system" in str(r["errors"])
    assert r["same"] == {k: True for k in r["same"]}  # type: ignore[union-attr]
    assert r["tier"] == 1
    assert r["fsck"] == []
    if mode == "root":
        assert r["protection"] == "immutable" and r["immutable"]
    else:
        assert r["protection"] == "read-only-mount"


def _concurrent(
    base: str, same_file: bool, same_bytes: bool = False, a_rewrites: bool = False
) -> dict[str, object]:
    """Session A writes, waits for session B to write and commit, then commits. `same_bytes`: B
    writes what A does; `a_rewrites`: A writes it again after B's commit (A's mtime the later).
    Each session records the mtime it left on its file (`stat` inside it)."""
    store, _src = new_store(base)
    go = os.path.join(base, "go")
    proj_a, proj_b = os.path.join(base, "pa"), os.path.join(base, "pb")
    a_file = "f1" if same_file else "d/from_a"
    b_file = "f1" if same_file else "d/from_b"
    result_a = os.path.join(base, "a.json")
    pid = os.fork()
    if pid == 0:
        try:
            res = run_session(
                store,
                ["t"],
                [
                    "sh",
                    "-c",
                    # waits for B, at most 30 s: a failing test never leaves A behind
                    f"printf A > {proj_a}/{a_file}; n=0; "
                    f"while [ ! -e {go} ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n+1)); done; "
                    + (f"printf A > {proj_a}/{a_file}; " if a_rewrites else "")
                    + f"stat -c %.9Y {proj_a}/{a_file} > {base}/a.mtime",
                ],
                at=proj_a,
            )
            with open(result_a, "w") as f:
                json.dump(res.to_dict(), f)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 20
        while not any(
            os.path.exists(os.path.join(store.sessions, s, "upper", a_file))
            for s in os.listdir(store.sessions)
        ):
            assert time.monotonic() < deadline, "session A did not start"
            time.sleep(0.02)
        b_writes = f"printf {'A' if same_bytes else 'B'} > {proj_b}/{b_file}"
        b_stat = f"stat -c %.9Y {proj_b}/{b_file} > {base}/b.mtime"
        res_b = run_session(store, ["t"], ["sh", "-c", f"{b_writes}; {b_stat}"], at=proj_b)
    finally:
        open(go, "w").close()  # release A whatever happened here, then wait for it
        os.waitpid(pid, 0)
    with open(result_a) as f:
        res_a = json.load(f)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    out: dict[str, object] = {"a": res_a, "b": res_b.to_dict(), "fsck": fsck_ok(store)}
    for name in ("f1", "d/from_a", "d/from_b"):
        p = os.path.join(got, name)
        out["head:" + name] = open(p).read() if os.path.exists(p) else None
    if same_file:
        out["mtime:f1"] = os.stat(os.path.join(got, "f1")).st_mtime_ns
        for side in ("a", "b"):
            with open(os.path.join(base, f"{side}.mtime")) as f:
                out[f"{side}.mtime"] = int(f.read().strip().replace(".", ""))
    if res_a["conflict_ref"]:
        cref = os.path.join(base, "cref")
        checkout_ref(store, res_a["conflict_ref"], cref)
        out["conflict:f1"] = open(os.path.join(cref, "f1")).read()
    return out


@pytest.mark.parametrize("mode", BOTH)
def test_concurrent_sessions_disjoint_files_both_land(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _concurrent, base, False)
    assert r["head:d/from_a"] == "A" and r["head:d/from_b"] == "B"
    a = r["a"]
    assert isinstance(a, dict)
    assert a["commit"] and a["conflict_ref"] is None
    assert r["fsck"] == []


@pytest.mark.parametrize("mode", BOTH)
def test_concurrent_sessions_same_file_conflict_keeps_both(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _concurrent, base, True)
    a = r["a"]
    assert isinstance(a, dict)
    assert a["conflict_ref"] == f"t@{a['session_id']}"
    assert a["conflicts"] == ["f1"]
    assert r["head:f1"] == "B"  # the first to commit
    assert r["conflict:f1"] == "A"  # nothing lost
    assert r["fsck"] == []


@pytest.mark.parametrize("later", ["b", "a"])
@pytest.mark.parametrize("mode", BOTH)
def test_concurrent_sessions_writing_the_same_bytes_merge_with_the_later_mtime(
    mode: str, later: str
) -> None:
    """Two sessions write one file with the same bytes and mode at different times (two builds
    of one output): no conflict (old code: "both changed: f1" for the mtimes alone); the file
    keeps the later write's mtime, as a directory both had written to would. `later`: which
    session wrote last (B, which commits first, or A, which rewrites after B's commit)."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _concurrent, base, True, True, later == "a")
    a = r["a"]
    assert isinstance(a, dict)
    assert a["conflict_ref"] is None and a["conflicts"] == [], a
    assert a["commit"]
    assert r["head:f1"] == "A"
    assert r["a.mtime"] != r["b.mtime"]
    assert r["mtime:f1"] == r[f"{later}.mtime"] == max(r["a.mtime"], r["b.mtime"])  # type: ignore[type-var]
    assert r["fsck"] == []


def _delta_layers(base: str, flatten_after: int) -> dict[str, object]:
    stacks.FLATTEN_AFTER = flatten_after
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    out = os.path.join(base, "out")
    built = []
    scripts = [
        "printf v1 > f1; printf added > added; rm d/b",
        f"cat f1 added > {out}; echo >> {out}; ls d >> {out}; rm added; printf v2 > f1; "
        "mkdir -p q/r",
        f"cat f1 >> {out}; echo >> {out}; ls >> {out}; printf v3 > f3",
        "printf v4 > f4",
    ]
    for script in scripts:
        root = head_root(store, "t")
        run_session(store, ["t"], ["sh", "-euc", f"cd {proj}; {script}"], at=proj)
        for form in layers.FORMS:
            for home in homes.layer_homes(store):
                p = home / "stacks" / f"{form}-{root.hex()}.json"
                if p.exists():
                    data = json.loads(p.read_text())
                    built.append((data["built"], len(data["layers"])))
    with open(out) as f:
        seen = f.read().splitlines()
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return {
        "built": built,
        "seen": seen,
        "final": sorted(os.listdir(got)),
        "f1": open(os.path.join(got, "f1")).read(),
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", BOTH)
def test_next_session_stacks_a_delta_layer(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _delta_layers, base, 20)
    assert r["built"] == [("full", 1), ("delta", 2), ("delta", 3), ("delta", 4)]
    assert r["seen"][:3] == ["v1added", "c", "v2"]
    assert "added" not in r["final"] and "q" in r["final"]
    assert r["f1"] == "v2"
    assert r["fsck"] == []


def test_flatten_after_n_layers() -> None:
    with unpriv_tmpdir() as base:
        r = as_mode("root", _delta_layers, base, 2)
    assert r["built"] == [("full", 1), ("delta", 2), ("full", 1), ("delta", 2)]
    assert r["f1"] == "v2"


def _stacked(base: str, **kw: Any) -> dict[str, object]:
    """Two refs stacked (t below u): reads see u over t; deleting t's paths records MASKs in u;
    t is untouched. `kw` picks the backend (and --link for the shim)."""
    store, src = new_store(base)
    top_src = os.path.join(base, "top")
    os.makedirs(os.path.join(top_src, "d"))
    with open(os.path.join(top_src, "d", "c"), "w") as f:
        f.write("top version\n")
    with open(os.path.join(top_src, "only-top"), "w") as f:
        f.write("t\n")
    from veloverlay.ingest.pipeline import ingest

    m = Manifests(store)
    try:
        ingest(store, m, top_src, "u", jobs=1)
    finally:
        m.close()
    proj = os.path.join(base, "proj")
    out = os.path.join(base, "out")
    script = (
        f"cd {proj}; cat d/c f1 > {out}; rm f2; rm -r dir2; printf changed >> f3; "
        "printf new > d/new; chmod 700 exec.sh"
    )
    res = run_session(store, ["t", "u"], ["sh", "-euc", script], at=proj, **kw)
    m = Manifests(store)
    try:
        with m.read() as txn:
            _r, c = m.resolve(txn, "u")
            root = bytes.fromhex(c.root)
            kinds = {
                p: m.lookup(txn, root, p.encode()).kind.name  # type: ignore[union-attr]
                for p in ("f2", "dir2", "f3", "d/new", "d/c", "exec.sh", "only-top")
            }
            base_t = m.resolve(txn, "t")[1].root
    finally:
        m.close()
    repo = Repo.open(os.fspath(store.root))
    try:  # what `diff u@{1} u` says of the session's commit (it showed no masks)
        diff = sorted((c.status, os.fsdecode(c.path)) for c in repo.changes("u@{1}", "u"))
    finally:
        repo.close()
    # The next stacked session sees the masks hide the lower ref's paths.
    seen2 = os.path.join(base, "seen2")
    run_session(store, ["t", "u"], ["sh", "-c", f"cd {proj}; ls > {seen2}"], at=proj, **kw)
    with open(out) as f:
        first = f.read()
    with open(seen2) as f:
        listing = f.read().split()
    return {
        "first": first,
        "kinds": kinds,
        "listing": listing,
        "t_unchanged": base_t == head_root(store, "t").hex(),
        "ref": res.ref,
        "backend": res.backend,
        "fsck": fsck_ok(store),
        "changes": sorted(res.changes),
        "diff": diff,
    }


STACK_BACKENDS = [
    pytest.param("root", {}, marks=pytest.mark.needs(*MODE_MARKS["root"]), id="overlay-root"),
    *(
        pytest.param(
            m, {"backend": "shim", "link": link}, id=f"shim-{'link' if link else 'copy'}-{m}"
        )
        for m in ("root", "rootfree")
        for link in (False, True)
    ),
]


@pytest.mark.parametrize(("mode", "kw"), STACK_BACKENDS)
def test_stacked_refs_delta_goes_to_top_with_masks(mode: Any, kw: dict[str, Any]) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _stacked, base, **kw)
    assert r["backend"] == kw.get("backend", "overlay")
    assert r["first"] == "top version\none\n"
    assert r["ref"] == "u"
    assert r["kinds"] == {
        "f2": "MASK",
        "dir2": "MASK",
        "f3": "FILE",
        "d/new": "FILE",
        "d/c": "FILE",
        "exec.sh": "FILE",
        "only-top": "FILE",
    }
    listing = r["listing"]
    assert isinstance(listing, list)
    assert "f2" not in listing and "dir2" not in listing and "f1" in listing
    # the top ref's own history shows the deletions its masks make (and the rest of the change)
    assert r["diff"] == [
        ("A", "d/new"),
        ("A", "exec.sh"),
        ("A", "f3"),
        ("D", "dir2"),
        ("D", "f2"),
    ], r["diff"]
    assert r["t_unchanged"]
    assert r["fsck"] == []
    # The end line tells what the session committed, as `diff u@{1} u` does: the lower ref's
    # directory deleted whole is the one mask `D dir2` (it listed `D dir2/z`, the stacked
    # view's entries), a lower ref's file changed is added to u (it said `M f3`).
    assert r["changes"] == r["diff"]


def _options(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    head0 = head_root(store, "t")
    r1 = run_session(store, ["t"], ["sh", "-c", f"printf x > {proj}/gone"], at=proj, discard=True)
    head1 = head_root(store, "t")
    r2 = run_session(store, ["t"], ["sh", "-c", f"printf y > {proj}/kept"], at=proj, commit=False)
    head2 = head_root(store, "t")
    sref = os.path.join(base, "sref")
    checkout_ref(store, r2.conflict_ref or "?", sref)
    infos = {i.id: i.state for i in session.list_sessions(store)}
    cleaned = session.clean_sessions(store)
    left = session.list_sessions(store)
    return {
        "discard_unchanged": head0 == head1 and r1.commit is None,
        "nocommit_unchanged": head1 == head2 and r2.commit is None,
        "sref": r2.conflict_ref,
        "sid": r2.session_id,
        "kept": open(os.path.join(sref, "kept")).read(),
        "states": sorted(infos.values()),
        "cleaned": cleaned,
        "left": len(left),
    }


@pytest.mark.parametrize("mode", BOTH)
def test_discard_no_commit_list_and_clean(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _options, base)
    assert r["discard_unchanged"] and r["nocommit_unchanged"]
    assert r["sref"] == f"t@{r['sid']}"
    assert r["kept"] == "y"
    assert r["states"] == ["discarded", "harvested"]
    assert r["cleaned"] == 2 and r["left"] == 0


def _refusals(base: str) -> dict[str, str]:
    from veloverlay.lower.homes import base as cache_base

    store, _src = new_store(base)
    rt = os.path.join(base, "rt")
    os.mkdir(rt, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = rt
    cache = cache_base()[0]
    assert cache is not None
    out: dict[str, str] = {}
    cases: dict[str, dict[str, object]] = {
        "normal": {"at": os.path.join(base, "p")},
        "inside-store": {"at": os.path.join(os.fspath(store.root), "x")},
        "contains-store": {"at": base},
        # the per-boot layer cache is as trusted as the store (DESIGN.md)
        "inside-cache": {"at": os.path.join(cache, "x")},
        "no-parent": {"at": os.path.join(base, "missing", "deeper")},
        "shim": {"at": os.path.join(base, "p"), "backend": "shim"},
        "strict": {"at": os.path.join(base, "p"), "strict": True},
    }
    for name, kw in cases.items():
        try:
            run_session(store, ["t"], ["true"], **kw)
            out[name] = "ok"
        except VeloError as exc:
            out[name] = exc.reason.value
    os.environ["VELO_FORCE_LOWER"] = "links"
    try:
        run_session(store, ["t"], ["true"], at=os.path.join(base, "p"), strict=True)
        out["strict-links"] = "ok"
    except VeloError as exc:
        out["strict-links"] = exc.reason.value
    # made for the session (it ran there: "normal" is ok), and removed with it, as the shim does
    out["created"] = str(not os.path.lexists(os.path.join(base, "p")))
    return out


@pytest.mark.parametrize("mode", BOTH)
def test_refusals(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _refusals, base)
    assert r["inside-store"] == Reason.TARGET_INVALID.value
    assert r["contains-store"] == Reason.TARGET_INVALID.value
    assert r["inside-cache"] == Reason.TARGET_INVALID.value
    assert r["no-parent"] == Reason.TARGET_INVALID.value
    assert r["shim"] == "ok"  # the shim backend projects where overlay is not wanted
    assert r["strict-links"] == Reason.FALLBACK_FORBIDDEN.value
    assert r["strict"] == ("ok" if mode == "root" else Reason.IMMUTABLE_DENIED.value)
    assert r["normal"] == "ok" and r["created"] == "True"


def _store_without_xattrs(base: str) -> dict[str, object]:
    """A store on ramfs (no user xattrs at all): overlay must not be chosen nor forced."""
    from veloverlay import _libc, mount

    ram = os.path.join(base, "ram")
    os.mkdir(ram)
    _libc.mount("ramfs", ram, "ramfs", 0, "mode=0755")
    try:
        store, _src = new_store(ram)
        out: dict[str, object] = {}
        choice = session.choose_backend(store, session.SessionOptions(refs=["t"]))
        out["auto"] = (choice.backend, choice.backend_reason)
        try:
            run_session(store, ["t"], ["true"], at=os.path.join(base, "p"), backend="overlay")
            out["overlay"] = "ok"
        except VeloError as exc:
            out["overlay"] = (exc.reason.value, exc.message)
        return out
    finally:
        mount.umount(ram)


@pytest.mark.needs("root", "userns")
def test_store_without_user_xattrs_gets_no_overlay() -> None:
    with unpriv_tmpdir() as base:
        r = run_in_userns(_store_without_xattrs, base, privileged=True)
    backend, why = r["auto"]  # type: ignore[misc]
    assert backend == "shim" and "setxattr(user.*)" in why
    reason, message = r["overlay"]  # type: ignore[misc]
    assert reason == Reason.BACKEND_UNAVAILABLE.value and "user xattrs" in message


def _net_none(base: str) -> str:
    store, _src = new_store(base)
    out = os.path.join(base, "out")
    script = (
        "import socket, sys\n"
        "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "c = socket.create_connection(s.getsockname(), timeout=2)\n"
        f"open({out!r}, 'w').write(','.join(names) + ' lo-ok')\n"
    )
    run_session(
        store, ["t"], ["/usr/bin/python3", "-c", script], at=os.path.join(base, "p"), net="none"
    )
    with open(out) as f:
        return f.read()


@pytest.mark.parametrize("mode", BOTH)
def test_net_none_has_only_loopback_up(mode: str) -> None:
    with unpriv_tmpdir() as base:
        assert as_mode(mode, _net_none, base) == "lo lo-ok"


def test_mask_kind_exists() -> None:
    assert Kind.MASK.name == "MASK"


def _id_clash_and_prune(base: str) -> dict[str, object]:
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    os.environ["VELO_RUNTIME_DIR"] = "off"  # short names exist for layers kept in the store
    store, _src = new_store(base)
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            f1 = m.lookup(txn, root, b"f1")
            f2 = m.lookup(txn, root, b"f2")
            assert f1 is not None and f2 is not None
    finally:
        m.close()
    ids = store.root / "ids-v1"
    # f1's short name taken by other bytes (a prefix collision); f2's by a stale inode of the
    # same bytes (gc removed the object, the name stayed).
    h1, h2 = f1.digest.hex(), f2.digest.hex()
    for h, data in ((h1, b"not f1\n"), (h2, b"two\n")):
        (ids / h[:2]).mkdir(parents=True, exist_ok=True)
        (ids / h[:2] / h[2:20]).write_bytes(data)
    proj = os.path.join(base, "proj")
    out = os.path.join(base, "out")
    run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f1 {proj}/f2 > {out}"], at=proj)
    m = Manifests(store)
    try:
        with m.read() as txn:
            alt = txn.get(f1.digest, db=m.ids)
    finally:
        m.close()
    stale_replaced = (
        os.lstat(ids / h2[:2] / h2[2:20]).st_ino == os.lstat(store.object_path(f2.digest)).st_ino
    )
    # Prune: the head's stack (a delta over the first root's layer) stays whole; then nothing.
    run_session(store, ["t"], ["sh", "-c", f"printf x > {proj}/new"], at=proj)
    run_session(store, ["t"], ["true"], at=proj)
    before = len(os.listdir(store.trees / "layers"))
    kept = prune.prune(store, {head_root(store, "t")})
    removed = prune.prune(store, set())
    after = len(os.listdir(store.trees / "layers"))
    run_session(store, ["t"], ["sh", "-c", f"cat {proj}/new >> {out}"], at=proj)
    with open(out) as f:
        text = f.read()
    return {
        "text": text,
        "alt": bytes(alt).decode() if alt is not None else None,
        "h1": h1,
        "stale_replaced": stale_replaced,
        "layers": (before, kept, removed, after),
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", mode_params("root"))
def test_short_id_collision_stale_name_and_prune(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _id_clash_and_prune, base)
    assert r["text"] == "one\ntwo\nx"
    assert r["alt"] == str(r["h1"])[:21]
    assert r["stale_replaced"]
    assert r["layers"] == (2, 0, 2, 0)
    # The planted name for f1's prefix holds bytes that are no object of this store (a real
    # collision would be another object): fsck reports it as stray, and nothing else.
    h1 = str(r["h1"])
    findings = r["fsck"]
    assert isinstance(findings, list) and len(findings) == 1, findings
    assert findings[0].startswith("id-stray ") and f"/ids-v1/{h1[:2]}/{h1[2:20]} " in findings[0]
