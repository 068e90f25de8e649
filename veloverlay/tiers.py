"""Tier rules: which files are Tier-1 (store symlinks, immutable) and which are Tier-2 (overlay).

A rule is `(tier, glob)`. Globs are anchored to the whole relative path: `*` and `?` stay within one
name, `**` spans any number of names (`**/x` also matches `x` at the top), `[...]` is a class.
First match wins; a path no rule matches is Tier-2. Pure: no I/O.
"""

from __future__ import annotations

import re
import threading
import warnings
from array import array
from collections.abc import Sequence

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record

__all__ = ["Rule", "Rules", "DEFAULT_RULES", "parse_rules"]

_SUFFIX_RULE = r"^\*\*/\*([^*?\[\]/]+)\Z"  # (compiled at first use: re caches)
_LITERAL_TAIL = r"[^*?\[\]\\/]+\Z"


class Rule(Record, frozen=True):
    tier: int
    glob: str
    why: str = ""


# Tier-1 is a symlink into the store: reads cost nothing and writes fail. Programs that resolve
# realpaths (Node's module resolution, Python's venv detection via pyvenv.cfg, $ORIGIN rpaths)
# would see the store path, so code never goes there by default: only large, write-once assets.
# Python's path configuration files are `.pth` files too, directly in a site directory (every
# venv with setuptools has one; tools append to them in place): first match wins, so they are
# kept Tier-2 before PyTorch's `.pth` checkpoints go to Tier-1.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(2, "**/site-packages/*.pth", "Python path files, which programs append to"),
    Rule(2, "**/dist-packages/*.pth", "Python path files (Debian's site directories)"),
    Rule(1, "**/*.safetensors", "model weights: large, read-only, never resolved as code"),
    Rule(1, "**/*.gguf", "model weights"),
    Rule(1, "**/*.onnx", "model weights"),
    Rule(1, "**/*.ckpt", "model checkpoints"),
    Rule(1, "**/*.pth", "model checkpoints (Python path files in a site directory: above)"),
    Rule(2, "**", "everything else is Tier-2: copy-up on write keeps programs working"),
)


# Glob tokens (`_Glob`)
_LIT, _ONE, _CLASS, _STAR, _ANY, _DIRS = range(6)  # byte, ?, [...], *, ** (any), **/ (names)
_LOOPS = (_STAR, _ANY, _DIRS)  # tokens that may match nothing
_SLASH = ord("/")
_MAX_STATES = 256  # DFA states kept per glob (1 KiB each); past them a match runs uncached


def _bad_glob(glob: str, why: str) -> VeloError:
    return VeloError(f"{why} in tier glob '{glob}'", reason=Reason.USAGE, hint="globs are relative")


def _class_table(glob: str, body: str) -> bytes:
    """Which bytes the class `[body]` matches, as a 256-byte table (1: matches)."""
    body = body.replace("\\", "\\\\")
    if body.startswith("!"):
        body = "^" + body[1:]
    try:
        with warnings.catch_warnings():  # ("possible nested set": literal as compiled)
            warnings.simplefilter("ignore")
            rx = re.compile(f"[{body}]".encode("utf-8", "surrogateescape"), re.DOTALL)
    except re.error as exc:
        raise _bad_glob(glob, f"a bad class ({exc})") from None
    return bytes(1 if rx.fullmatch(bytes([c])) else 0 for c in range(256))


class _Glob:
    """One glob, matched against a path's bytes by a DFA built as paths need it: time linear in
    the path whatever the glob. (A backtracking regex of `**/**/…/**/x` takes exponential time
    on a path it does not match, and a ref's rules may come from a bundle or a registry.)

    The NFA: state i < n is "before token i", n is "matched all", n + 1 + i is "inside a name of
    the `**/` token i"; a DFA state is a set of those, interned as an index (0: none left)."""

    def __init__(self, glob: str) -> None:
        if not glob or glob.startswith("/") or "\0" in glob:
            raise _bad_glob(glob, "a bad start or a NUL")
        toks: list[tuple[int, int | bytes]] = []
        g, i = glob, 0
        while i < len(g):
            if g.startswith("**/", i):
                if not toks or toks[-1][0] != _DIRS:  # (`**/**/` is `**/`)
                    toks.append((_DIRS, 0))
                i += 3
            elif g.startswith("**", i):
                toks.append((_ANY, 0))
                i += 2
            elif g[i] == "*":
                toks.append((_STAR, 0))
                i += 1
            elif g[i] == "?":
                toks.append((_ONE, 0))
                i += 1
            elif g[i] == "[":
                j = g.find("]", i + 1)
                if j < 0:
                    raise _bad_glob(glob, "an unclosed '['")
                toks.append((_CLASS, _class_table(glob, g[i + 1 : j])))
                i = j + 1
            else:
                toks += [(_LIT, b) for b in g[i].encode("utf-8", "surrogateescape")]
                i += 1
        self.toks = toks
        self.n = len(toks)
        self._lock = threading.Lock()
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._rows: list[array[int]] = []
        self._accept: list[bool] = []
        self._intern(frozenset())
        self._intern(self._closure({0}))

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo = list(states)
        while todo:
            s = todo.pop()
            if s < self.n and self.toks[s][0] in _LOOPS and s + 1 not in states:
                states.add(s + 1)
                todo.append(s + 1)
        return frozenset(states)

    def _step(self, states: frozenset[int], c: int) -> frozenset[int]:
        n, out = self.n, set()
        for s in states:
            if s > n:  # inside a name of `**/`: more of it, or its slash ends it
                out.add(s - n - 1 if c == _SLASH else s)
                continue
            if s == n:
                continue
            kind, arg = self.toks[s]
            if kind == _LIT:
                if c == arg:
                    out.add(s + 1)
            elif kind == _ONE:
                if c != _SLASH:
                    out.add(s + 1)
            elif kind == _CLASS:
                if arg[c]:  # type: ignore[index]
                    out.add(s + 1)
            elif kind == _STAR:
                if c != _SLASH:
                    out.add(s)
            elif kind == _ANY:
                out.add(s)
            else:  # _DIRS: an empty name and its slash, or the start of a name
                out.add(s if c == _SLASH else n + 1 + s)
        return self._closure(out)

    def _intern(self, states: frozenset[int]) -> int | None:
        got = self._ids.get(states)
        if got is None:
            if len(self._sets) >= _MAX_STATES:
                return None
            got = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._rows.append(array("i", [-1]) * 256)
            self._accept.append(self.n in states)
        return got

    def match(self, path: bytes) -> bool:
        s, rows = 1, self._rows
        for k, c in enumerate(path):
            nxt = rows[s][c]
            if nxt < 0:
                with self._lock:
                    got = self._intern(self._step(self._sets[s], c))
                    if got is None:  # too many states: the rest without the cache
                        return self._slow(self._sets[s], path[k:])
                    rows[s][c] = nxt = got
            if not nxt:
                return False
            s = nxt
        return self._accept[s]

    def _slow(self, states: frozenset[int], rest: bytes) -> bool:
        for c in rest:
            states = self._step(states, c)
            if not states:
                return False
        return self.n in states


class Rules:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._compiled = [(r, _Glob(r.glob)) for r in self.rules]
        self._tier1 = any(r.tier == 1 for r in self.rules)
        # Fast path for the common rule shapes (`**/*.ext`, `**`): suffix tests (consecutive
        # suffix rules of one tier share one `endswith(tuple)`) or a constant instead of a regex,
        # in rule order; any other glob keeps its regex, tried only on paths that end in its
        # literal tail (`**/site-packages/*.pth`: `.pth`), as every path it matches does.
        self._tests: list[tuple[int, tuple[bytes, ...] | None, _Glob | None]] = []
        for r, rx in self._compiled:
            m = re.match(_SUFFIX_RULE, r.glob)
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
                tail = re.search(_LITERAL_TAIL, r.glob)
                need = tail.group(0).encode("utf-8", "surrogateescape") if tail else b""
                self._tests.append((r.tier, (need,) if need else None, rx))

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
            if suffixes is not None and not path.endswith(suffixes):
                continue
            # `**/*.ext`: `*` may be empty, so any path ending in the suffix matches.
            if rx is None or rx.match(path):
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
                f"tiers file line {n}: expected '<1|2> <glob>', got '{raw}'", reason=Reason.USAGE
            )
        rules.append(Rule(int(parts[0]), parts[1], why.strip()))
    return Rules(rules)
