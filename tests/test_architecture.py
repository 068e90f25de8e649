"""The house plan as a test: which part of the package may import which (docs/architecture.md).

Every `import` in veloverlay/ counts, lazy ones inside functions too: a lazy upward import is still
an upward dependency. The checker is plain `ast` (no import-linter dependency); a test feeds it an
upward edge to show that it catches one.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "veloverlay"
DOC = PKG.parent / "docs" / "architecture.md"

LEAVES = {
    "_libc",
    "errors",
    "envvars",
    "records",
    "paths",
    "files",
    "pathtrust",
    "faults",
    "progress",
    "words",
}
FACILITIES = {
    "ns",
    "process",
    "mount",
    "mountinfo",
    "fsflags",
    "verity",
    "linking",
    "overlay",
    "posixacl",
    "probe",
    "storefs",
    "tiers",
    "workers",
}
# What each part may import besides itself, leaves and facilities (lowest first).
ALLOWED: dict[str, set[str]] = {
    "store": set(),
    "ingest": {"store"},
    "lower": {"store"},
    "remote": {"store", "ingest"},
    "session": {"store", "lower", "remote", "session.overlay", "session.shim"},
    "session.overlay": {"store", "lower", "session"},
    "session.shim": {"store", "lower", "session"},
    "verbs": {"store", "ingest", "lower", "remote", "session", "session.overlay", "session.shim"},
    "cli": {"*"},
    "__main__": {"cli"},
    "": set(),  # veloverlay/__init__.py
}
# Third-party modules that exactly one part may import.
OWNERS = {
    "typer": {"cli"},
    "click": {"cli"},
    "rich": {"cli.render"},
    "lmdb": {"store.manifest"},
    "blake3": {"store.digest"},
    "ctypes": {"_libc"},
    "httpx": {"remote.client", "remote.challenge", "remote.transport"},
}
MAX_LINES = 600
# Modules still over the limit, each with the work that removes it (the exemption ends with the
# file: an entry whose file is gone or small fails the test).
OVERSIZE: dict[str, str] = {}


def part(module: str) -> str:
    """The part of the house a module belongs to: 'store', 'session.shim', a leaf's name..."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "session" and len(parts) > 1 and parts[1] in ("overlay", "shim"):
        return "session." + parts[1]
    return parts[0]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), lazy imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            if node.module == "veloverlay":
                found.update(f"veloverlay.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge of `graph` (module -> imported modules) that the house rules forbid."""
    bad = []
    for mod, targets in graph.items():
        src = part(mod)
        for target in targets:
            if target.startswith("veloverlay"):
                dst = part(target)
                if dst == src:
                    continue
                if src in LEAVES:
                    if dst != "errors" or src == "errors":
                        bad.append(f"{mod} -> {target}: a leaf imports only veloverlay.errors")
                elif src in FACILITIES:
                    if dst not in LEAVES | FACILITIES:
                        bad.append(f"{mod} -> {target}: a facility imports only leaves")
                elif dst not in LEAVES | FACILITIES:
                    allowed = ALLOWED.get(src)
                    if allowed is None:
                        bad.append(f"{mod}: part {src!r} is not in the house plan")
                    elif "*" not in allowed and dst not in allowed:
                        bad.append(f"{mod} -> {target}: {src} may not import {dst}")
            else:
                top = target.split(".")[0]
                owners = OWNERS.get(top)
                if owners is not None:
                    where = mod.removeprefix("veloverlay.")
                    if not any(where == o or part(mod) == o for o in owners):
                        bad.append(f"{mod} imports {top}: only {sorted(owners)} may")
    return sorted(bad)


def package_graph() -> dict[str, set[str]]:
    return {name: imports(path) for name, path in module_names().items()}


def test_no_forbidden_import() -> None:
    assert violations(package_graph()) == []


def test_the_checker_catches_an_upward_import() -> None:
    graph = package_graph()
    graph["veloverlay.store.cas"] = graph["veloverlay.store.cas"] | {"veloverlay.lower.stacks"}
    graph["veloverlay.lower.layers"] = graph["veloverlay.lower.layers"] | {
        "veloverlay.session.commit"
    }
    graph["veloverlay.session.overlay.pid1"] = graph["veloverlay.session.overlay.pid1"] | {
        "veloverlay.session.shim.procs"
    }
    graph["veloverlay.paths"] = graph["veloverlay.paths"] | {"veloverlay.records"}
    graph["veloverlay.ingest.scan"] = graph["veloverlay.ingest.scan"] | {"lmdb"}
    found = violations(graph)
    assert len(found) == 5, found
    assert any("store may not import lower" in v for v in found)
    assert any("lower may not import session" in v for v in found)
    assert any("session.overlay may not import session.shim" in v for v in found)
    assert any("a leaf imports only" in v for v in found)
    assert any("imports lmdb" in v for v in found)


def test_no_import_cycle_between_parts() -> None:
    """Parts form a DAG (the session core dispatching to its backends is the one way down)."""
    edges: dict[str, set[str]] = {}
    for mod, targets in package_graph().items():
        for t in targets:
            if t.startswith("veloverlay") and part(t) != part(mod):
                edges.setdefault(part(mod), set()).add(part(t))
    edges.get("session", set()).difference_update({"session.overlay", "session.shim"})
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*trail, node])
        seen[node] = 2

    for node in sorted(edges):
        visit(node, [])


def test_no_module_over_the_limit() -> None:
    too_big = {}
    for path in module_names().values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_big[str(path.relative_to(PKG))] = lines
    assert set(too_big) <= set(OVERSIZE), too_big
    for rel, why in OVERSIZE.items():
        assert rel in too_big, f"{rel} is no longer over {MAX_LINES} lines: drop its exemption"
        assert why


def test_every_package_says_what_it_owns_and_the_map_names_it() -> None:
    doc = DOC.read_text()
    packages = sorted(p.parent for p in PKG.rglob("__init__.py") if p.parent != PKG)
    for pkg in packages:
        rel = pkg.relative_to(PKG).as_posix()
        init = (pkg / "__init__.py").read_text()
        docstring = ast.get_docstring(ast.parse(init))
        assert docstring and "import" in docstring, f"{rel}/__init__.py: say what it may import"
        assert f"`{rel}/`" in doc, f"docs/architecture.md does not name {rel}/"
    named = set(re.findall(r"`([a-z_/]+)/`", doc))
    real = {p.relative_to(PKG).as_posix() for p in packages}
    assert named <= real, f"docs/architecture.md names packages that do not exist: {named - real}"
    for leaf in LEAVES | FACILITIES:
        assert (PKG / f"{leaf}.py").is_file(), leaf
        assert f"`{leaf}.py`" in doc, f"docs/architecture.md does not name {leaf}.py"


def test_no_test_reaches_into_another_packages_private_names() -> None:
    """Tests use what a package exports, not its underscored internals (monkeypatching a seam a
    module documents as one is the exception, named here)."""
    seams = {"_flock", "_lock_sidecar", "_MEMORY_SHARE", "_CHECKIN", "_socket_address"}
    bad = []
    for path in Path(__file__).resolve().parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("veloverlay"):
                for a in node.names:
                    if a.name.startswith("_") and a.name not in seams and a.name != "_libc":
                        bad.append(f"{path.name}: from {node.module} import {a.name}")
    assert bad == [], bad


if __name__ == "__main__":  # pragma: no cover - a quick look at the graph
    for v in violations(package_graph()):
        print(v)
    print(os.linesep.join(sorted({part(m) for m in module_names()})))


def test_every_crash_point_is_listed() -> None:
    """faults.POINTS is the list of crash points tests can name: every `faults.point("...")`
    call in the package must be in it (two of pull's were not)."""
    import re

    from veloverlay import faults

    used = set()
    for path in PKG.rglob("*.py"):
        used |= set(re.findall(r'faults\.point\("([^"]+)"', path.read_text()))
    assert used and used <= set(faults.POINTS), sorted(used - set(faults.POINTS))


# What the repository's top level holds, each entry with its job: a stray file committed by
# accident (f329c87 committed a two-byte file `b`) fails here.
TOP_LEVEL = {
    ".ci": "the CI entry point (.ci/run)",
    ".gitignore": "what git ignores",
    "MANIFEST.in": "what the sdist carries",
    "Makefile": "the quick start's two commands and the separate long runs",
    "README.md": "the user's first page",
    "bench": "benchmarks against peers",
    "docs": "user and design documents",
    "examples": "the demo",
    "pyproject.toml": "package metadata, linters, pytest",
    "setup.py": "the shim's build as a package extension",
    "shim": "the LD_PRELOAD shim (C)",
    "tests": "the test suite",
    "tools": "setup and the VM matrix",
    "vagrant": "the Vagrant VM matrix",
    "veloverlay": "the package",
}


def test_the_top_level_holds_only_known_entries() -> None:
    root = PKG.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = {line.split("/", 1)[0] for line in out.splitlines()}
    assert tracked, "git ls-files listed nothing"
    assert tracked <= set(TOP_LEVEL), (
        f"unknown top-level entries: {sorted(tracked - set(TOP_LEVEL))}"
    )
