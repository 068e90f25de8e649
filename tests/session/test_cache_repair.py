"""`fsck --repair` and the cached lower layers: what fsck finds damaged in a cache is never
mounted again, whichever environment (per-boot base) the repair and the sessions run in.

fsck checks the layers under every base a store's sessions may use (an environment chooses its
own: VELO_RUNTIME_DIR, XDG_RUNTIME_DIR, none under cron); its repair evicted only the ones its own
environment chose, and never those it reported as not showing their manifest's tree."""

from __future__ import annotations

import glob
import os
import time

import pytest

from tests.helpers.trees import unprotect
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import (
    as_mode,
    fsck_ok,
    mode_params,
    new_store,
    run_session,
)
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.lower.homes import layer_homes
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck


def _cache_env(base: str) -> str:
    cache = os.path.join(base, "cache")
    os.mkdir(cache, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = cache
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    return cache


def _repair_elsewhere(store_root: str) -> list[str]:
    """fsck --repair as cron would run it: another per-boot base (none at all here)."""
    from veloverlay.store.cas import Store

    before = os.environ["VELO_RUNTIME_DIR"]
    os.environ["VELO_RUNTIME_DIR"] = "off"
    store = Store.open(store_root)
    m = Manifests(store)
    try:
        rep = fsck(store, m, jobs=1, repair=True)
        return [f"{f.kind} {f.detail}" for f in rep.findings]
    finally:
        m.close()
        os.environ["VELO_RUNTIME_DIR"] = before


def _seen(store: object, at: str, base: str, names: list[str]) -> dict[str, object]:
    """What a session (in the cache's environment) shows: the names at the top, and the bytes
    of `names` (None where the read fails)."""
    out = os.path.join(base, "seen")
    script = f"ls -A {at} > {out}.ls; " + "; ".join(
        f"cat {at}/{n} > {out}.{i} 2>/dev/null || rm -f {out}.{i}" for i, n in enumerate(names)
    )
    r = run_session(store, ["t"], ["sh", "-c", script], at=at, discard=True)  # type: ignore[arg-type]
    assert r.exit_status == 0
    with open(f"{out}.ls") as f:
        shown = sorted(f.read().split())
    data: dict[str, bytes | None] = {}
    for i, n in enumerate(names):
        try:
            with open(f"{out}.{i}", "rb") as f:
                data[n] = f.read()
        except FileNotFoundError:
            data[n] = None
    return {"names": shown, "data": data}


def _planted_layer(base: str) -> dict[str, object]:
    cache = _cache_env(base)
    store, src = new_store(base)
    at = os.path.join(base, "at")
    run_session(store, ["t"], ["true"], at=at, discard=True)
    layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
    assert layers and all(p.startswith(cache) for p in layers), layers
    with open(os.path.join(layers[0], "planted"), "w") as f:
        f.write("evil")
    repaired = _repair_elsewhere(os.fspath(store.root))
    return {
        "repaired": repaired,
        "after": fsck_ok(store),
        "seen": _seen(store, at, base, []),
        "source": sorted(os.listdir(src)),
    }


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_repair_drops_a_cached_layer_that_shows_a_planted_file(mode: str) -> None:
    """The repair reported the planted file and left the layer: the next session showed it."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _planted_layer, base)
    repaired = out["repaired"]
    assert isinstance(repaired, list) and repaired, out
    assert all(r.startswith("layer-mismatch") and "dropped" in r for r in repaired), out
    assert out["after"] == [], out
    seen = out["seen"]
    assert isinstance(seen, dict)
    assert seen["names"] == out["source"], out  # the source tree, nothing planted


def _changed_f1(base: str) -> tuple[object, str, str, bytes]:
    """A Tier-2 file changed by a session reaches the next session's layers as a copy (a delta
    layer cannot hold a metacopy file), made from its object: (store, at, object path, bytes)."""
    _cache_env(base)
    store, _src = new_store(base)
    at = os.path.join(base, "at")
    r = run_session(store, ["t"], ["sh", "-c", f"printf 'ONE, changed\\n' > {at}/f1"], at=at)
    assert r.exit_status == 0
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, "t")
            (entry,) = [
                e for e in m.get_node(txn, bytes.fromhex(c.root)).entries if e.name == b"f1"
            ]
    finally:
        m.close()
    obj = os.fspath(store.object_path(entry.digest))
    with open(obj, "rb") as f:
        right = f.read()
    return store, at, obj, right


def _damage(obj: str) -> None:
    """Damaged in place (root-free, its owner can chmod it; root lifts +i): the same size."""
    unprotect(obj)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"BAD")
    os.chmod(obj, 0o444)


def _delta_copies(store: object) -> list[str]:
    return [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*-on-*/f1")]  # type: ignore[arg-type]


def _corrupt_copy_in_a_delta_layer(base: str) -> dict[str, object]:
    """The next session builds the delta layer (f1 a copy of its object); the object is then
    damaged, and fsck --repair runs in another environment."""
    store, at, obj, right = _changed_f1(base)
    _seen(store, at, base, ["f1"])
    assert _delta_copies(store), "no delta layer holds a copy of f1"
    _damage(obj)
    repaired = _repair_elsewhere(os.fspath(store.root))
    try:
        seen: object = _seen(store, at, base, ["f1", "f2"])
    except VeloError as exc:  # the object is missing now, and said so
        seen = exc.reason.value
    # the right bytes come back with the next ingest of a tree that holds them
    heal = os.path.join(base, "heal")
    os.mkdir(heal)
    with open(os.path.join(heal, "f1"), "wb") as f:
        f.write(right)
    m = Manifests(store)
    try:
        ingest(store, m, heal, "heal", jobs=1)
    finally:
        m.close()
    return {
        "repaired": repaired,
        "right": right,
        "seen": seen,
        "healed": _seen(store, at, base, ["f1"]),
    }


def _delta_from_a_damaged_object(base: str) -> dict[str, object]:
    store, at, obj, _right = _changed_f1(base)
    _damage(obj)
    try:
        seen: object = _seen(store, at, base, ["f1"])
    except VeloError as exc:
        seen = exc.reason.value
    with open(obj, "rb") as f:
        damaged = f.read()
    return {"seen": seen, "copies": _delta_copies(store), "damaged": damaged}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_delta_layer_never_copies_a_damaged_object(mode: str) -> None:
    """The copy of a changed Tier-2 file in a data-only delta layer was checked for its size
    only: an object damaged in place went into the per-boot cache, which outlives the object
    (set aside and fetched again) and which every later session of the version read. The copy
    is hashed now: the session refuses (object-corrupt) and no layer keeps the bytes."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _delta_from_a_damaged_object, base)
    assert out["seen"] == Reason.OBJECT_CORRUPT.value, out
    assert out["copies"] == [], out
    assert isinstance(out["damaged"], bytes) and out["damaged"].startswith(b"BAD"), out


def _proxy_from_a_damaged_object(base: str) -> dict[str, object]:
    """The links form: a Tier-2 file is a hard link to a per-(digest, mode) proxy, a copy of
    its object kept in the store's trees-v1/ and shared by every layer that holds those bytes."""
    _cache_env(base)
    os.environ["VELO_FORCE_LOWER"] = "links"
    store, src = new_store(base)
    with open(os.path.join(src, "f3"), "rb") as f:
        right = f.read()
    obj = os.fspath(store.object_path(hash_bytes(right)))
    _damage(obj)
    try:
        seen: object = _seen(store, os.path.join(base, "at"), base, ["f3"])
    except VeloError as exc:
        seen = exc.reason.value
    proxies = glob.glob(f"{store.root}/trees-v1/proxies/*/{hash_bytes(right).hex()}-*")
    return {"seen": seen, "proxies": proxies}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_links_proxy_is_never_made_from_a_damaged_object(mode: str) -> None:
    """A proxy was copied from its object unchecked (not even its size): it kept the damaged
    bytes in the store's trees-v1/ (across reboots), and a proxy that exists is reused, also
    after the object was set aside and fetched again. Now the copy is hashed first."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _proxy_from_a_damaged_object, base)
    assert out["seen"] == Reason.OBJECT_CORRUPT.value, out
    assert out["proxies"] == [], out


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_repair_evicts_a_copy_of_a_corrupt_object_in_another_environments_cache(
    mode: str,
) -> None:
    """fsck --repair sets the corrupt object aside and evicted the cached layers of its own
    environment only: a session of the usual environment still showed the damaged copy."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _corrupt_copy_in_a_delta_layer, base)
    repaired = out["repaired"]
    assert isinstance(repaired, list)
    assert any(r.startswith("object-corrupt") and "set aside" in r for r in repaired), out
    # missing now (wanted): the session says so, and never shows the damaged bytes
    assert out["seen"] == Reason.OBJECT_MISSING.value, out
    healed = out["healed"]
    assert isinstance(healed, dict)
    assert healed["data"] == {"f1": out["right"]}, out


# --- a store moved or copied keeps no layer built for its old place -----------------------------
GGUF = "model.gguf"  # Tier-1 by the default rules: a link to its object, by absolute path


def _moved_or_copied(base: str, how: str, cache: str) -> dict[str, object]:
    import subprocess

    from veloverlay.store.cas import Store

    if cache == "boot":
        _cache_env(base)
    else:  # every layer in the store's trees-v1/
        os.environ["VELO_RUNTIME_DIR"] = "off"
        os.environ["VELO_FORCE_LOWER"] = "data-only"
    old = os.path.join(base, "a")
    store, src = new_store(old)
    at = os.path.join(base, "at")
    before = _seen(store, at, base, [GGUF])
    new = os.path.join(base, "b")
    if how == "mv":
        os.rename(old, new)
    else:
        subprocess.run(["cp", "-a", old, new], check=True)
        # the original goes on living: its object of that name now holds other bytes
        obj = os.path.join(
            old, "store", os.path.relpath(store.object_path(_gguf(store)), store.root)
        )
        unprotect(obj)
        os.chmod(obj, 0o644)
        with open(obj, "r+b") as f:
            f.write(b"the other store's bytes")
    moved = Store.open(os.path.join(new, "store"))
    with open(os.path.join(new, "src", GGUF), "rb") as f:
        want = f.read()
    return {"before": before, "after": _seen(moved, at, base, [GGUF]), "want": want}


def _gguf(store: object) -> bytes:
    m = Manifests(store)  # type: ignore[arg-type]
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, "t")
            node = m.get_node(txn, bytes.fromhex(c.root))
            (entry,) = [e for e in node.entries if e.name == GGUF.encode()]
            return entry.digest
    finally:
        m.close()


@pytest.mark.parametrize("cache", ["boot", "off"])
@pytest.mark.parametrize("how", ["mv", "cp"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_store_moved_or_copied_shows_its_own_objects(mode: str, how: str, cache: str) -> None:
    """The layers cached for a store (in its trees-v1/, and in the per-boot cache, which is keyed
    by the store root's inode and so follows a `mv`) link Tier-1 files to their objects by
    absolute path: after a move a session showed a dangling link, and a copy's sessions read
    the original store's objects, whatever that store holds now."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _moved_or_copied, base, how, cache)
    want = out["want"]
    for when in ("before", "after"):
        seen = out[when]
        assert isinstance(seen, dict)
        assert seen["data"] == {GGUF: want}, (when, out)


def _moved_then_another_store(base: str) -> dict[str, object]:
    from veloverlay.lower.homes import boot_dir
    from veloverlay.store.cas import Store

    _cache_env(base)
    store, _src = new_store(os.path.join(base, "a"))
    at = os.path.join(base, "at")
    _seen(store, at, base, [GGUF])
    os.rename(os.path.join(base, "a"), os.path.join(base, "b"))
    moved = Store.open(os.path.join(base, "b", "store"))
    _seen(moved, at, base, [GGUF])  # the moved store's session: its per-boot layers
    home = boot_dir(moved.root, create=False)
    assert home is not None
    layers = sorted(os.listdir(home / "objects-v2" / "layers"))
    # another store's first build reaps the directories of stores that are gone
    other, _ = new_store(os.path.join(base, "c"))
    _seen(other, os.path.join(base, "at2"), base, [])
    left = sorted(os.listdir(home / "objects-v2" / "layers")) if home.is_dir() else None
    return {"layers": layers, "left": left}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_moved_stores_per_boot_layers_are_not_reaped_as_a_gone_stores(mode: str) -> None:
    """The per-boot directory of a store follows a `mv` (it is keyed by the root's inode), but
    its note kept the old path: the next build of any other store removed it as the directory
    of a store that no longer exists — under the running sessions of the moved store."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _moved_then_another_store, base)
    assert out["layers"] and out["left"] == out["layers"], out


# --- fsck --repair while a session runs ------------------------------------------------------
def _repair_during_a_session(base: str, plant: bool) -> dict[str, object]:
    """A session of `t` runs; meanwhile an object of another ref is found damaged and fsck
    --repair sets it aside, evicting cached layers (`plant`: a file planted in a directory of the
    session's own layer makes fsck drop that stack; one planted at its top would not be mounted:
    the stack no longer matches its stamp and is built again). The session lists its tree before
    and after (it waits for the repair to finish: a file the repairing process makes)."""
    _cache_env(base)
    store, src = new_store(base)
    if plant:
        run_session(store, ["t"], ["true"], at=os.path.join(base, "at"), discard=True)
        (layer,) = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
        with open(os.path.join(layer, "d", "planted"), "w") as f:
            f.write("evil")
    other = os.path.join(base, "other")
    os.mkdir(other)
    with open(os.path.join(other, "z"), "wb") as f:
        f.write(b"damaged later\n")
    m = Manifests(store)
    try:
        ingest(store, m, other, "o", jobs=1)
    finally:
        m.close()
    _damage(os.fspath(store.object_path(hash_bytes(b"damaged later\n"))))
    at, out = os.path.join(base, "at"), os.path.join(base, "out")
    ready, go = os.path.join(base, "ready"), os.path.join(base, "go")
    pid = os.fork()
    if pid == 0:  # the repair, in its own process, once the session has started
        code = 1
        try:
            for _ in range(6000):
                if os.path.exists(ready):
                    break
                time.sleep(0.01)
            with open(os.path.join(base, "repaired"), "w") as f:
                f.write("\n".join(_repair_elsewhere(os.fspath(store.root))))
            code = 0
        finally:
            with open(go, "w"):
                pass
            os._exit(code)
    script = (
        f"ls -A {at} {at}/d > {out}.1; touch {ready}; i=0; "
        f"while [ ! -e {go} ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done; "
        f"ls -A {at} {at}/d > {out}.2; cat {at}/f1 > {out}.3"
    )
    r = run_session(store, ["t"], ["sh", "-c", script], at=at, discard=True)
    _pid, status = os.waitpid(pid, 0)
    seen = []
    for i in (1, 2, 3):
        with open(f"{out}.{i}", "rb") as f:
            seen.append(f.read())
    with open(os.path.join(base, "repaired")) as f:
        repaired = f.read()
    return {
        "exit": (r.exit_status, status),
        "before": sorted(seen[0].split()),
        "after": sorted(seen[1].split()),
        "f1": seen[2],
        "source": sorted(
            [os.fsencode(n) for n in os.listdir(src) + os.listdir(os.path.join(src, "d"))]
            + [os.fsencode(at) + b":", os.fsencode(at) + b"/d:"]
        ),
        "repaired": repaired,
    }


@pytest.mark.parametrize("plant", [False, True], ids=["set-aside", "bad-stack"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_repair_during_a_session_leaves_its_mounted_layers(mode: str, plant: bool) -> None:
    """Setting a damaged object aside evicted every cached layer, also those a running session
    had mounted, and a stack fsck found bad was removed under the session using it: that
    session's whole tree vanished under it (ls showed nothing, reads were ENOENT). Layers of
    live sessions' roots stay on disk now; a bad stack a session uses is reported, not
    dropped, until it ends (dropping only its record would have the next build keep it)."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _repair_during_a_session, base, plant)
    assert out["exit"] == (0, 0), out
    repaired = out["repaired"]
    assert isinstance(repaired, str) and "set aside" in repaired, out
    source = out["source"]
    assert isinstance(source, list)
    assert out["before"] == sorted([*source, b"planted"] if plant else source), out
    assert out["after"] == out["before"], out
    assert out["f1"] == b"one\n", out
    if plant:
        assert "not dropped: a running session" in repaired, out


def _layer_left_without_stack(base: str) -> dict[str, object]:
    """A layer published, its stack never written (the build was killed in between; or an
    older veloverlay built it), then changed by its owner: the next build of that root found
    a layer of its name in place and kept it."""
    cache = _cache_env(base)
    store, src = new_store(base)
    at = os.path.join(base, "at")
    run_session(store, ["t"], ["true"], at=at, discard=True)
    [layer] = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
    [stack] = [p for h in layer_homes(store) for p in glob.glob(f"{h}/stacks/*.json")]
    assert layer.startswith(cache), layer
    os.unlink(stack)
    with open(os.path.join(layer, "planted"), "w") as f:
        f.write("evil")
    os.unlink(os.path.join(layer, "f1"))
    with open(os.path.join(layer, "f1"), "wb") as f:
        f.write(b"not one\n")
    os.utime(os.path.join(layer, "f1"), ns=(os.stat(os.path.join(src, "f1")).st_mtime_ns,) * 2)
    with open(os.path.join(src, "f1"), "rb") as f:
        f1 = f.read()
    return {"seen": _seen(store, at, base, ["f1"]), "source": sorted(os.listdir(src)), "f1": f1}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_layer_found_without_its_stack_is_never_mounted(mode: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _layer_left_without_stack, base)
    seen = out["seen"]
    assert isinstance(seen, dict)
    assert seen["names"] == out["source"], out  # nothing planted
    assert seen["data"] == {"f1": out["f1"]}, out  # the manifest's bytes
