"""The command line's contract with users and scripts, attacked: arguments out of range, hostile
names in the output, a closed stdout, bad environment variables. Each case is run the way a user
runs it (`python -m veloverlay` in a subprocess) and checked against the real tree or the store's
state, not against the product's own account of it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import veloverlay
from tests.e2e.test_cli import data, failed, ok, velo
from tests.helpers.trees import make_tree, snapshot

# This checkout's package, for a command whose cwd is not the checkout.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(veloverlay.__file__)))


@pytest.fixture
def src(shm_tmp: str) -> str:
    path = os.path.join(shm_tmp, "proj")
    make_tree(path, {"README": b"hello\n", "lib/a.txt": b"a\n"})
    return path


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_gc_keep_below_one_is_a_usage_error_and_deletes_nothing(
    store: str, src: str, keep: str
) -> None:
    """`gc --keep 0` (or negative) used to delete the head commit of every ref: every ref then
    named a missing commit and fsck failed."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    with open(os.path.join(src, "README"), "wb") as f:
        f.write(b"changed\n")
    ok(velo(store, "ingest", src, "-n", "proj"))
    before = data(velo(store, "log", "proj", "--json"))
    failed(velo(store, "--json", "gc", "--keep", keep, "--grace", "0"), "usage", code=2)
    assert data(velo(store, "log", "proj", "--json")) == before
    assert data(velo(store, "fsck", "--json"))["ok"]
    # --keep 1 still keeps the head (and only it)
    ok(velo(store, "gc", "--keep", "1", "--grace", "0"))
    assert [c["id"] for c in data(velo(store, "log", "proj", "--json"))] == [before[0]["id"]]
    assert data(velo(store, "fsck", "--json"))["ok"]


# -- names from a tree never reach the terminal raw -------------------------------------------

HOSTILE = {
    b"title\x1b]0;owned\x07.txt": b"osc\n",  # would retitle the terminal window
    b"clear\x1b[2J": b"csi\n",
    b"c1\xc2\x9b31m": b"c1\n",  # U+009B, the one-character CSI
    b"line\nfile 0644 1 T2 passwd": b"nl\n",  # a forged line in `ls`
    b"latin1-\xe9t\xe9": b"not utf-8\n",  # a name that is not UTF-8
}


def _clean(out: bytes) -> None:
    """Only printable UTF-8 text, newlines and tabs: no control character, no raw byte."""
    text = out.decode("utf-8")  # strict: an undecodable name was escaped, not written raw
    bad = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, (bad, text[:2000])


@pytest.fixture
def hostile(shm_tmp: str) -> str:
    path = os.fsencode(os.path.join(shm_tmp, "hostile"))
    os.mkdir(path)
    for name, content in HOSTILE.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    os.symlink(b"target\x1b[5m", os.path.join(path, b"link"))
    return os.fsdecode(path)


@pytest.mark.parametrize("io_encoding", [None, "utf-8"])  # utf-8: strict, as in en_US.UTF-8
def test_hostile_names_and_messages_are_escaped_in_every_listing(
    store: str, src: str, hostile: str, io_encoding: str | None
) -> None:
    env = {"PYTHONIOENCODING": io_encoding} if io_encoding else {}
    ok(velo(store, "ingest", src, "-n", "proj"))
    ok(velo(store, "ingest", hostile, "-n", "h", "-m", "evil \x1b[31mred\x1b]0;t\x07\nnext"))
    entries = len(HOSTILE) + 1
    for args, lines in (
        (["ls", "h"], entries),
        (["ls", "-r", "h"], entries),
        (["log", "h"], 1),
        (["diff", "proj", "h"], entries + 2),
        (["diff", "--name-status", "proj", "h"], entries + 2),
        (["diff", "--stat", "proj", "h"], entries + 3),
        (["diff", "-p", "proj", "h"], None),
        (["refs"], 3),
        (["status"], None),
    ):
        p = velo(store, *args, env=env)
        assert p.returncode == 0, (args, p.stderr.decode(errors="replace"))
        if "-p" in args:  # file content is the user's (as git's); the headers are names
            heads = b"\n".join(
                x for x in p.stdout.split(b"\n") if x[:4] in (b"diff", b"--- ", b"+++ ")
            )
            _clean(heads)
        else:
            _clean(p.stdout)
        _clean(p.stderr)
        if lines is not None:
            assert p.stdout.count(b"\n") == lines, (args, p.stdout.decode(errors="replace"))
    # JSON keeps the names exact
    names = {e["path"] for e in data(velo(store, "ls", "h", "--json"))}
    assert names == {os.fsdecode(n) for n in HOSTILE} | {"link"}


def test_verbs_write_data_lines_through_render_only() -> None:
    """A bare print() skips the escaping of `render.line`; every verb module goes through it."""
    import ast

    import veloverlay.cli

    cli_dir = os.path.dirname(veloverlay.cli.__file__)
    calls = []
    for fn in sorted(os.listdir(cli_dir)):
        if fn.endswith(".py"):
            with open(os.path.join(cli_dir, fn)) as f:
                tree = ast.parse(f.read())
            calls += [
                f"{fn}:{n.lineno}"
                for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
            ]
    assert calls == []


# the last identifier of a value that holds a path (or a store, a target...): shown raw by
# `render.line` (tabs and backslashes are kept there), it would not read back as its bytes
_PATHLIKE = re.compile(r"(path|dest|output|root|target|where|dir|directory|file|src|source)$", re.I)


def _unescaped_paths(source: str, filename: str) -> list[str]:
    """The path-like values (by the name that holds them) that reach `render.line(...)` inside
    an f-string without `render.name(...)`: directly, or through a local variable assigned
    from it (`where = render.name(p) if p else "-"`)."""
    import ast

    def escapes(e: ast.expr) -> bool:
        if isinstance(e, ast.Call):
            f = e.func
            return (isinstance(f, ast.Attribute) and f.attr in ("name", "human_bytes")) or (
                isinstance(f, ast.Name) and f.id == "name"
            )
        if isinstance(e, ast.IfExp):
            return all(escapes(b) or isinstance(b, ast.Constant) for b in (e.body, e.orelse))
        return False

    def ident(e: ast.expr) -> str | None:
        if isinstance(e, ast.Name):
            return e.id
        if isinstance(e, ast.Attribute):
            return e.attr
        if isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Constant):
            return str(e.slice.value)
        if isinstance(e, ast.Call) and e.args:  # str(p), os.fspath(p), os.path.abspath(p)
            return ident(e.args[0])
        return None

    out = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        safe = {
            t.id
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign) and escapes(n.value)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for n in ast.walk(fn):
            f = n.func if isinstance(n, ast.Call) else None
            if not (isinstance(f, ast.Attribute) and f.attr == "line"):
                continue
            if not (isinstance(f.value, ast.Name) and f.value.id == "render"):
                continue
            for v in (x for a in n.args for x in ast.walk(a)):
                if not isinstance(v, ast.FormattedValue) or escapes(v.value):
                    continue
                if isinstance(v.value, ast.Name) and v.value.id in safe:
                    continue
                name = ident(v.value)
                if name is not None and _PATHLIKE.search(name):
                    out.append(f"{filename}:{v.lineno}: {ast.unparse(v.value)}")
    return out


def test_no_path_reaches_a_data_line_unescaped() -> None:
    """`render.line` shows control characters as \\xNN but keeps tabs and does not double
    backslashes (names in the line went through `render.name`, which does): a path passed to
    it as it is read back wrong (`export -o 'a\\x0ab'` said `to a\\x0ab`, which stands for a
    newline). Found by this check: `init`, `export` and `remove-store` named their paths raw."""
    import veloverlay.cli

    cli_dir = os.path.dirname(veloverlay.cli.__file__)
    found = []
    for fn in sorted(os.listdir(cli_dir)):
        if fn.endswith(".py"):
            with open(os.path.join(cli_dir, fn)) as f:
                found += _unescaped_paths(f.read(), fn)
    assert found == []


def test_the_unescaped_path_check_finds_one() -> None:
    planted = (
        "def f(dest, where, n):\n"
        "    shown = render.name(dest)\n"
        "    render.line(f'{n} files to {shown}, {render.name(where)}')\n"
        "    render.line(f'into {dest}')\n"
        "    render.line(f'at {os.path.abspath(where)}')\n"
    )
    assert _unescaped_paths(planted, "x.py") == [
        "x.py:4: dest",
        "x.py:5: os.path.abspath(where)",
    ]


# -- a closed stdout ---------------------------------------------------------------------------


def _closed(store: str, fds: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`veloverlay ARGS` with the descriptors `fds` closed, as `veloverlay ls >&-` does."""
    shut = " ".join(f"{fd}>&-" for fd in fds)
    env = {**os.environ, "NO_COLOR": "1", "VELO_STORE": store}
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {shut}', "sh", sys.executable, "-m", "veloverlay", *args],
        env=env,
        capture_output=True,
        timeout=120,
    )


def test_a_closed_stdout_is_dev_null_not_a_traceback(store: str, src: str) -> None:
    """With fd 1 closed, Python's sys.stdout is None: every verb that wrote anything died with
    an AttributeError traceback (exit 1), after its work was done. Now fd 1 is /dev/null, as
    git does, and a failure still says why on stderr."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    for args in (["refs"], ["ls", "proj", "--json"], ["cat", "proj", "README"], ["log", "proj"]):
        p = _closed(store, "1", *args)
        assert (p.returncode, p.stderr) == (0, b""), (args, p.stderr.decode(errors="replace"))
    p = _closed(store, "1", "--json", "ls", "nosuch")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "reason: not-found" in err
    # stdin and stderr closed as well: the failure's exit status still tells
    assert _closed(store, "012", "ls", "nosuch").returncode == 1
    assert _closed(store, "012", "ls", "proj").returncode == 0


# -- numbers from the command line and the environment ---------------------------------------


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"VELO_JOBS": "abc"}, ["fsck"]),
        ({"VELO_JOBS": "-2"}, ["ingest", "{src}", "-n", "again"]),
        ({"VELO_MAP_SIZE": "lots"}, ["refs"]),
        ({"VELO_MAP_SIZE": "1"}, ["refs"]),  # too small for any database
        ({"VELO_MAP_SIZE": "9" * 30}, ["refs"]),  # more than a size_t: OverflowError
        ({}, ["ingest", "{src}", "-n", "again", "-j", "-3"]),
        ({}, ["fsck", "-j", "0"]),
        ({}, ["log", "proj", "-n", "-1"]),
        ({}, ["gc", "--grace", "nan"]),  # every young object taken for old
        ({}, ["gc", "--grace", "-5"]),
        ({}, ["refs", "--delete", "proj", "--grace", "inf"]),
        ({}, ["run", "proj", "--grace", "nan", "--", "true"]),  # leftovers killed at once
    ],
)
def test_bad_numbers_are_usage_errors_that_name_them(
    store: str, src: str, env: dict[str, str], args: list[str]
) -> None:
    """VELO_JOBS=abc or VELO_MAP_SIZE=abc ended every verb in a ValueError traceback (a
    VELO_MAP_SIZE of 30 digits, in an OverflowError one); -j -3 and -n -1 were taken silently."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    refs = data(velo(store, "refs", "--json"))
    p = velo(store, "--json", *[a.format(src=src) for a in args], env=env)
    err = failed(p, "usage", code=2)
    assert (next(iter(env)) if env else args[-2]) in err
    assert data(velo(store, "refs", "--json")) == refs  # nothing was done


# -- the store named by --store ----------------------------------------------------------------


def test_init_refuses_a_directory_of_other_things(store: str, src: str, shm_tmp: str) -> None:
    """`veloverlay --store ~/project init` made the project a store: CACHEDIR.TAG (backup tools
    then skip the project) and a `.gitignore` of `*` (git then hides every new file) among its
    files. A non-empty directory that is not a store is refused and left as it was."""
    before = snapshot(src)
    failed(velo(src, "--json", "init"), "exists")
    failed(velo(src, "--json", "ingest", os.path.join(shm_tmp, "proj")), "exists")
    assert snapshot(src) == before
    # an empty directory, a new filesystem's (lost+found), and a store again are fine
    os.makedirs(os.path.join(store, "lost+found"))
    ok(velo(store, "init"))
    ok(velo(store, "init"))
    ok(velo(store, "ingest", src, "-n", "proj"))
    ok(velo(store, "init"))
    assert data(velo(store, "refs", "--json"))[0]["name"] == "proj"


# -- exit statuses, as documented ---------------------------------------------------------------


def test_ctrl_c_exits_130_quietly_and_the_manual_says_so(store: str, shm_tmp: str) -> None:
    """SIGINT in the middle of an ingest: status 130, no traceback, no ref; the manual page's
    EXIT STATUS lists every status the command line uses (130 was missing)."""
    big = os.path.join(shm_tmp, "big")
    make_tree(big, {f"d{i // 100}/f{i}": os.urandom(64 << 10) for i in range(3000)})
    ok(velo(store, "init"))
    env = {**os.environ, "VELO_STORE": store, "VELO_INTERNAL__TEST_PROGRESS": "1", "VELO_JOBS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "ingest", big, "-n", "big"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stderr is not None and p.stdout is not None
    first = p.stderr.read(1)  # the progress bar: the ingest is under way
    p.send_signal(signal.SIGINT)
    out, err = p.stdout.read(), first + p.stderr.read()
    assert p.wait(timeout=120) == 130, err
    assert b"Traceback" not in err and out == b""
    assert data(velo(store, "refs", "--json")) == []
    page = ok(velo(None, "--help-man"))
    statuses = re.findall(r"^\.TP\n(\d+)\n", page[page.index(".SH EXIT STATUS") :], re.M)
    assert statuses == ["0", "1", "2", "129", "130", "141", "143"]


@pytest.mark.parametrize(
    "sig,as_json", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)]
)
def test_sigterm_or_sighup_during_export_leaves_no_part_file(
    store: str, shm_tmp: str, sig: signal.Signals, as_json: bool
) -> None:
    """`kill` (or a closed terminal) in the middle of `export -o F` ended Python at once: F.part
    stayed, and every later export to F was refused ('F.part exists') until the user found and
    removed it. Now both unwind like Ctrl-C: status 128+N, no traceback, nothing left, and the
    next export works. The export is stopped (SIGSTOP) once its .part file exists and before the
    bundle is named, so the signal lands mid-export whatever the machine's speed."""
    big = os.path.join(shm_tmp, "big")
    make_tree(big, {f"f{i}": os.urandom(8 << 20) for i in range(40)})
    ok(velo(store, "ingest", big, "-n", "big"))
    out_dir = os.path.join(shm_tmp, "out")
    os.mkdir(out_dir)
    bundle = os.path.join(out_dir, "b.velo")
    env = {**os.environ, "VELO_STORE": store}
    for _attempt in range(5):
        p = subprocess.Popen(
            [sys.executable, "-m", "veloverlay"]
            + (["--json"] if as_json else [])
            + ["export", "big", "-o", bundle],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # SIGHUP's default action, as in a terminal: under nohup (CI) it is ignored, and
            # the CLI rightly keeps an ignored SIGHUP ignored
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
        while p.poll() is None and not os.path.exists(bundle + ".part"):
            pass
        p.send_signal(signal.SIGSTOP)
        caught = p.poll() is None and os.path.exists(bundle + ".part")
        caught = caught and not os.path.exists(bundle)
        if caught:
            p.send_signal(sig)
            p.send_signal(signal.SIGCONT)
        else:
            p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        if caught:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bundle)
    else:
        pytest.fail("the export always ended before it could be stopped")
    assert os.listdir(out_dir) == []
    assert p.returncode == 128 + sig, err
    assert b"Traceback" not in err
    if as_json:  # a script parsing stdout gets one JSON document saying what happened
        assert json.loads(out)["reason"] == "interrupted", out
    else:
        assert out == b""
    ok(velo(store, "export", "big", "-o", bundle))
    assert os.listdir(out_dir) == ["b.velo"]


@pytest.mark.parametrize("verb", [["ingest", ".", "-n", "h"], ["export", "proj", "-o", "b.velo"]])
def test_a_deleted_current_directory_is_said_so(
    store: str, src: str, shm_tmp: str, verb: list[str]
) -> None:
    """A verb given a relative path from a directory deleted meanwhile (a shell left in a
    removed build dir) said only '[Errno 2] No such file or directory' (reason os-error): no
    path, no hint. Now reason bad-path, saying that the current directory is gone."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    gone = os.path.join(shm_tmp, "gone")
    os.mkdir(gone)
    cmd = [sys.executable, "-m", "veloverlay", "--json", *verb]
    p = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", gone, *cmd],
        env={**os.environ, "VELO_STORE": store, "PYTHONPATH": _CHECKOUT},
        capture_output=True,
    )
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["reason"] == "bad-path" and "current directory" in report["error"], report
    assert [r["name"] for r in data(velo(store, "refs", "--json"))] == ["proj"]


def test_an_empty_store_option_is_not_the_default_store(src: str, shm_tmp: str) -> None:
    """`veloverlay --store "$STORE" remove-store --yes` with STORE unset removed the user's
    default store: an empty --store meant the default. It is a usage error now."""
    env = {"XDG_DATA_HOME": os.path.join(shm_tmp, "xdg")}
    default = os.path.join(shm_tmp, "xdg", "veloverlay")
    ok(velo(None, "ingest", src, "-n", "proj", env=env))
    assert os.path.isdir(os.path.join(default, "objects-v2"))
    for args in (["--store", "", "remove-store", "--yes"], ["gc", "--store", "", "--keep", "1"]):
        failed(velo(None, "--json", *args, env=env), "usage", code=2)
    # VELO_STORE set but empty (click reads it as unset) is refused too, naming the variable.
    for args in (["remove-store", "--yes"], ["gc", "--keep", "1"], ["refs"], ["status"]):
        err = failed(velo("", "--json", *args, env=env), "usage", code=2)
        assert "VELO_STORE" in err
    assert [r["name"] for r in data(velo(None, "refs", "--json", env=env))] == ["proj"]
    ok(velo(default, "remove-store", "--yes"))


def test_export_to_and_import_from_a_directory_say_so(store: str, src: str, shm_tmp: str) -> None:
    """`export -o DIR` wrote the whole bundle, then failed to rename it over DIR with a bare
    EISDIR (reason os-error); `-o ''` did the same with the current directory; `import DIR`
    was an os-error too. Each is refused up front with a reason, and nothing is left behind."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    before = sorted(os.listdir(shm_tmp))
    failed(velo(store, "--json", "export", "proj", "-o", src), "exists")
    failed(velo(store, "--json", "import", src), "bad-path")
    assert sorted(os.listdir(shm_tmp)) == before  # no DIR.part


def test_names_with_a_trailing_newline_are_refused(store: str, src: str) -> None:
    """Name checks were `^...$` regexes, and `$` matches before a trailing newline: 'nl\\n'
    became a ref, 't\\n' a tag, and 'HOST/REPO:TAG\\n' a remote that failed later as the
    registry's fault (remote-invalid)."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    failed(velo(store, "--json", "ingest", src, "-n", "nl\n", "--force"), "bad-ref")
    failed(velo(store, "--json", "tag", "t\n", "proj"), "bad-name")
    for remote in (
        "127.0.0.1:1/x:y\n",
        "127.0.0.1:1\n/x:y",
        "127.0.0.1:1/x@sha256:" + "a" * 64 + "\n",
    ):
        failed(velo(store, "--json", "pull", remote), "bad-name")
    assert [r["name"] for r in data(velo(store, "refs", "--json"))] == ["proj"]
    assert data(velo(store, "tag", "--json")) == []


@pytest.mark.parametrize("name", ["", os.fsdecode(b"\xff\xfe"), "x" * 600])
def test_a_name_no_ref_can_have_is_not_found_not_a_traceback(
    store: str, src: str, name: str
) -> None:
    """An empty name (LMDB: MDB_BAD_VALSIZE), one that is not UTF-8 (UnicodeEncodeError) or
    longer than any key ended ls/log/refs --delete/tag --delete/rollback/run in a traceback."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    for args in (
        ["ls", name],
        ["log", name],
        ["refs", "--delete", name],
        ["tag", "--delete", name],
        ["rollback", name],
        ["tag", "t", name],
        ["diff", "proj", name],
    ):
        p = velo(store, "--json", *args)
        assert p.returncode == 1 and b"Traceback" not in p.stderr, (args, p.stderr)
        want = "bad-name" if args[:2] == ["tag", "--delete"] else "bad-ref"  # no tag's name
        assert json.loads(p.stdout)["reason"] == want, args
    assert [r["name"] for r in data(velo(store, "refs", "--json"))] == ["proj"]


def test_a_tiers_file_that_is_not_utf8_is_a_usage_error(store: str, src: str, shm_tmp: str) -> None:
    """`ingest --tiers F` with a byte that is not UTF-8 in F ended in a UnicodeDecodeError
    traceback (and had made the store first); a directory was a bare os-error."""
    bad = os.path.join(shm_tmp, "tiers")
    with open(bad, "wb") as f:
        f.write(b"1 *.bin\n2 caf\xe9/*\n")
    failed(velo(store, "--json", "ingest", src, "-n", "p", "--tiers", bad), "usage", code=2)
    assert not os.path.exists(store)
    failed(velo(store, "--json", "ingest", src, "-n", "p", "--tiers", shm_tmp), "bad-path")
    with open(bad, "wb") as f:  # UTF-8 is read as UTF-8 whatever the locale
        f.write("1 café/*\n".encode())
    ok(
        velo(
            store, "ingest", src, "-n", "p", "--tiers", bad, env={"LC_ALL": "C", "PYTHONUTF8": "0"}
        )
    )


def test_a_failing_report_is_one_json_document(store: str, src: str) -> None:
    """`fsck --json` that finds a damaged object wrote its report and then the failure as a
    second JSON object: stdout was no JSON document at all (`json.loads` of it failed with
    "Extra data"), though the README promises the result and any failure as JSON. The report
    now carries the failure's fields (error, reason, hint) in the one object."""
    from tests.e2e.test_cli import _writable_object

    ok(velo(store, "ingest", src, "-n", "proj"))
    digest, path = _writable_object(store, "proj", "README")
    with open(path, "r+b") as f:
        f.write(b"J")
    p = velo(store, "fsck", "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["ok"] is False and report["reason"] == "object-corrupt"
    assert report["error"] and digest in report["findings"][0]["what"]
    with open(os.path.join(src, "README"), "rb") as f:
        assert f.read() == b"hello\n"  # what the object should hold: the source, intact


def test_a_target_whose_parent_is_missing_is_said_so_not_unwritable(
    store: str, src: str, shm_tmp: str
) -> None:
    """`run --at A/B/C` with A missing said "its parent is not writable" (where
    the user would look for permissions); the parent does not exist, and nothing is made."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    target = os.path.join(shm_tmp, "a", "b", "c")
    err = failed(
        velo(store, "--json", "run", "proj", "--at", target, "--", "true"), "target-invalid"
    )
    assert "its parent does not exist" in err, err
    assert not os.path.exists(os.path.join(shm_tmp, "a"))


@pytest.mark.parametrize("verb", [["run"], ["mount"], ["umount"], ["tiers"]], ids=" ".join)
def test_a_verb_given_no_arguments_is_a_usage_error(verb: list[str]) -> None:
    """`veloverlay --json run` (a script's empty list of refs) printed the help page on stdout
    and exited 0: no JSON for the script, and a status that says it ran. Now it is a usage
    error (2), one JSON object with --json; the help page goes to stderr for a person."""
    p = velo(None, "--json", *verb)
    failed(p, "usage", code=2)
    assert json.loads(p.stdout)["reason"] == "usage"
    p = velo(None, *verb)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.startswith(b"Usage: veloverlay " + " ".join(verb).encode())
    # `veloverlay` alone still shows its help on stdout
    p = velo(None)
    assert p.returncode == 0 and p.stdout.startswith(b"Usage: veloverlay")


@pytest.mark.parametrize("why", ["newer-format", "unsafe"])
def test_doctor_does_not_call_a_store_every_verb_refuses_fine(
    store: str, shm_tmp: str, why: str
) -> None:
    """doctor said `store: ... ok` and exited 0 for a store every verb refuses (a newer
    format's, or as root one below another user's directory: the refusal showed only in the
    fs-verity line). It now fails with that reason, the report marking the store refused."""
    if why == "unsafe":
        if os.geteuid() != 0:
            pytest.skip("root refuses a store below another user's directory")
        store = os.path.join(shm_tmp, "home", "store")
    ok(velo(store, "init"))
    if why == "newer-format":
        os.mkdir(os.path.join(store, "objects-v9"))
        reason = "manifest-schema"
    else:
        os.chown(os.path.dirname(store), 1500, 1500)
        reason = "store-unsafe"
    failed(velo(store, "--json", "refs"), reason)  # what every verb says
    p = velo(store, "--json", "doctor")
    failed(p, reason)
    report = json.loads(p.stdout)
    assert report["reason"] == reason and report["store"]["ok"] is False
    assert "chosen" in report  # the rest of the report is still there


@pytest.mark.parametrize(
    "args",
    [
        ["run", "proj", "--at", "AT", "--discard", "--no-commit", "--", "sh", "-c", "echo n > n"],
        ["run", "proj", "--at", "AT", "--discard", "-m", "why", "--", "sh", "-c", "echo n > n"],
        ["tag", "--delete", "t1", "t2", "proj"],
        ["tag", "-m", "why"],
        ["refs", "--grace", "0"],
    ],
    ids=[
        "run-discard-no-commit",
        "run-discard-message",
        "tag-delete-and-make",
        "tag-list-m",
        "refs-grace-without-delete",
    ],
)
def test_contradicting_options_are_refused_before_anything_is_done(
    store: str, src: str, shm_tmp: str, args: list[str]
) -> None:
    """`run --discard --no-commit` discarded the session's changes that --no-commit asked to
    keep as REF@SESSION; `tag --delete T NAME VERSION` deleted T and ignored the rest; `tag -m`
    listed the tags. Each is a usage error now, and nothing happens."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    ok(velo(store, "tag", "t1", "proj"))
    at = os.path.join(shm_tmp, "at")
    before = (data(velo(store, "refs", "--json")), data(velo(store, "tag", "--json")))
    p = velo(store, "--json", *(at if a == "AT" else a for a in args))
    failed(p, "usage", code=2)
    assert (data(velo(store, "refs", "--json")), data(velo(store, "tag", "--json"))) == before
    assert not os.path.exists(at)  # no session started: no target made
    assert data(velo(store, "sessions", "--json")) == []


def test_enter_json_keeps_stdout_for_its_report(store: str, src: str, shm_tmp: str) -> None:
    """`enter --json` let the shell write to stdout, before the report: stdout was no JSON
    document (`run --json` already sent its command's stdout to stderr). The shell's output
    now goes to stderr as run's does, and the report is stdout's one document."""
    ok(velo(store, "ingest", src, "-n", "proj"))
    at = os.path.join(shm_tmp, "at")
    script = f"echo from-the-shell; echo new > {at}/new\n".encode()
    p = velo(store, "--json", "enter", "proj", "--at", at, input=script, env={"SHELL": "/bin/sh"})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # the whole of stdout
    assert report["changes"] == [{"status": "A", "path": "new"}]
    assert b"from-the-shell" in p.stderr
    checked = os.path.join(shm_tmp, "checked")
    ok(velo(store, "checkout", "proj", checked))
    with open(os.path.join(checked, "new"), "rb") as f:
        assert f.read() == b"new\n"


def test_init_on_a_file_or_a_dangling_link_says_what_is_there(shm_tmp: str) -> None:
    """`init --store FILE` said `store-unsafe`, "someone who can write the store planted it";
    a symbolic link to a missing directory failed as `os-error` (ENOENT). Each now says what is
    at the path, with a reason docs/errors.md gives for it, and leaves it as it was."""
    path = os.path.join(shm_tmp, "a-file")
    with open(path, "wb") as f:
        f.write(b"mine\n")
    err = failed(velo(path, "--json", "init"), "exists")
    assert "exists and is not a directory" in err
    with open(path, "rb") as f:
        assert f.read() == b"mine\n"
    link = os.path.join(shm_tmp, "a-link")
    os.symlink(os.path.join(shm_tmp, "nowhere"), link)
    err = failed(velo(link, "--json", "init"), "not-found")
    assert "symbolic link" in err and "does not exist" in err
    assert os.readlink(link) == os.path.join(shm_tmp, "nowhere")
    assert not os.path.exists(os.path.join(shm_tmp, "nowhere"))


def test_a_failing_cat_or_export_to_stdout_keeps_json_off_stdout(shm_tmp: str) -> None:
    """`cat` and `export -o -` write bytes on stdout; with --json a failure after some of them
    appended its JSON document to those bytes (a script got neither a bundle nor JSON). Once
    bytes went out, stdout holds only a prefix of them (the object's as they are on disk: the
    damage is found after its last byte), and the failure's JSON document follows its lines on
    stderr; a failure before any byte is told as every verb's (lines on stderr, JSON on stdout)."""
    from tests.e2e.test_cli import _writable_object

    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    big = bytes(range(256)) * 4096  # 1 MiB: several chunks written before the damage is seen
    make_tree(src, {"a.txt": b"a\n", "big.bin": big})
    ok(velo(store, "ingest", src, "-n", "proj"))
    good = velo(store, "export", "proj", "-o", "-").stdout
    _digest, obj = _writable_object(store, "proj", "big.bin")
    damaged = big[:-10] + bytes([big[-10] ^ 0xFF]) + big[-9:]  # the same size
    with open(obj, "r+b") as f:
        f.write(damaged)
    at = good.index(big)
    for args, real in (
        (["export", "proj", "-o", "-"], good[:at] + damaged + good[at + len(big) :]),
        (["cat", "proj", "big.bin"], damaged),
        (["cat", "proj", "missing"], b""),
    ):
        p = velo(store, "--json", *args)
        assert p.returncode == 1, p.stderr
        want = "not-found" if args[-1] == "missing" else "object-corrupt"
        err = p.stderr.decode()
        assert err.startswith("error: ") and f"\nreason: {want}\n" in err, err
        if not real:  # nothing sent: the JSON document on stdout, as for every verb
            report = json.loads(p.stdout)
            assert "{" not in err, err
        else:
            assert p.stdout and real.startswith(p.stdout), (args, p.stdout[-200:])
            report = json.loads(err[err.index("\n{") + 1 :])
        assert report["reason"] == want and report["error"], report
