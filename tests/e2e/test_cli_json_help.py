"""`--help` and `--help-man` with `--json`: one JSON document on stdout, as every verb's output
with --json is (docs/json.md). They printed the text page, which no script reading stdout as
JSON could parse; and `tiers --help --json` was a usage error (the `tiers` group took no
global options)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_cli import ok, velo
from veloverlay.cli import VERBS

COMMANDS = [[], *([v] for v in VERBS), ["tiers", "explain"]]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "veloverlay")
def test_help_with_json_is_one_document_holding_the_page(words: list[str]) -> None:
    page = ok(velo(None, *words, "--help"))
    assert page.startswith("Usage: veloverlay")
    for args in ([*words, "--help", "--json"], ["--json", *words, "--help"]):
        assert json.loads(ok(velo(None, *args))) == {"help": page}, args


def test_help_man_with_json_is_one_document_holding_the_page() -> None:
    page = ok(velo(None, "--help-man"))
    assert page.startswith(".TH VELOVERLAY 1")
    for args in (["--help-man", "--json"], ["--json", "--help-man"]):
        assert json.loads(ok(velo(None, *args))) == {"man": page}, args


def test_the_tiers_group_takes_the_global_options() -> None:
    shown = json.loads(ok(velo(None, "tiers", "--json", "explain", "a.gguf")))
    assert shown["path"] == "a.gguf"


@pytest.mark.parametrize(
    "args",
    [
        ["cat", "proj"],  # PATH missing
        ["cat", "proj", "README", "--bogus"],
        ["export", "proj", "-o", "-", "--bogus"],
        ["export", "proj", "-o"],  # -o without its value
    ],
)
def test_a_usage_error_of_a_data_verb_is_json_on_stdout(shm_tmp: str, args: list[str]) -> None:
    """`cat` and `export -o -` keep JSON off stdout once a byte of data went there; typer's
    usage errors come before any: told as every verb's (docs/json.md), status 2, and nothing
    else on stdout."""
    import os

    store = os.path.join(shm_tmp, "store")
    p = velo(store, "--json", *args)
    assert p.returncode == 2, p.stderr
    report = json.loads(p.stdout)
    assert report["reason"] == "usage" and report["error"], report
    err = p.stderr.decode()
    assert err.startswith("error: ") and "\nreason: usage\n" in err and "{" not in err, err
    assert not os.path.exists(store)
