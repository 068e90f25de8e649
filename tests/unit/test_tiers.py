"""Tier rules: anchored globs, first match wins, no substring matching; `tiers explain`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.cli import velo_text
from veloverlay import cli
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.tiers import DEFAULT_RULES, Rule, Rules, parse_rules
from veloverlay.verbs.repo import Repo


def tier(glob: str, path: bytes) -> int | None:
    """The tier a single-rule set gives `path`, or None when the rule does not match."""
    rules = Rules([Rule(1, glob)])
    t, rule = rules.explain(path)
    assert rules.classify(path) == t
    return t if rule is not None else None


@pytest.mark.parametrize(
    "glob, path, matches",
    [
        ("*.bin", b"x.bin", True),
        ("*.bin", b"d/x.bin", False),  # `*` stays within one name
        ("*.bin", b"x.bin.txt", False),  # anchored at the end
        ("*.bin", b"xbin", False),
        ("d/*", b"d/x", True),
        ("d/*", b"d/x/y", False),
        ("d/*", b"dd/x", False),  # anchored at the start: no substring matching
        ("d/*", b"a/d/x", False),
        ("**/x", b"x", True),  # `**/x` matches x at the top
        ("**/x", b"a/x", True),
        ("**/x", b"a/b/c/x", True),
        ("**/x", b"ax", False),
        ("**/x", b"a/x/y", False),
        ("**/*.gguf", b"model.gguf", True),
        ("**/*.gguf", b"m/model.gguf", True),
        ("**/*.gguf", b"m/model.gguf.part", False),
        ("**/*.gguf", b"m/.gguf", True),
        ("a/**", b"a/b/c", True),
        ("a/**", b"b/a/c", False),
        ("a/**/z", b"a/z", True),
        ("a/**/z", b"a/b/c/z", True),
        ("**", b"anything/at/all", True),
        ("?.py", b"a.py", True),
        ("?.py", b"ab.py", False),
        ("?", b"/", False),
        ("[ab].txt", b"a.txt", True),
        ("[ab].txt", b"c.txt", False),
        ("[!ab].txt", b"c.txt", True),
        ("[!ab].txt", b"a.txt", False),
        ("weights.safetensors", b"weights.safetensors", True),
        ("weights.safetensors", b"big-weights.safetensors", False),
        ("a+b(c)", b"a+b(c)", True),  # regex metacharacters are literal
        ("a.b", b"axb", False),
        ("*", b"\xff\xfe", True),  # non-UTF-8 names
        ("*", b"new\nline", True),
        ("*.txt", b"a.txt\n", False),  # `$` would match before the trailing newline
        ("m/*.bin", b"m/x.bin\n", False),
    ],
)
def test_anchored_glob_semantics(glob: str, path: bytes, matches: bool) -> None:
    assert (tier(glob, path) == 1) is matches


def test_first_match_wins() -> None:
    rules = Rules([Rule(2, "keep/*.gguf", "k"), Rule(1, "**/*.gguf", "w"), Rule(2, "**", "rest")])
    assert rules.explain(b"keep/m.gguf") == (2, rules.rules[0])
    assert rules.explain(b"other/m.gguf") == (1, rules.rules[1])
    assert rules.explain(b"x.txt") == (2, rules.rules[2])
    assert [rules.classify(p) for p in (b"keep/m.gguf", b"other/m.gguf", b"x.txt")] == [2, 1, 2]
    # Order matters: the catch-all first decides everything.
    flipped = Rules([Rule(2, "**"), Rule(1, "**/*.gguf")])
    assert flipped.classify(b"other/m.gguf") == 2


def test_no_rule_matches_means_tier_2() -> None:
    rules = Rules([Rule(1, "*.bin")])
    assert rules.explain(b"d/x.bin") == (2, None)
    assert rules.classify(b"d/x.bin") == 2
    assert Rules([]).classify(b"x.bin") == 2


def test_default_rules() -> None:
    rules = Rules.default()
    assert rules.rules == DEFAULT_RULES
    for p in (b"m.safetensors", b"a/b/m.gguf", b"x.onnx", b"ckpt/e.ckpt", b"w.pth"):
        assert rules.classify(p) == 1, p
    # Code stays Tier-2 by default: programs that resolve realpaths must not see the store.
    for p in (
        b"bin/python",
        b"lib/x.py",
        b"node_modules/a/index.js",
        b"lib/libc.so.6",
        b"x.pth.py",
    ):
        assert rules.classify(p) == 2, p
    t, rule = rules.explain(b"lib/x.py")
    assert t == 2 and rule is not None and rule.glob == "**"
    assert Rules.from_json(rules.to_json()).rules == rules.rules
    assert Rules.from_json(None).rules == DEFAULT_RULES


def test_python_path_files_in_a_site_directory_stay_tier_2() -> None:
    """A `.pth` directly in site-packages (dist-packages on Debian) is Python's path configuration,
    which tools append to in place: as a Tier-1 symlink into the store, that append failed in a
    session. PyTorch checkpoints named `.pth` elsewhere (also below site-packages) stay Tier-1."""
    rules = Rules.default()
    for p in (
        b"venv/lib/python3.11/site-packages/distutils-precedence.pth",
        b"site-packages/__editable__.pkg-1.0.pth",
        b"usr/lib/python3/dist-packages/zope.interface-nspkg.pth",
    ):
        assert rules.classify(p) == 2, p
        assert rules.explain(p)[0] == 2, p
    for p in (b"w.pth", b"venv/lib/python3.11/site-packages/pkg/weights/resnet.pth"):
        assert rules.classify(p) == 1, p


globs = st.lists(
    st.tuples(
        st.sampled_from([1, 2]),
        st.lists(
            st.sampled_from(["*", "**/", "?", "a", "b", ".x", "/", "[ab]", "**", "*.x"]),
            min_size=1,
            max_size=5,
        ).map("".join),
    ),
    max_size=5,
)
rel_paths = st.lists(
    st.sampled_from([b"a", b"b", b"ab", b".x", b"a.x", b"\xff", b"x"]), min_size=1, max_size=4
).map(b"/".join)


@settings(max_examples=300, deadline=None)
@given(globs, rel_paths)
def test_classify_agrees_with_explain(rule_specs: list[tuple[int, str]], path: bytes) -> None:
    """The fast path (suffix tests) decides exactly as the rule-by-rule regexes do."""
    specs = [(t, g) for t, g in rule_specs if not g.startswith("/")]
    rules = Rules([Rule(t, g) for t, g in specs])
    assert rules.classify(path) == rules.explain(path)[0]


def test_parse_rules() -> None:
    rules = parse_rules("# a comment\n\n1 **/*.gguf   # weights\n  2   keep/**\n1 data/*.bin\n")
    assert [(r.tier, r.glob, r.why) for r in rules.rules] == [
        (1, "**/*.gguf", "weights"),
        (2, "keep/**", ""),
        (1, "data/*.bin", ""),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "3 *.x",  # no such tier
        "1",  # no glob
        "1 a b",  # two globs
        "one *.x",
        "1 /abs/*.x",  # globs are relative
        "1 [ab",  # unclosed class
    ],
)
def test_parse_rules_errors(text: str) -> None:
    with pytest.raises(VeloError) as ei:
        parse_rules(text)
    assert ei.value.reason is Reason.USAGE


def test_rules_are_stored_with_the_ref_and_used(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    os.makedirs(os.path.join(src, "m"))
    for name in ("m/w.bin", "m/notes.txt", "top.bin"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(name.encode())
    rules = parse_rules("1 m/*.bin\n")
    ingest(repo.store, repo.m, src, "t", rules=rules, jobs=1)
    tiers = {e.path: e.tier for e in repo.ls("t", recursive=True) if e.kind == "file"}
    assert tiers == {b"m/w.bin": 1, b"m/notes.txt": 2, b"top.bin": 2}
    # A re-ingest without --tiers keeps the ref's rules.
    with open(os.path.join(src, "m", "w2.bin"), "wb") as f:
        f.write(b"new")
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert {e.path: e.tier for e in repo.ls("t", "m")}[b"m/w2.bin"] == 1
    tier_, rule, _ = repo.explain_tier("m/x.bin", "t")
    assert tier_ == 1 and rule is not None and rule.glob == "m/*.bin"


# -- the CLI -----------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_tiers_explain_names_the_deciding_rule(
    capsys: pytest.CaptureFixture[str], repo: Repo
) -> None:
    store = os.fspath(repo.store.root)
    rc, out, _ = run_cli(capsys, "--store", store, "tiers", "explain", "models/llama.gguf")
    assert rc == 0
    assert "tier 1" in out and "**/*.gguf" in out
    rc, out, _ = run_cli(capsys, "--store", store, "tiers", "explain", "src/main.py")
    assert rc == 0 and "tier 2" in out and "'2 **'" in out
    rc, out, _ = run_cli(capsys, "--store", store, "tiers", "explain", "--json", "a/b.onnx")
    assert rc == 0
    data = json.loads(out)
    assert (data["tier"], data["rule"], data["path"]) == (1, "**/*.onnx", "a/b.onnx")


def velo(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (the test holds the store's LMDB open)."""
    return velo_text(store, *args)


def test_tiers_explain_with_a_refs_rules(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    os.makedirs(src)
    rules = parse_rules("2 keep/*\n1 **/*.dat # data\n")
    ingest(repo.store, repo.m, src, "t", rules=rules, jobs=1)
    store = os.fspath(repo.store.root)
    p = velo(store, "tiers", "explain", "--ref", "t", "x/y.dat")
    assert p.returncode == 0, p.stderr
    assert "tier 1" in p.stdout and "'1 **/*.dat'" in p.stdout and "data" in p.stdout
    p = velo(store, "tiers", "explain", "--ref", "t", "keep/y.dat")
    assert p.returncode == 0 and "tier 2" in p.stdout and "'2 keep/*'" in p.stdout
    p = velo(store, "tiers", "explain", "--ref", "t", "z.txt")
    assert p.returncode == 0 and "tier 2" in p.stdout and "no rule matched" in p.stdout
    p = velo(store, "tiers", "explain", "--ref", "nope", "z", "--json")
    assert p.returncode == 1 and "reason: not-found" in p.stderr


def _as_regex(glob: str) -> re.Pattern[bytes]:
    """The reference: the glob as a (backtracking) regex, as rules were matched before."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] in "*?":
            out.append("[^/]*" if glob[i] == "*" else "[^/]")
            i += 1
        elif glob[i] == "[":
            j = glob.index("]", i + 1)
            body = glob[i + 1 : j].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile(("^" + "".join(out) + "$").encode("utf-8", "surrogateescape"), re.DOTALL)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(["*", "**/", "**", "?", "a", "b", "/", "[ab]", "[!a]", "[a-c]", "é", "\\"]),
        min_size=1,
        max_size=7,
    ).map("".join),
    st.lists(
        st.sampled_from([b"a", b"b", b"c", b"ab", b"", b"\xff", "é".encode()]), max_size=5
    ).map(b"/".join),
)
def test_globs_match_as_the_regex_they_stand_for(glob: str, path: bytes) -> None:
    """Matching by DFA decides as the regex the glob stands for (which is what `explain` and the
    docs describe), on paths that could not make a regex backtrack for long."""
    if glob.startswith("/"):
        return
    assert (tier(glob, path) == 1) is bool(_as_regex(glob).match(path)), (glob, path)


def test_a_glob_that_makes_a_regex_backtrack_forever_is_matched_in_linear_time() -> None:
    """A ref's rules may come from a bundle or a registry. As a backtracking regex, `**/` forty
    times and `x` took exponential time on a path it did not match (ten times: 44 s for one
    path): the harvest of a session, a re-ingest or `tiers explain` of such a ref never ended.
    Run in a child with a time bound, so the old matcher fails instead of hanging the suite."""
    code = (
        "from veloverlay.tiers import Rules, Rule\n"
        "r = Rules([Rule(1, '**/' * 40 + 'x'), Rule(1, '**/a/' * 30 + 'x'), "
        "Rule(1, '*a' * 30 + 'b')])\n"
        "paths = [b'a/' * 2000 + b'b', b'a' * 255, b'a/' * 30 + b'x']\n"
        "print([r.classify(p) for p in paths], [r.explain(p)[0] for p in paths])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, check=True, text=True
    )
    assert out.stdout.split() == ["[2,", "2,", "1]", "[2,", "2,", "1]"]


@pytest.mark.parametrize("glob", ["[]", "[!]", "[^]", "[z-a]", "a[]b"])
def test_a_glob_with_a_bad_class_is_a_usage_error(glob: str) -> None:
    """It was a re.error: a traceback for a tiers file, and for a bundle's or a registry's rules."""
    with pytest.raises(VeloError) as ei:
        Rules([Rule(1, glob)])
    assert ei.value.reason is Reason.USAGE
