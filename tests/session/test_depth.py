"""Deep trees in sessions (issue 14, item 3): a session that makes a tree deeper than the bound
is refused with `too-deep` (kept, never a RecursionError), one within it is harvested exactly; a
ref deeper than the bound (a store from before it) is refused before any layer is built, and
leaves nothing in the layer cache."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, new_store, run_session
from veloverlay.paths import DEPTH_MAX

MAKE = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    os.mkdir('q', dir_fd=fd)\n"
    "    c = os.open('q', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\n"
    "    os.close(fd); fd = c\n"
    "os.close(os.open('f', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n"
)


def _deep_session(base: str, levels: int, backend: str) -> dict[str, object]:
    from veloverlay.errors import VeloError

    store, _src = new_store(base)
    script = os.path.join(base, "make.py")
    with open(script, "w") as f:
        f.write(MAKE)
    at = os.path.join(base, "at")
    out: dict[str, object] = {}
    try:
        r = run_session(
            store, ["t"], [sys.executable, script, at, str(levels)], at=at, backend=backend
        )
        out["exit"] = r.exit_status
    except VeloError as exc:
        out["reason"] = exc.reason.value
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    deep = os.path.join(got, *(["q"] * levels), "f") if levels < 300 else ""
    out["harvested"] = bool(deep) and os.path.exists(deep)
    # the next session of the ref works (elsewhere: a kept shim session still holds `at`)
    r = run_session(store, ["t"], ["true"], at=at + "2", discard=True, backend=backend)
    out["next"] = r.exit_status
    return out


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_deeper_than_the_bound_is_too_deep(mode: str, backend: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_session, base, DEPTH_MAX + 40, backend)
    assert out.get("reason") == "too-deep", out
    assert out["next"] == 0


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_within_the_bound_is_harvested(mode: str, backend: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_session, base, DEPTH_MAX - 2, backend)
    assert out.get("exit") == 0 and out["harvested"], out
    assert out["next"] == 0


def _old_deep_ref(base: str) -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.lower.homes import layer_homes
    from veloverlay.store.manifest import Manifests
    from veloverlay.store.tree import Entry, Kind

    store, _src = new_store(base)
    m = Manifests(store)
    try:
        with m.write() as txn:  # written straight into the database, as an older build could
            d = m.put_node(txn, 0o755, 1, [])
            for _ in range(2000):
                d = m.put_node(txn, 0o755, 1, [Entry(b"d", Kind.DIR, digest=d)])
            m.commit(txn, "deep", d, expect_head=None, message="deep", path=None)
    finally:
        m.close()
    reasons = []
    for _ in range(2):
        try:
            run_session(store, ["deep"], ["true"], at=os.path.join(base, "at"), discard=True)
            reasons.append("ran")
        except VeloError as exc:
            reasons.append(exc.reason.value)
    left = [
        os.path.join(h, sub, n)
        for h in layer_homes(store)
        for sub in ("layers", "tmp")
        if os.path.isdir(os.path.join(h, sub))
        for n in os.listdir(os.path.join(h, sub))
        if "deep" in n or n.endswith(tuple("0123456789abcdef"))
    ]
    return {"reasons": reasons, "left": left}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_ref_beyond_the_bound_builds_nothing(mode: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _old_deep_ref, base)
    assert out["reasons"] == ["too-deep", "too-deep"], out
