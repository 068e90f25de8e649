"""P0-a on the shim backend: writers that bypass the shim (a static binary, raw syscalls,
chmod-then-write) cannot change a store object in the default (copy) mode; in --link mode the
same attack changes a shared proxy, which verify_proxies (fsck) detects — the documented limit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, fsck_ok, new_store
from tests.shim._util import run_shim
from veloverlay.session.shim.materialize import verify_proxies
from veloverlay.store.cas import Store


def _objects(store: Store) -> dict[str, str]:
    out = {}
    for name, path in store.iter_objects():
        with open(path, "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _attack(base: str, link: bool, exe: str) -> tuple[bool, list[str], list[str], bytes, list[str]]:
    store, _src = new_store(base)
    before = _objects(store)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj}; {exe} raw_write f1 -- raw_chmod_write f3 -- raw_chmod_write exec.sh; "
        # a shimmed process writing through the Tier-1 symlink is refused (EROFS)
        "if printf x >> model.gguf; then exit 9; fi"
    )
    res = run_shim(store, "t", ["sh", "-c", script], link=link, at=proj)
    assert res.exit_status == 0, res
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    f1 = Path(got, "f1").read_bytes()
    findings = [f"{f.kind} {f.path}" for f in verify_proxies(store)]
    after = _objects(store)
    same = all(after.get(name) == h for name, h in before.items())
    return same, fsck_ok(store), findings, f1, res.warnings


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_copy_mode_objects_cannot_be_reached(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        same, fsck, proxies, f1, warnings = as_mode(
            mode, _attack, base, False, os.fspath(try_syscall)
        )
    assert same, "an object changed"
    assert not fsck and not proxies
    assert f1 == b"raw\n"  # the session's own tree changed, and the stat-diff committed it
    assert any("refused" in w for w in warnings), warnings


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_link_mode_attack_is_detected(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        same, fsck, proxies, f1, _w = as_mode(mode, _attack, base, True, os.fspath(try_syscall))
    assert same, "objects are never linked, even in --link mode"
    assert any(p.startswith("proxy-corrupt") for p in proxies), proxies
    # fsck reports it too (the documented limit of --link is detection), and nothing else.
    assert fsck and all(f.startswith("proxy-corrupt") for f in fsck), fsck
    assert f1 == b"raw\n"
