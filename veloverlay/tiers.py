"""Tier rules: which files are Tier-1 (store symlinks, immutable) and which are Tier-2 (overlay).

A rule is `(tier, glob)`. Globs are anchored to the whole relative path: `*` and `?` stay within one
name, `**` spans any number of names (`**/x` also matches `x` at the top), `[...]` is a class.
First match wins; a path no rule matches is Tier-2. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record

__all__ = ["Rule", "Rules", "DEFAULT_RULES", "parse_rules"]

_SUFFIX_RULE = re.compile(r"^\*\*/\*([^*?\[\]/]+)$")


class Rule(Record, frozen=True):
    tier: int
    glob: str
    why: str = ""


# Tier-1 is a symlink into the store: reads cost nothing and writes fail. Programs that resolve
# realpaths (Node's module resolution, Python's venv detection via pyvenv.cfg, $ORIGIN rpaths)
# would see the store path, so code never goes there by default: only large, write-once assets.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(1, "**/*.safetensors", "model weights: large, read-only, never resolved as code"),
    Rule(1, "**/*.gguf", "model weights"),
    Rule(1, "**/*.onnx", "model weights"),
    Rule(1, "**/*.ckpt", "model checkpoints"),
    Rule(
        1, "**/*.pth", "model checkpoints (not Python .pth path files: those live in site-packages)"
    ),
    Rule(2, "**", "everything else is Tier-2: copy-up on write keeps programs working"),
)


def _glob_to_regex(glob: str) -> re.Pattern[bytes]:
    if not glob or glob.startswith("/") or "\0" in glob:
        raise VeloError(f"bad tier glob {glob!r}", reason=Reason.USAGE, hint="globs are relative")
    out = []
    i = 0
    g = glob
    while i < len(g):
        c = g[i]
        if g.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif g.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = g.find("]", i + 1)
            if j < 0:
                raise VeloError(f"unclosed '[' in tier glob {glob!r}", reason=Reason.USAGE)
            body = g[i + 1 : j].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile(("^" + "".join(out) + "$").encode("utf-8", "surrogateescape"), re.DOTALL)


class Rules:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._compiled = [(r, _glob_to_regex(r.glob)) for r in self.rules]
        self._tier1 = any(r.tier == 1 for r in self.rules)
        # Fast path for the common rule shapes (`**/*.ext`, `**`): suffix tests (consecutive
        # suffix rules of one tier share one `endswith(tuple)`) or a constant instead of a regex,
        # in rule order; any other glob keeps its regex.
        self._tests: list[tuple[int, tuple[bytes, ...] | None, re.Pattern[bytes] | None]] = []
        for r, rx in self._compiled:
            m = _SUFFIX_RULE.match(r.glob)
            if r.glob == "**":
                self._tests.append((r.tier, (b"",), None))
            elif m is not None:
                sfx = m.group(1).encode("utf-8", "surrogateescape")
                last = self._tests[-1] if self._tests else None
                if last is not None and last[0] == r.tier and last[1] and last[1] != (b"",):
                    self._tests[-1] = (r.tier, (*last[1], sfx), None)
                else:
                    self._tests.append((r.tier, (sfx,), None))
            else:
                self._tests.append((r.tier, None, rx))

    @classmethod
    def default(cls) -> Rules:
        return cls(DEFAULT_RULES)

    @classmethod
    def from_json(cls, data: list[list[object]] | None) -> Rules:
        if not data:
            return cls.default()
        return cls([Rule(int(str(t)), str(g), str(w)) for t, g, w in data])

    def to_json(self) -> list[list[object]]:
        return [[r.tier, r.glob, r.why] for r in self.rules]

    def explain(self, path: bytes) -> tuple[int, Rule | None]:
        for rule, rx in self._compiled:
            if rx.match(path):
                return rule.tier, rule
        return 2, None

    def classify(self, path: bytes) -> int:
        if not self._tier1:
            return 2
        for tier, suffixes, rx in self._tests:
            if suffixes is not None:
                # `**/*.ext`: `*` may be empty, so any path ending in the suffix matches.
                if path.endswith(suffixes):
                    return tier
            elif rx is not None and rx.match(path):
                return tier
        return 2


def parse_rules(text: str) -> Rules:
    """Parse a tiers file: one `<tier> <glob> [# why]` per line; `#` starts a comment line."""
    rules = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body, _, why = line.partition("#")
        parts = body.split()
        if len(parts) != 2 or parts[0] not in ("1", "2"):
            raise VeloError(
                f"tiers file line {n}: expected '<1|2> <glob>', got {raw!r}", reason=Reason.USAGE
            )
        rules.append(Rule(int(parts[0]), parts[1], why.strip()))
    return Rules(rules)
