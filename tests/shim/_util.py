"""Shared machinery of the shim tests (the overlay suite's helpers are reused where they fit)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from veloverlay.lower.objects import PROXY_MTIME_NS
from veloverlay.session import SessionOptions, SessionResult
from veloverlay.session.shim import backend as shim_backend
from veloverlay.store.cas import Store

# A PATH every uid can search (root's pyenv shims under /root are not reachable for others).
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
PY = "/usr/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
SNAP = os.path.join(HERE, "snap.py")


def run_shim(store: Store, ref: str, argv: list[str], *, link: bool, **kw: Any) -> SessionResult:
    opts = SessionOptions(refs=[ref], grace=kw.pop("grace", 2.0), **kw)
    opts.link = link  # type: ignore[attr-defined]
    old = os.environ.get("PATH")
    os.environ["PATH"] = SAFE_PATH  # the session's command looks it up; restored for later tests
    try:
        return shim_backend.run_shim(store, opts, argv)
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


def snapshot_cmd(root: str, out: str) -> str:
    """A shell command that writes snapshot(root) as JSON to `out` (run inside the session)."""
    return f"{PY} {SNAP} {root} > {out}"


def load(path: str) -> dict[str, list[Any]]:
    with open(path) as f:
        data: dict[str, list[Any]] = json.load(f)
    return data


def same_as_seen(
    seen: dict[str, list[Any]], committed: dict[str, list[Any]], *, link: bool
) -> list[str]:
    """P0-b: the committed tree equals the tree the session's processes last saw. In --link
    mode an untouched file shows the proxy's normalised mtime; the manifest keeps its own."""
    problems = []
    unlisted = [k[:-2] for k, v in seen.items() if k.endswith("/*")]
    for p in sorted(seen.keys() | committed.keys()):
        if p in seen and seen[p] is None:
            continue  # in a directory the session made unsearchable: only its name was seen
        if any(p != d and (d == "." or p.startswith(d + "/")) for d in unlisted):
            continue  # below a directory the session made unreadable: not seen at all
        a, b = seen.get(p), committed.get(p)
        if a is None or b is None:
            problems.append(f"{p}: seen {a} != committed {b}")
            continue
        if a[0] == "symlink" and "/objects-v2/" in a[3] and b[0] == "file":
            # a Tier-1 file is projected as a symlink to its object: compare the bytes
            with open(a[3], "rb") as f:
                a = ["file", b[1], a[2], hashlib.sha256(f.read()).hexdigest()]
        if link and a[0] == "file" and a[2] == PROXY_MTIME_NS:
            a, b = [*a[:2], None, a[3]], [*b[:2], None, b[3]]
        if a[3] is None or b[3] is None:
            a, b = a[:3], b[:3]
        if a != b:
            problems.append(f"{p}: seen {a} != committed {b}")
    return problems
