"""The `veloverlay` command line, run as a user runs it: `python -m veloverlay` in a subprocess.

Asserts exit codes, `reason:` slugs (shown with --json or --debug) and data on stdout (never the
wording of messages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import must_work
from tests.helpers.cli import data, ok, velo
from tests.helpers.trees import assert_same_tree, make_tree, snapshot, unprotect

ISSUE_VERBS = {
    "init",
    "ingest",
    "ls",
    "cat",
    "log",
    "diff",
    "checkout",
    "export",
    "import",
    "fsck",
    "gc",
    "doctor",
    "refs",
    "rollback",
    "tiers",
}


def failed(p: subprocess.CompletedProcess[bytes], reason: str, code: int = 1) -> str:
    """A failure with `reason` (the command ran with --json or --debug, which show it)."""
    err = p.stderr.decode(errors="replace")
    assert p.returncode == code, (p.returncode, err)
    assert "--json" in p.args or "--debug" in p.args, "the reason is shown with --json or --debug"
    if "--debug" in p.args:  # the traceback first, then the error
        err = err[err.index("\nerror: ") + 1 :]
    else:
        assert "Traceback" not in err
    assert err.startswith("error: "), err
    assert re.search(rf"^reason: {re.escape(reason)}$", err, re.M), err
    return err


def commands(help_text: str) -> list[str]:
    block = help_text.split("Commands:", 1)[1]
    return [
        line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()
    ]


@pytest.fixture
def src(shm_tmp: str) -> str:
    path = os.path.join(shm_tmp, "proj")
    make_tree(
        path,
        {
            "README": b"hello\n",
            "bin/tool": b"#!/bin/sh\necho hi\n",
            "lib/data.bin": os.urandom(5000),
            "empty": None,
            "link": ("link", "bin/tool"),
        },
    )
    os.chmod(os.path.join(path, "bin/tool"), 0o755)
    return path


# -- help --------------------------------------------------------------------------------------


def test_every_verb_in_help_exists_and_has_its_own_help() -> None:
    top = ok(velo(None, "--help"))
    verbs = commands(top)
    assert set(verbs) >= ISSUE_VERBS, ISSUE_VERBS - set(verbs)
    for verb in verbs:
        out = ok(velo(None, verb, "--help"))
        assert out.startswith("Usage: veloverlay " + verb), out
        if "Commands:" in out:  # a group: each of its verbs too
            for sub in commands(out):
                sub_out = ok(velo(None, verb, sub, "--help"))
                assert sub_out.startswith(f"Usage: veloverlay {verb} {sub}")
    assert "explain" in commands(ok(velo(None, "tiers", "--help")))


def test_no_arguments_prints_help() -> None:
    p = velo(None)
    assert b"Usage: veloverlay" in p.stdout + p.stderr
    assert p.returncode in (0, 2)


# -- a whole workflow --------------------------------------------------------------------------


def test_workflow(store: str, src: str, shm_tmp: str) -> None:
    assert "store ready" in ok(velo(store, "init"))
    res = data(velo(store, "ingest", src, "--name", "proj", "--json"))
    assert (res["ref"], res["files"], res["dirs"], res["symlinks"]) == ("proj", 3, 3, 1)
    assert res["skipped"] == [] and len(res["root"]) == 64

    listing = data(velo(store, "ls", "proj", "--json"))
    assert {e["path"] for e in listing} == {"README", "bin", "lib", "empty", "link"}
    kinds = {e["path"]: (e["kind"], e["mode"]) for e in listing}
    assert kinds["link"][0] == "symlink" and kinds["bin"][0] == "dir"
    deep = data(velo(store, "ls", "proj", "bin", "--json"))
    assert [(e["path"], e["mode"]) for e in deep] == [("bin/tool", "0755")]
    rec = data(velo(store, "ls", "-r", "proj", "--json"))
    assert "lib/data.bin" in {e["path"] for e in rec}
    assert "README" in ok(velo(store, "ls", "proj"))

    assert (
        velo(store, "cat", "proj", "lib/data.bin").stdout
        == open(os.path.join(src, "lib/data.bin"), "rb").read()
    )

    with open(os.path.join(src, "README"), "wb") as f:
        f.write(b"changed\n")
    res2 = data(velo(store, "ingest", src, "--name", "proj", "--json"))
    assert res2["hashed"] >= 1 and res2["root"] != res["root"]

    log = data(velo(store, "log", "proj", "--json"))
    assert [c["root"] for c in log] == [res2["root"], res["root"]]
    assert log[0]["parent"] == log[1]["id"]
    assert "proj@{1}" in ok(velo(store, "log", "proj"))

    diff = data(velo(store, "diff", "proj@{1}", "proj", "--json"))
    assert [(d["status"], d["path"]) for d in diff] == [("M", "README")]
    assert ok(velo(store, "diff", "proj@{1}", "proj")).strip() == "M README"

    out = os.path.join(shm_tmp, "out")
    assert "checked out" in ok(velo(store, "checkout", "proj", out))
    assert_same_tree(src, out)

    refs = data(velo(store, "refs", "--json"))
    assert [(r["name"], r["root"]) for r in refs] == [("proj", res2["root"])]

    bundle = os.path.join(shm_tmp, "proj.velo")
    info = data(velo(store, "export", "proj", "-o", bundle, "--json"))
    assert info["root"] == res2["root"] and os.path.exists(bundle)
    other = os.path.join(shm_tmp, "other-store")
    imp = data(velo(other, "import", bundle, "--json"))
    assert imp["root"] == res2["root"]
    piped = velo(store, "export", "proj", "-o", "-").stdout
    imp2 = data(velo(other, "import", "-", "--name", "piped", "--json", input=piped))
    assert imp2["root"] == res2["root"]

    for s in (store, other):
        rep = data(velo(s, "fsck", "--json"))
        assert rep["ok"] is True and rep["findings"] == [] and rep["objects"] >= 3
        assert ok(velo(s, "fsck")).strip().startswith("ok:")

    rb = ok(velo(store, "rollback", "proj", "1"))
    assert res["root"][:16] in rb
    assert data(velo(store, "log", "proj", "--json"))[0]["root"] == res["root"]

    gc = data(velo(store, "gc", "--dry-run", "--json"))
    assert gc["dry_run"] is True and gc["objects_deleted"] == 0  # everything is young or kept


def test_store_option_and_environment(store: str, src: str, shm_tmp: str) -> None:
    elsewhere = os.path.join(shm_tmp, "elsewhere")
    ok(velo(None, "--store", store, "ingest", src, "-n", "a"))
    ok(velo(elsewhere, "ingest", src, "-n", "b"))
    assert [r["name"] for r in data(velo(store, "refs", "--json"))] == ["a"]
    # --store wins over VELO_STORE
    assert [r["name"] for r in data(velo(store, "--store", elsewhere, "refs", "--json"))] == ["b"]
    xdg = os.path.join(shm_tmp, "xdg")
    ok(velo(None, "ingest", src, "-n", "c", env={"XDG_DATA_HOME": xdg}))
    assert os.path.isdir(os.path.join(xdg, "veloverlay", "objects-v2"))


def test_ingest_defaults_the_ref_name_to_the_directory(store: str, src: str) -> None:
    assert data(velo(store, "ingest", src + "/", "--json"))["ref"] == "proj"


# -- errors ------------------------------------------------------------------------------------


def test_errors_have_a_reason_and_exit_1(store: str, src: str, shm_tmp: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    failed(velo(store, "--json", "ls", "nosuch"), "not-found")
    failed(velo(store, "--json", "ls", "proj", "no/such/path"), "not-found")
    failed(velo(store, "--json", "cat", "proj", "bin"), "bad-path")
    failed(velo(store, "--json", "cat", "proj", "../etc/passwd"), "bad-path")
    failed(velo(store, "--json", "log", "proj@{5}"), "not-found")
    failed(velo(store, "--json", "diff", "proj", "proj@{9}"), "not-found")
    failed(
        velo(store, "--json", "ingest", os.path.join(shm_tmp, "nothing"), "-n", "x"), "not-found"
    )
    failed(velo(store, "--json", "ingest", src, "-n", "bad name"), "bad-ref")
    failed(velo(store, "--json", "ingest", store, "-n", "self"), "bad-path")
    failed(velo(store, "--json", "rollback", "proj", "3"), "not-found")
    failed(
        velo(store, "--json", "export", "nosuch", "-o", os.path.join(shm_tmp, "x.velo")),
        "not-found",
    )
    assert not os.path.exists(os.path.join(shm_tmp, "x.velo"))
    garbage = os.path.join(shm_tmp, "garbage.velo")
    with open(garbage, "wb") as f:
        f.write(b"VELOBNDL\1\0\0\0garbage")
    failed(velo(store, "--json", "import", garbage), "bundle-invalid")
    failed(velo(store, "--json", "import", os.path.join(shm_tmp, "missing.velo")), "not-found")
    tiers = os.path.join(shm_tmp, "tiers")
    with open(tiers, "w") as f:
        f.write("7 *.x\n")
    # a usage error found by the library exits 2, as the parser's do (issue 15.7)
    failed(velo(store, "--json", "ingest", src, "-n", "t", "--tiers", tiers), "usage", code=2)
    failed(velo(os.path.join(shm_tmp, "no-store"), "ls", "x", "--json"), "store-missing")
    assert not os.path.exists(os.path.join(shm_tmp, "no-store"))  # reading never creates one


def test_json_errors_are_json_too(store: str, src: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    p = velo(store, "ls", "nosuch", "--json")
    failed(p, "not-found")
    assert json.loads(p.stdout)["reason"] == "not-found"
    missing = os.path.join(src, "no-such-dir")
    p = velo(store, "ingest", missing, "--json")
    failed(p, "not-found")
    assert json.loads(p.stdout)["path"] == missing  # the file a failure concerns, for scripts


@pytest.mark.parametrize(
    "args",
    [
        ["ingest"],  # a missing argument
        ["ls", "--no-such-option", "x"],
        ["no-such-verb"],
        ["log", "r", "--limit", "many"],
        ["gc", "--keep", "x"],  # (rollback r x: x may name a version now, a tag)
        # found by the verb or the library, not the parser: exit 2 as well (issue 15.7)
        ["harvest"],  # neither --resume nor --all
        ["run", "r", "--at", "/x"],  # no `-- COMMAND`
        ["run", "r", "--backend", "fast", "--", "true"],
        ["diff", "r"],  # A without B
        ["tiers", "nope"],
        ["sessions", "extra"],
    ],
)
def test_usage_errors_exit_2(store: str, args: list[str]) -> None:
    p = velo(store, *args)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.startswith("error: "), err
    assert "reason:" not in err and "Traceback" not in err  # the slug: with --json or --debug
    failed(velo(store, "--json", *args), "usage", code=2)


def test_debug_shows_the_traceback(store: str, src: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    for args in (["--debug", "ls", "nosuch"], ["ls", "nosuch", "--debug"]):
        p = velo(store, *args)
        assert p.returncode == 1 and b"Traceback" in p.stderr and b"VeloError" in p.stderr
        assert re.search(rb"^reason: not-found$", p.stderr, re.M)


def test_checkout_into_a_non_empty_directory_is_refused(store: str, src: str, shm_tmp: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    dest = os.path.join(shm_tmp, "busy")
    make_tree(dest, {"mine.txt": b"do not touch", "sub/x": b"x"})
    before = snapshot(dest)
    failed(velo(store, "--json", "checkout", "proj", dest), "exists")
    assert snapshot(dest) == before
    afile = os.path.join(shm_tmp, "afile")
    with open(afile, "wb") as f:
        f.write(b"x")
    failed(velo(store, "--json", "checkout", "proj", afile), "exists")
    failed(
        velo(store, "--json", "checkout", "proj", os.path.join(shm_tmp, "no", "parent")),
        "not-found",
    )
    empty = os.path.join(shm_tmp, "empty-dir")
    os.mkdir(empty)
    ok(velo(store, "checkout", "proj", empty))  # an empty directory is fine
    assert_same_tree(src, empty)


def _writable_object(store: str, ref: str, path: str) -> tuple[str, str]:
    """(digest, object file) of `path` in `ref`, made writable (+i, which root's objects carry,
    cleared; 0644) for a test to damage."""
    digest = data(velo(store, "ls", ref, path, "--json"))[0]["digest"]
    obj = os.path.join(store, "objects-v2", digest[:2], digest)
    unprotect(obj)
    os.chmod(obj, 0o644)
    return digest, obj


def test_fsck_repair_gives_a_writable_object_its_mode_back(store: str, src: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    _digest, path = _writable_object(store, "proj", "README")  # no write: the bytes still match
    p = velo(store, "fsck", "--debug")
    failed(p, "object-corrupt")
    assert "object-writable" in p.stdout.decode()
    out = ok(velo(store, "fsck", "--repair"))
    assert out.splitlines()[-1].startswith("ok: ")
    assert os.stat(path).st_mode & 0o777 == 0o444
    report = data(velo(store, "fsck", "--quick", "--json"))
    assert report["ok"] is True
    # every object is sealed where the store has fs-verity, none is where it has not
    assert report["fsverity"]["unsealed"] == 0


def test_fsck_json_and_exit_status_on_corruption(store: str, src: str) -> None:
    res = data(velo(store, "ingest", src, "-n", "proj", "--json"))
    assert data(velo(store, "fsck", "--json"))["ok"] is True
    digest, path = _writable_object(store, "proj", "README")
    with open(path, "ab") as f:
        f.write(b"tampered")
    os.chmod(path, 0o444)
    p = velo(store, "fsck", "--debug")
    failed(p, "object-corrupt")
    assert digest in p.stdout.decode()
    p = velo(store, "fsck", "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)  # one document: the report carries the failure
    assert report["ok"] is False and digest in report["findings"][0]["what"]
    assert res["root"]


def test_fsck_repair_sets_a_corrupt_object_aside_and_ingest_restores_it(
    store: str, src: str, shm_tmp: str
) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    _digest, path = _writable_object(store, "proj", "README")
    with open(path, "r+b") as f:
        f.write(b"J")
    p = velo(store, "fsck")
    assert p.returncode == 1 and "hint: 'veloverlay fsck --repair' sets" in p.stderr.decode()
    p = velo(store, "fsck", "--repair", "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)  # one document: the report carries the failure
    assert report["quarantine"] == {"set_aside": 1, "wanted": 1}
    p = velo(store, "fsck")
    assert "object-missing" in p.stdout.decode() and "ingest the source" in p.stderr.decode()
    ok(velo(store, "ingest", src, "-n", "proj"))
    assert data(velo(store, "fsck", "--json"))["quarantine"] == {"set_aside": 0, "wanted": 0}
    out = os.path.join(shm_tmp, "out")
    ok(velo(store, "checkout", "proj", out))
    assert_same_tree(src, out)


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_names_a_backend(store: str) -> None:
    out = ok(velo(store, "doctor"))
    assert re.search(r"^backend: (overlay|shim) \(", out, re.M), out
    assert re.search(r"^lower form: ", out, re.M)
    report = data(velo(store, "doctor", "--json"))
    assert report["chosen"]["backend"] in ("overlay", "shim")
    assert report["chosen"]["backend_reason"]
    # the overlay mode and why: root-native exactly where the probe mounted it as real root
    chosen, feats = report["chosen"], report["features"]
    native = feats["root"]["ok"] and feats["overlay_native"]["ok"]
    if chosen["backend"] == "overlay":
        assert chosen["mode"] == ("native" if native else "userns"), chosen
        assert chosen["mode_reason"] and chosen["mounts"]
        assert re.search(rf"^overlay mode: {chosen['mode']} \(", out, re.M), out
    assert report["store"]["ok"] is True
    # the suite's per-boot cache (tests/conftest.py sets VELO_RUNTIME_DIR) is named, with a reason
    cache = report["layer_cache"]
    assert cache["path"] == os.path.join(
        os.environ["VELO_RUNTIME_DIR"], f"veloverlay-{os.geteuid()}"
    )
    assert cache["reason"] and re.search(r"^data-only layers: ", out, re.M)
    # fs-verity: the store's own probe answers; without it the protection is what it was
    verity = report["store"]["fsverity"]
    assert isinstance(verity["ok"], bool) and verity["reason"]
    assert re.search(r"^fs-verity on objects: (yes|no) \(", out, re.M), out
    if verity["ok"]:
        assert report["chosen"]["protection"].startswith("prevented (fs-verity on every object")
    else:
        assert report["chosen"]["protection"] in (
            "prevented (store read-only in sessions, chattr +i on objects)",
            "prevented in sessions (read-only store); detected outside (fsck)",
        )
    off = data(velo(store, "doctor", "--json", env={"VELO_RUNTIME_DIR": "off"}))
    assert off["layer_cache"] == {"path": None, "ok": False, "reason": "VELO_RUNTIME_DIR=off"}


# -- what a CLI user expects (issue 16) ---------------------------------------------------------


def test_version() -> None:
    import veloverlay

    assert ok(velo(None, "--version")) == f"veloverlay {veloverlay.__version__}\n"


def test_version_with_json_is_one_json_document() -> None:
    """--json before or after --version: one JSON document (it was the plain text line)."""
    import veloverlay

    for args in (("--version", "--json"), ("--json", "--version")):
        assert data(velo(None, *args)) == {"version": veloverlay.__version__}


def test_a_misspelt_verb_gets_a_suggestion() -> None:
    p = velo(None, "ingset", "x")
    assert p.returncode == 2
    first = p.stderr.decode().splitlines()[0]
    assert "'ingest'" in first and "'doctor'" not in first  # the close match, not every verb


def test_global_options_are_taken_after_the_verb_too(store: str, src: str, shm_tmp: str) -> None:
    other = os.path.join(shm_tmp, "other")
    ok(velo(None, "ingest", src, "-n", "a", "--store", store))
    ok(velo(None, "ingest", "--store", other, src, "-n", "b"))
    assert [r["name"] for r in data(velo(None, "refs", "--store", store, "--json"))] == ["a"]
    assert [r["name"] for r in data(velo(None, "--json", "--store", other, "refs"))] == ["b"]
    # after the verb wins over before it, and over VELO_STORE
    assert [
        r["name"] for r in data(velo(store, "--store", store, "refs", "--store", other, "--json"))
    ] == ["b"]
    p = velo(store, "ls", "nosuch", "--debug")
    assert b"Traceback" in p.stderr and re.search(rb"^reason: not-found$", p.stderr, re.M)


def test_error_and_hint_lines(store: str, src: str) -> None:
    ok(velo(store, "ingest", src, "-n", "proj"))
    err = velo(store, "ls", "nosuch").stderr.decode()
    lines = err.splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert len(lines) == 2, err  # no blank line, no reason: for humans
    p = velo(store, "ls", "nosuch", "--json")
    assert p.stderr.decode().splitlines()[2] == "reason: not-found"
    assert json.loads(p.stdout) | {} == {
        "error": lines[0].removeprefix("error: "),
        "hint": lines[1].removeprefix("hint: "),
        "reason": "not-found",
        "detail": None,
        "path": None,
    }


def _click_tree() -> list[tuple[str, Any]]:
    import typer

    from veloverlay import cli

    out = []
    for name, command in typer.main.get_group(cli.app).commands.items():
        subs = getattr(command, "commands", None) or {}
        out += [(f"{name} {s}", c) for s, c in subs.items()] or [(name, command)]
    return out


def test_every_option_and_argument_has_help() -> None:
    missing = [
        (verb, p.name)
        for verb, cmd in _click_tree()
        for p in cmd.params
        if not getattr(p, "help", None)
    ]
    assert missing == []


def test_the_man_page_documents_every_verb_and_option(shm_tmp: str) -> None:
    page = ok(velo(None, "--help-man"))
    assert page.startswith(".TH VELOVERLAY 1 ")
    for verb, cmd in _click_tree():
        shown = verb.replace("-", "\\-")  # groff's hyphen, as for the options below
        assert f"\\fBveloverlay {shown}\\fR" in page, verb
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--"):
                    assert opt.replace("-", "\\-") in page, (verb, opt)
    # groff reads it without a warning (groff-base: the README's set-up installs it)
    if shutil.which("groff") is None:
        why = "groff is not installed here (apt-get install groff-base)"
        if "tools" in must_work() or "all" in must_work():
            pytest.fail(f"VELO_TEST_MUST_WORK names 'tools' but {why}")
        pytest.skip(why)
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"], input=page.encode(), capture_output=True
    )
    assert r.returncode == 0 and r.stderr == b"", r.stderr


def test_bash_completes_a_verb_and_a_ref_name(store: str, src: str, shm_tmp: str) -> None:
    ok(velo(store, "ingest", src, "-n", "project1"))
    ok(velo(store, "ingest", src, "-n", "other"))
    bindir = os.path.join(shm_tmp, "bin")  # the console script, as an installed package has it
    os.mkdir(bindir)
    with open(os.path.join(bindir, "veloverlay"), "w") as f:
        f.write(f"#!{sys.executable}\nfrom veloverlay.cli import entry\nentry()\n")
    os.chmod(os.path.join(bindir, "veloverlay"), 0o755)
    # typer finds the shell to complete for among the caller's ancestors: a user's bash, here
    # too (the suite itself may run under make's sh, which typer does not complete for).
    gen = subprocess.run(
        ["bash", "-c", '"$@"; exit $?', "bash", sys.executable, "-m", "veloverlay"]
        + ["--show-completion", "bash"],
        env={**{k: v for k, v in os.environ.items() if k != "VELO_STORE"}, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stderr
    script = gen.stdout

    def complete(*words: str) -> list[str]:
        code = (
            script
            + f"\nCOMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
            + '_veloverlay_completion veloverlay; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        env = {**os.environ, "PATH": bindir + ":" + os.environ["PATH"], "VELO_STORE": store}
        r = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("veloverlay", "ing") == ["ingest"]
    assert complete("veloverlay", "ls", "pro") == ["project1"]
    assert sorted(complete("veloverlay", "run", "--at", "/x", "")) == ["other", "project1"]
    assert complete("veloverlay", "tiers", "ex") == ["explain"]


def _in_a_terminal(args: list[str], env: dict[str, str], script: str | None = None) -> bytes:
    """Run the CLI (`python -m veloverlay`, or the console `script`) with a pseudo-terminal as
    its stdout and stderr; return what it wrote."""
    import pty

    argv = [script, *args] if script else [sys.executable, "-m", "veloverlay", *args]
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, env)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    return out


@pytest.mark.parametrize(
    ("extra", "colour"),
    [
        ({"TERM": "xterm"}, True),
        ({"TERM": "xterm", "NO_COLOR": "1"}, False),
        ({"TERM": "dumb"}, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(
    store: str, extra: dict[str, str], colour: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env.update(VELO_STORE=store, **extra)
    out = _in_a_terminal(["ls", "nosuch"], env)
    assert b"error:" in out
    assert (b"\x1b[" in out) is colour, out
    # never when the output is not a terminal, whatever TERM says
    p = velo(store, "ls", "nosuch", env={"TERM": "xterm"})
    env2 = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    p = subprocess.run(
        [sys.executable, "-m", "veloverlay", "ls", "nosuch"],
        env={**env2, "TERM": "xterm", "VELO_STORE": store},
        capture_output=True,
    )
    assert p.returncode == 1 and b"\x1b[" not in p.stderr


def test_a_closed_pipe_ends_quietly(store: str, shm_tmp: str) -> None:
    """`veloverlay ls -r REF | head`: exit 141 as git does, nothing on stderr (issue 15.7)."""
    big = os.path.join(shm_tmp, "big")
    make_tree(big, {f"d{i // 100}/file-with-a-long-name-{i:05d}.txt": b"x" for i in range(3000)})
    ok(velo(store, "ingest", big, "-n", "big"))
    with open(os.path.join(big, "d0", "large"), "wb") as f:
        f.write(os.urandom(4 << 20))
    ok(velo(store, "ingest", big, "-n", "big"))
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    for args in (["ls", "-r", "big"], ["cat", "big", "d0/large"], ["log", "big"]):
        p = subprocess.Popen(
            [sys.executable, "-m", "veloverlay", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert p.stdout is not None and p.stderr is not None
        p.stdout.read(10)
        p.stdout.close()
        err = p.stderr.read()
        rc = p.wait()
        if args[0] == "log":  # small enough to be written before the pipe closed
            assert rc in (0, 141) and err == b"", err
        else:
            assert (rc, err) == (141, b""), (args, rc, err)


def test_output_into_a_file_is_whole_and_the_status_kept(store: str, shm_tmp: str) -> None:
    """The command ends without the interpreter's finalization (`cli.entry`): whatever stdout
    and stderr still buffer must be written first. Into a regular file stdout is fully
    buffered, so `ls -r` of a large ref and `cat` of a 1 MiB file leave most of their output
    in the buffer until the end; both entry points (`python -m veloverlay`, the installed
    console script) must write all of it, and pass a failure's status and message on."""
    big = os.path.join(shm_tmp, "big")
    files = {f"d{i // 100}/name-{i:05d}.txt": b"x" for i in range(3000)}
    files["d0/large"] = os.urandom(1 << 20)
    make_tree(big, files)
    ok(velo(store, "ingest", big, "-n", "big"))
    want = sorted({*files, *(f"d{i}" for i in range(30))})
    script = os.path.join(os.path.dirname(sys.executable), "veloverlay")
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    for runner in ([sys.executable, "-m", "veloverlay"], [script]):
        out = os.path.join(shm_tmp, "out")
        with open(out, "wb") as f:
            p = subprocess.run([*runner, "ls", "-r", "big"], env=env, stdout=f)
        assert p.returncode == 0, runner
        with open(out, "rb") as f:
            got = sorted(line.split()[-1].decode().rstrip("/") for line in f.read().splitlines())
        assert got == want, runner
        with open(out, "wb") as f:
            p = subprocess.run([*runner, "cat", "big", "d0/large"], env=env, stdout=f)
        assert p.returncode == 0, runner
        with open(out, "rb") as f:
            assert f.read() == files["d0/large"], runner
        with open(out, "wb") as f:
            p = subprocess.run([*runner, "--json", "ls", "nosuch"], env=env, stdout=f)
        assert p.returncode == 1, runner
        with open(out, "rb") as f:
            assert json.loads(f.read())["reason"] == "not-found", runner


# -- diff (issue 15.6) -------------------------------------------------------------------------


def _expected_changes(old: str, new: str) -> dict[str, str]:
    """git's status letters for two real trees: files, symlinks and empty directories."""

    def entries(root: str) -> dict[str, tuple[str, int, bytes]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and not dirnames and not filenames:
                out[rel] = ("dir", 0, b"")
            for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = os.path.join(dirpath, n)
                key = os.path.normpath(os.path.join(rel, n))
                st = os.lstat(p)
                if os.path.islink(p):
                    out[key] = ("link", 0, os.readlink(p).encode())
                else:
                    out[key] = ("file", st.st_mode & 0o7777, open(p, "rb").read())
        return out

    a, b = entries(old), entries(new)
    want = {}
    for p in a.keys() | b.keys():
        if p not in b:
            want[p] = "D"
        elif p not in a:
            want[p] = "A"
        elif a[p][0] != b[p][0]:
            want[p] = "T"
        elif a[p] != b[p]:
            want[p] = "M"
    return want


def test_diff_statuses_stat_and_patch(store: str, src: str, shm_tmp: str) -> None:
    import shutil

    with open(os.path.join(src, "notes.txt"), "w") as f:
        f.write("one\ntwo\nthree\n")
    os.makedirs(os.path.join(src, "gone", "deep"))
    with open(os.path.join(src, "gone", "deep", "x"), "w") as f:
        f.write("x\n")
    ok(velo(store, "ingest", src, "-n", "proj"))
    before = os.path.join(shm_tmp, "before")
    shutil.copytree(src, before, symlinks=True)
    # the same operations a user makes: edit, delete a subtree, add, chmod, file <-> symlink,
    # and a directory whose only change is its mtime (not a change)
    with open(os.path.join(src, "notes.txt"), "w") as f:
        f.write("one\nTWO\nthree\nfour\n")
    shutil.rmtree(os.path.join(src, "gone"))
    os.makedirs(os.path.join(src, "new", "empty"))
    with open(os.path.join(src, "new", "file"), "w") as f:
        f.write("fresh\n")
    os.chmod(os.path.join(src, "bin/tool"), 0o700)
    os.unlink(os.path.join(src, "link"))
    with open(os.path.join(src, "link"), "w") as f:
        f.write("now a file\n")
    with open(os.path.join(src, "lib/data.bin"), "ab") as f:
        f.write(b"\0more")
    os.utime(os.path.join(src, "lib"), ns=(1, 1))
    os.utime(src, ns=(1, 1))
    ok(velo(store, "ingest", src, "-n", "proj"))
    want = _expected_changes(before, src)
    got = dict(
        line.split("\t", 1)[::-1]
        for line in ok(velo(store, "diff", "proj@{1}", "proj", "--name-status")).splitlines()
    )
    assert got == want
    assert {
        d["path"]: d["status"] for d in data(velo(store, "diff", "proj@{1}", "proj", "--json"))
    } == want
    plain = ok(velo(store, "diff", "proj@{1}", "proj")).splitlines()
    assert sorted(plain) == sorted(f"{s} {p}" for p, s in want.items())

    # -p: each text file's hunks are those of `diff -u` on the real files
    patch = ok(velo(store, "diff", "proj@{1}", "proj", "-p"))
    real = subprocess.run(
        ["diff", "-u", os.path.join(before, "notes.txt"), os.path.join(src, "notes.txt")],
        capture_output=True,
        text=True,
    ).stdout
    hunks = real.split("\n", 2)[2]  # without the two header lines
    assert "--- a/notes.txt\n+++ b/notes.txt\n" + hunks in patch
    assert "Binary files a/lib/data.bin and b/lib/data.bin differ" in patch
    assert "old mode 755\nnew mode 700\n" in patch

    # --stat: lines added and removed per text file, as diff counts them
    stat = ok(velo(store, "diff", "proj@{1}", "proj", "--stat")).splitlines()
    plus = sum(1 for x in hunks.splitlines() if x.startswith("+"))
    minus = sum(1 for x in hunks.splitlines() if x.startswith("-"))
    row = next(x for x in stat if x.split("|")[0].strip() == "notes.txt")
    assert row.split("|")[1].split()[0] == str(plus + minus)
    assert stat[-1].startswith(f" {len(want)} files changed")
    # --stat --json: the same counts per change (null for a binary file), each change's keys
    counted = {
        d["path"]: (d["added"], d["removed"])
        for d in data(velo(store, "diff", "proj@{1}", "proj", "--stat", "--json"))
    }
    assert set(counted) == set(want)
    assert counted["notes.txt"] == (plus, minus) and counted["lib/data.bin"] == (None, None)


def _headers(patch: str) -> dict[str, list[str]]:
    """Per path of a `diff -p`, its extended header lines (between `diff --velo` and `---`)."""
    out: dict[str, list[str]] = {}
    cur: list[str] = []
    for line in patch.splitlines():
        if line.startswith("diff --velo a/"):
            cur = out.setdefault(line.split(" b/", 1)[1], [])
        elif line.startswith(("new ", "deleted ", "old mode ")):
            cur.append(line)
    return out


def _kind_and_mode(path: str) -> str:
    st = os.lstat(path)
    kind = (
        "directory" if stat.S_ISDIR(st.st_mode) else "symlink" if os.path.islink(path) else "file"
    )
    return f"{kind} mode {stat.S_IMODE(st.st_mode):o}"


def test_diff_patch_headers_name_what_was_added_deleted_or_replaced(
    store: str, src: str, shm_tmp: str
) -> None:
    """`diff -p` said `new file mode 755` for a new empty directory (git shows none: it keeps
    no directories), `new file mode 777` for a new symlink (git: `new file mode 120000`), and
    `old mode 644` / `new mode 777` for a file replaced by a symlink, which reads as a chmod
    of a file whose content changed. Each header now names the kind, from the real trees."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    before = os.path.join(shm_tmp, "before")
    shutil.copytree(src, before, symlinks=True)
    os.makedirs(os.path.join(src, "new", "empty"), mode=0o750)
    os.symlink("README", os.path.join(src, "new", "ln"))
    os.unlink(os.path.join(src, "link"))
    with open(os.path.join(src, "link"), "w") as f:  # a symlink becomes a file: T
        f.write("now a file\n")
    os.rmdir(os.path.join(src, "empty"))
    ok(velo(store, "ingest", src, "-n", "proj"))
    got = _headers(ok(velo(store, "diff", "proj@{1}", "proj", "-p")))
    assert got == {
        "new/empty": ["new " + _kind_and_mode(os.path.join(src, "new", "empty"))],
        "new/ln": ["new " + _kind_and_mode(os.path.join(src, "new", "ln"))],
        "link": [
            "deleted " + _kind_and_mode(os.path.join(before, "link")),
            "new " + _kind_and_mode(os.path.join(src, "link")),
        ],
        "empty": ["deleted " + _kind_and_mode(os.path.join(before, "empty"))],
    }, got
    assert got["new/empty"] == ["new directory mode 750"]  # old: "new file mode 750"


def _bar_line(err: str, label: str) -> str:
    """The last drawing of the bar `label` in stderr (escape sequences and redraws removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", err)  # colours
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "\n", text.replace("\r", "\n"))  # cursor moves
    lines = [x.strip() for x in text.splitlines() if x.strip().startswith(label)]
    assert lines, (label, err)
    return lines[-1]


def test_long_operations_show_bytes_rate_and_eta(store: str, shm_tmp: str) -> None:
    """The progress of ingest, checkout, fsck and gc: bytes, a byte rate, the items and an ETA
    (drawn at once and off a terminal for the test: VELO_INTERNAL__TEST_PROGRESS=1)."""
    big = os.path.join(shm_tmp, "big")
    make_tree(big, {f"d{i % 3}/f{i:03d}": os.urandom(20_000) for i in range(300)})
    size = 300 * 20_000
    env = {"VELO_INTERNAL__TEST_PROGRESS": "1"}
    line = _bar_line(velo(store, "ingest", big, "-n", "big", env=env).stderr.decode(), "hashing")
    assert "MiB" in line and "/s" in line and "300 files" in line and "ETA" in line, line
    # checkout knows its totals before it starts: 303 entries (3 dirs) and every byte
    out = os.path.join(shm_tmp, "out")
    err = velo(store, "checkout", "big", out, env=env).stderr.decode()
    line = _bar_line(err, "checking out")
    want = f"{size / 2**20:.1f} MiB / {size / 2**20:.1f} MiB"
    assert want in line and "MiB/s" in line and "303/303 entries" in line, line
    assert re.search(r"ETA\s+\d+:\d\d:\d\d", line), line
    assert_same_tree(big, out)
    line = _bar_line(velo(store, "fsck", env=env).stderr.decode(), "checking objects")
    assert f"{size / 2**20:.1f} MiB" in line and "MiB/s" in line, line
    assert "300/300 objects" in line and "ETA" in line, line
    ok(velo(store, "refs", "--delete", "big"))
    line = _bar_line(velo(store, "gc", "--grace", "0", env=env).stderr.decode(), "deleting")
    assert "MiB" in line and "300/300 objects" in line and "ETA" in line, line
    # never without a terminal otherwise, and never with --json
    assert b"hashing" not in velo(store, "ingest", big, "-n", "again").stderr
    p = velo(store, "fsck", "--json", env=env)
    assert p.stderr == b"" and json.loads(p.stdout)["objects"] == 300


def test_progress_is_drawn_on_a_terminal_only(store: str, shm_tmp: str) -> None:
    """The installed console script on a pseudo-terminal draws the bar (at once:
    VELO_INTERNAL__TEST_PROGRESS=tty keeps the terminal rule); the same with stderr a pipe, or
    with --json on the terminal, draws nothing."""
    big = os.path.join(shm_tmp, "big")
    make_tree(big, {f"f{i:03d}": os.urandom(20_000) for i in range(100)})
    ok(velo(store, "ingest", big, "-n", "big"))
    script = os.path.join(os.path.dirname(sys.executable), "veloverlay")
    assert os.access(script, os.X_OK), script
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env.update(VELO_STORE=store, TERM="xterm", COLUMNS="200", VELO_INTERNAL__TEST_PROGRESS="tty")
    out = os.path.join(shm_tmp, "out")
    line = _bar_line(_in_a_terminal(["checkout", "big", out], env, script).decode(), "checking")
    assert "1.9 MiB / 1.9 MiB" in line and "MiB/s" in line and "100/100 entries" in line, line
    assert re.search(r"ETA\s+\d+:\d\d:\d\d", line), line
    p = subprocess.run([script, "fsck"], env=env, capture_output=True)
    assert p.returncode == 0 and b"checking" not in p.stderr, p.stderr
    text = _in_a_terminal(["fsck", "--json"], env, script).decode()
    assert "checking" not in text and '"objects": 100' in text, text


def test_help_on_a_terminal_is_typers_rich_page_and_keeps_every_word(store: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env.update(VELO_STORE=store, TERM="xterm", COLUMNS="200")
    out = re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", _in_a_terminal(["ingest", "--help"], env))
    assert "╭─ Options".encode() in out  # rich panels on a terminal
    # help texts are plain text, not rich markup: nothing in brackets or parentheses is eaten
    assert b"(default: the directory's name)" in out
    assert b"(default: CPUs; at most 4 per CPU)" in out


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["ls", "--help"], ["--help-man"]], ids=" ".join
)
def test_help_and_version_into_a_closed_pipe_exit_141(store: str, args: list[str]) -> None:
    """typer handles an EPIPE met while it writes help or the version itself, with exit status
    1 (as if the command had failed); every other verb says 141 (`veloverlay ls | head`). The
    pipe's reader is closed before the command starts, so the write fails for certain."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "veloverlay", *args],
            env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
            stdout=w,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, b""), (args, p.returncode, p.stderr)
