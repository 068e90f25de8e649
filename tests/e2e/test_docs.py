"""The README and --help stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

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
