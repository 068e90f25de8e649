"""The README and --help stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from veloverlay import cli, envvars

ROOT = Path(__file__).resolve().parents[2]


def _cli_commands() -> set[str]:
    """Every verb typer knows (a group's verbs as 'group verb')."""
    import typer

    names = set()
    for name, command in typer.main.get_group(cli.app).commands.items():
        sub = getattr(command, "commands", None)
        if sub:
            names.update(f"{name} {s}" for s in sub)
        else:
            names.add(name)
    assert set(cli.VERBS) <= {n.split()[0] for n in names}
    return names


def test_readme_command_table_matches_cli() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    documented = set()
    for row in table.splitlines()[2:]:
        for cell_cmd in re.findall(r"`([a-z][a-z-]*(?: explain)?)[ `]", row.split("|")[1]):
            documented.add(cell_cmd)
    assert documented == _cli_commands()


def test_readme_env_table_matches_registry() -> None:
    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| (.+) \|$", text, re.M))
    public = {
        k: v for k, v in envvars.VARS.items() if not k.startswith(("VELO_TEST", "VELO_INTERNAL"))
    }
    assert rows == public


def test_readme_quick_start_is_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup$", makefile, re.M) and re.search(
        r"^test: setup$", makefile, re.M
    )
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _verb_options(*, grouped: bool = False) -> dict[str, Any]:
    """Every verb (a group's as 'group verb') and the option names it takes, global ones too;
    `grouped`: a tuple of names (long first) per option, its `--no-` form left out."""
    import typer
    from typer.core import TyperOption

    group = typer.main.get_group(cli.app)
    out: dict[str, Any] = {}

    def walk(prefix: str, command: object) -> None:
        sub = getattr(command, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(f"{prefix} {name}", child)
            return
        names: set[str] = set()
        groups: list[tuple[str, ...]] = []
        for param in getattr(command, "params", []):
            if isinstance(param, TyperOption) and not param.hidden:
                names.update(param.opts + param.secondary_opts)
                groups.append(tuple(sorted(param.opts, key=lambda o: not o.startswith("--"))))
        out[prefix] = groups if grouped else names

    for name, command in group.commands.items():
        walk(name, command)
    return out


def _doc_texts() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def test_every_option_of_every_verb_is_documented() -> None:
    """What --help offers, the README or docs/ say: a long option by its name anywhere, or its
    short form on a line that shows the verb in code (`log REF [-n N]`)."""
    text = _doc_texts()
    missing = []
    for verb, groups in _verb_options(grouped=True).items():
        for names in groups:
            if set(names) & {"--help", "--store", "--debug", "--json"}:
                continue
            long_ok = any(
                re.search(re.escape(n) + r"(?![\w-])", text) for n in names if n.startswith("--")
            )
            short_ok = any(
                re.search(rf"^.*`{verb}\b.*(?<![\w-]){re.escape(n)}(?![\w-]).*$", text, re.M)
                for n in names
                if not n.startswith("--")
            )
            if not (long_ok or short_ok):
                missing.append(f"{verb} {'/'.join(names)}")
    assert missing == []


def test_readme_command_table_options_exist() -> None:
    """An option the README's command table shows for a verb is one that verb takes."""
    text = (ROOT / "README.md").read_text()
    table = text.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    options = _verb_options()
    wrong = []
    for row in table.splitlines()[2:]:
        cell = row.split(" | ", 1)[0]
        for usage in re.findall(r"`([^`]+)`", cell):
            verb = usage.split()[0]
            verb = f"{verb} {usage.split()[1]}" if f"{verb} explain" in options else verb
            for opt in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage):
                if opt not in options[verb]:
                    wrong.append(f"{verb} {opt}")
    assert wrong == []


def _reasons_table() -> dict[str, str]:
    text = (ROOT / "docs" / "errors.md").read_text()
    table = text.split("| reason | exit | one way to get it |", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\| `([a-z-]+)` \| (\d+) \| \S.* \|$", table, re.M))


def test_every_reason_is_documented_with_its_exit_status() -> None:
    """docs/errors.md lists each reason a failure can carry, no other, with the exit status
    the CLI gives it (2 for usage, else 1)."""
    from veloverlay.cli import render
    from veloverlay.errors import Reason

    rows = _reasons_table()
    cli_only = {render.OS_ERROR, render.INTERNAL, render.INTERRUPTED}
    assert set(rows) == {r.value for r in Reason} | cli_only
    assert {k for k, v in rows.items() if v != "1"} == {"usage", "interrupted"}
    assert rows["usage"] == "2" and rows["interrupted"] == "130"
    assert "docs/errors.md" in (ROOT / "README.md").read_text()


def test_every_reason_is_raised_somewhere() -> None:
    """No reason in the enum that no code gives (the docs would promise a failure that cannot
    happen); a reason is used as `Reason.NAME` outside errors.py."""
    import ast

    from veloverlay.errors import Reason

    used = set()
    for path in (ROOT / "veloverlay").rglob("*.py"):
        if path.name == "errors.py" and path.parent.name == "veloverlay":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Reason"
            ):
                used.add(node.attr)
    assert {r.name for r in Reason} - used == set()


_GLOBAL = {
    "--store",
    "--debug",
    "--json",
    "--help",
    "--version",
    "--help-man",
    "--install-completion",
    "--show-completion",
}


def _doc_command_lines() -> list[tuple[str, str]]:
    """(file, command) for every `veloverlay ...` the docs show: each line of a ```sh block
    and each inline code span, split at `&&`, `;` and `|`."""
    found = []
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]:
        text = path.read_text()
        spans = [
            line.split("  #")[0]
            for block in re.findall(r"```sh\n(.*?)```", text, re.S)
            for line in block.splitlines()
        ] + re.findall(r"`(veloverlay [^`]+)`", text)
        for span in spans:
            for part in re.split(r"&&|;|\|", span):
                if part.strip().startswith("veloverlay "):
                    found.append((path.name, " ".join(part.split())))
    return found


def test_every_command_the_docs_show_names_a_verb_and_its_options() -> None:
    """A command line in README.md or docs/ names a verb the CLI has, and only options that
    verb (or the top level) takes: a renamed verb or option fails here, not for a reader."""
    options = _verb_options()
    wrong = []
    lines = _doc_command_lines()
    assert len(lines) > 30, lines  # the docs' examples were found
    for where, line in lines:
        words = [w.strip("[]") for w in line.split()[1:]]
        if "--" in words:
            words = words[: words.index("--")]  # the session's command: not ours
        rest = [w for w in words if not w.startswith("-")]
        if not rest:  # `veloverlay --help-man`: top-level options only
            wrong += [f"{where}: {line}" for w in words if w.split("=")[0] not in _GLOBAL]
            continue
        verb = rest[0] if rest[0] in options else " ".join(rest[:2])
        if verb not in options:
            wrong.append(f"{where}: {line} (no verb)")
            continue
        for w in words:
            opt = w.split("=")[0]
            if opt.startswith("-") and opt not in options[verb] | _GLOBAL:
                wrong.append(f"{where}: {line} ({opt})")
    assert wrong == []


def test_every_option_is_documented_beside_its_verb() -> None:
    """Each option of each verb is named in a paragraph (or table row) of README.md or docs/
    that shows the verb in code: an option mentioned only for another verb (`--path` of
    `import`, not of `pull`) is not documented for this one."""
    text = _doc_texts()
    paras = re.split(r"\n\s*\n|\n(?=\|)", text)
    missing = []
    for verb, groups in _verb_options(grouped=True).items():
        beside = [
            p
            for p in paras
            if re.search(rf"`(?:veloverlay )?{re.escape(verb)}(?![\w-])", p)
            or re.search(rf"^veloverlay {re.escape(verb)}(?![\w-])", p, re.M)
        ]
        for names in groups:
            if set(names) & _GLOBAL:
                continue
            if not any(
                re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", p) for p in beside for n in names
            ):
                missing.append(f"{verb} {'/'.join(names)}")
    assert missing == []


def _documented_store_names() -> set[str]:
    """The top-level names the store layout block of docs/data-model.md shows."""
    text = (ROOT / "docs" / "data-model.md").read_text().split("## The store", 1)[1]
    block = text.split("```\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    column = lines[0].index("--store")  # where the descriptions start
    names = set()
    for line in lines[1:]:
        for word in line[:column].split():  # `tmp/<stage>/ + <stage>.lock`: tmp
            if re.fullmatch(r"[\w.-]+(?:/.*)?", word):
                names.add(word.split("/")[0])
    return names


def test_store_layout_doc_names_every_top_level_entry_the_code_knows() -> None:
    """docs/data-model.md's layout block and the store's own list of what it holds
    (store.access.TOP_DIRS/TOP_FILES, which `refuse_newer_format` and `remove-store` follow)
    name the same entries; `objects-v1`, the layout before issue 15, is told of in the prose."""
    from veloverlay.store import access

    code = {n.split("/")[0] for n in (*access.TOP_DIRS, *access.TOP_FILES)}
    code |= {"CACHEDIR.TAG", ".gitignore"}
    documented = _documented_store_names()
    assert documented == code - {"objects-v1"}
    assert "`objects-v1/ab/cd/`" in (ROOT / "docs" / "data-model.md").read_text()


def test_a_used_store_holds_only_what_the_layout_doc_names(shm_tmp: str) -> None:
    """`find` a store after init, ingest, a session, export, gc and fsck: every top-level
    entry is one docs/data-model.md shows."""
    import os

    from tests.helpers.cli import ok, velo
    from tests.helpers.trees import make_tree

    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n", "lib/a.txt": b"a\n"})
    ok(velo(store, "init"))
    ok(velo(store, "ingest", src, "-n", "proj"))
    at = os.path.join(shm_tmp, "at")
    # a write inside the projection: the command runs in the caller's cwd (the checkout's root
    # under pytest), which "echo b > b" wrote into (a stray file `b` was committed so)
    ok(velo(store, "run", "proj", "--at", at, "--", "sh", "-c", f"echo b > {at}/b"))
    ok(velo(store, "export", "proj", "-o", os.path.join(shm_tmp, "p.velo")))
    ok(velo(store, "gc", "--grace", "0"))
    ok(velo(store, "fsck"))
    present = set(os.listdir(store))
    assert {"objects-v2", "manifests.lmdb", "lock", "sessions"} <= present
    assert present - _documented_store_names() == set()


def test_errors_doc_lists_the_exit_statuses_of_the_man_page() -> None:
    """docs/errors.md's exit statuses are the manual page's (`--help-man`, EXIT STATUS)."""
    import typer

    from veloverlay.cli.man import man_page

    group = typer.main.get_group(cli.app)
    with group.make_context("veloverlay", ["--store", "/nonexistent", "init"]) as ctx:
        page = man_page(group, ctx)
    section = page.split(".SH EXIT STATUS", 1)[1].split(".PP", 1)[0]
    man_codes = set(re.findall(r"^\.TP\n(\d+)\n", section, re.M))
    doc = (ROOT / "docs" / "errors.md").read_text().split("Exit status:", 1)[1].split("\n\n")[0]
    doc_codes = set(re.findall(r"(?<![\w-])(\d{1,3}) [a-z]", doc))
    assert man_codes == doc_codes, (man_codes, doc_codes)


def _json_table() -> dict[str, tuple[str, list[str] | str]]:
    """docs/json.md: command -> (shape, keys or the command it is "as")."""
    text = (ROOT / "docs" / "json.md").read_text()
    table = text.split("| command | JSON | keys |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, tuple[str, list[str] | str]] = {}
    for line in table.splitlines()[2:]:
        cmd, shape, keys = (c.strip() for c in line.strip("|").split(" | "))
        same = re.fullmatch(r"as `([a-z -]+)`", keys)
        rows[cmd.strip("`")] = (shape, same.group(1) if same else re.findall(r"`(\w+)`", keys))
    return rows


def _keys(doc: Any) -> tuple[str, list[str]]:
    if isinstance(doc, list):
        assert doc, "an empty list shows no keys: the run must make one entry"
        return "list of objects", sorted(doc[0])
    return "object", sorted(doc)


def test_json_doc_lists_the_keys_each_verb_prints(shm_tmp: str, request: Any) -> None:
    """Each command of docs/json.md's table, run with --json on a real store, prints one
    document of the shape and top-level keys the table gives; every verb has a row, and every
    row but push and pull (no registry here: their records' keys) is a real run. The live ones
    (`diff --session` of a mounted session, `mount`/`umount`, `enter`, `harvest`) used to be
    left out; run, they found `diff --session` refusing a mounted session as 'not running'."""
    import os

    from tests.helpers.cli import data, ok, velo
    from tests.helpers.trees import make_tree
    from veloverlay.remote.pull import PullResult
    from veloverlay.remote.push import PushResult

    rows = _json_table()
    verbs = _cli_commands() - {"daemon", "cat"}  # no JSON but on a failure (see the page)
    assert verbs <= {cmd.split(" NAME")[0].split(" -")[0] for cmd in rows}
    s = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n", "lib/a.txt": b"a\n"})
    bundle = os.path.join(shm_tmp, "p.velo")
    mnt = os.path.join(shm_tmp, "mnt")
    os.mkdir(mnt)
    runs: dict[str, list[str]] = {
        "--version": ["--version"],
        "--help": ["--help"],
        "--help-man": ["--help-man"],
        "init": ["init"],
        "ingest": ["ingest", src, "-n", "proj"],
        "refs": ["refs"],
        "ls": ["ls", "proj"],
        "log": ["log", "proj"],
        "diff": ["diff", "proj@{1}", "proj"],
        "diff -p": ["diff", "-p", "proj@{1}", "proj"],
        "diff --stat": ["diff", "--stat", "proj@{1}", "proj"],
        "checkout": ["checkout", "proj", os.path.join(shm_tmp, "co")],
        "rollback": ["rollback", "proj", "1"],
        "export": ["export", "proj", "-o", bundle],
        "import": ["import", bundle, "--name", "copy"],
        "tag NAME VERSION": ["tag", "t1", "proj"],
        "tag": ["tag"],
        "tag --delete": ["tag", "--delete", "t1"],
        "run": ["run", "proj", "--at", os.path.join(shm_tmp, "at"), "--", "true"],
        "enter": ["enter", "proj", "--at", os.path.join(shm_tmp, "at")],
        # a session its manager left (killed as it harvests: the fault point's SIGKILL)
        "harvest": ["harvest", "--all"],
        "mount": ["mount", "proj", mnt],
        "diff --session": ["diff", "--session", "SID"],
        "diff --session -p": ["diff", "--session", "SID", "-p"],
        "diff --session --stat": ["diff", "--session", "SID", "--stat"],
        "umount": ["umount", mnt],
        "sessions": ["sessions"],
        "sessions --clean": ["sessions", "--clean"],
        "fsck": ["fsck"],
        "gc": ["gc", "--grace", "0"],
        "status": ["status"],
        "tiers explain": ["tiers", "explain", "m.gguf"],
        "doctor": ["doctor"],
        "refs --delete": ["refs", "--delete", "copy"],
        "remove-store": ["remove-store", "--yes"],
    }
    mounting = ("mount", "diff --session", "diff --session -p", "diff --session --stat", "umount")
    if os.geteuid() != 0:  # mount is real root's (docs/sessions.md)
        runs = {cmd: args for cmd, args in runs.items() if cmd not in mounting}
    else:  # a session another test starts meanwhile would copy the mount and hold it
        request.getfixturevalue("own_mount_namespace")
    printed: dict[str, tuple[str, list[str]]] = {}
    sid = ""
    try:
        for cmd, args in runs.items():
            if cmd == "diff":  # a second version to compare
                with open(os.path.join(src, "README"), "wb") as f:
                    f.write(b"changed\n")
                ok(velo(s, "ingest", src, "-n", "proj"))
            if cmd == "harvest":
                at = os.path.join(shm_tmp, "at")
                killed = velo(
                    s,
                    *("run", "proj", "--at", at, "--", "sh", "-c", f"echo new > {at}/new"),
                    env={"VELO_INTERNAL__TEST_FAULT": "harvest.file:1"},
                )
                assert killed.returncode == -9, killed.stderr
            if cmd == "diff --session":  # the mounted session changed something (plain files)
                with open(os.path.join(mnt, "README"), "ab") as f:
                    f.write(b"more\n")
            args = [sid if a == "SID" else a for a in args]
            if cmd == "enter":  # its shell reads `exit` from stdin
                p = velo(s, "--json", *args, input=b"exit\n", env={"SHELL": "/bin/sh"})
            else:
                p = velo(s, "--json", *args)
            printed[cmd] = _keys(data(p))
            if cmd == "mount":
                sid = data(p)["session_id"]
    finally:  # a failure halfway leaves no session mounted
        if os.path.ismount(mnt):
            velo(s, "umount", "--discard", mnt)
    printed["push"] = ("list of objects", sorted(PushResult("r", "h/r:t", "d", "0").to_dict()))
    printed["pull"] = ("object", sorted(PullResult("h/r:t", "d", "r", "0").to_dict()))
    wrong = []
    for cmd, (shape, keys) in rows.items():
        if isinstance(keys, str):  # "as `run`": the same record
            shape, keys = shape, rows[keys][1]
        if cmd in printed and printed[cmd] != (shape, sorted(keys)):
            wrong.append((cmd, printed[cmd], (shape, sorted(keys))))
    assert wrong == []
    not_run = {"push", "pull"} | (set() if os.geteuid() == 0 else set(mounting))
    assert set(printed) | not_run == set(rows)


def test_docs_run_a_remote_ref_only_with_a_target() -> None:
    """A pulled version's recorded path is not trusted (docs/remote.md): `run HOST/REPO:TAG`
    without `--at` fails with target-invalid unless an earlier `pull --path` gave the ref one.
    An example that runs a registry reference shows `--at` (the README's did not)."""
    wrong = [
        (where, line)
        for where, line in _doc_command_lines()
        if re.match(r"veloverlay (run|enter) [\w.-]+\.[\w.-]+(:\d+)?/\S+:\S+", line)
        and "--at" not in line
    ]
    assert wrong == []
