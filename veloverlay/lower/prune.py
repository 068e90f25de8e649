"""Evicting cached layers, stacks and proxies no kept root needs (for gc), and the stacks fsck
found damaged (for `fsck --repair`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from veloverlay.files import force_rmtree, read_regular
from veloverlay.lower.homes import Home, boot_home, disk_home, layer_homes, trees_dir
from veloverlay.store.cas import Store

__all__ = ["prune", "drop_stacks"]


def _homes(store: Store, everywhere: bool) -> list[Home]:
    """The store's own home and this user's per-boot one for it; `everywhere`: every per-boot
    base its layers may lie under (`layer_homes`: sessions of another environment use those)."""
    if everywhere:
        return [Home(p, p != store.trees) for p in layer_homes(store)]
    homes = [disk_home(store)]
    if (fast := boot_home(store)) is not None:
        homes.append(fast)
    return homes


def prune(
    store: Store, keep: set[bytes], *, everywhere: bool = False, mounted: Iterable[str] = ()
) -> int:
    """Evict cached layers: stacks of roots not in `keep`, layers no stack uses, proxies no
    layer links — in the store and in this user's per-boot cache for it (`everywhere`: in each
    per-boot base, as fsck --repair must: what it evicts must not be found by the sessions of
    another environment). For `gc` and `fsck --repair`, which hold the store lock exclusively
    (no session can be starting); `keep` must hold the roots of running sessions (their state
    files' roots): their layers are mounted, and overlayfs shows a lower's files vanishing under
    a session (its whole tree, measured). `mounted`: the layer paths unfinished sessions
    recorded (their state files' `layers`), kept whether a stack names them or not — a stack
    rebuilt since (of another `STACK_FORMAT`, or dropped by fsck) no longer names the layers an
    older session still has mounted. Returns the number of layers removed."""
    held = _held(mounted)
    removed = sum(_prune_home(home, keep, held=held) for home in _homes(store, everywhere))
    _prune_proxies(store)
    return removed


def drop_stacks(
    store: Store,
    bad: set[Path],
    hold: frozenset[bytes] = frozenset(),
    mounted: Iterable[str] = (),
) -> set[Path]:
    """For `fsck --repair`: remove the stack records `bad` (their layers do not show their
    manifest's tree) and every layer that no other stack of its home uses, so the next session
    builds them again from the store (a build that finds a layer of its name in place puts its
    own beside it, `layers.publish_layer`). A stack of a root in `hold` (a running session has
    its layers mounted) is left as it is: removing them would empty that session's tree under
    it, and dropping the record alone would leave them to the next gc, which evicts layers no
    stack names, under the running session. The caller holds the store lock exclusively.
    Layers in `mounted` (see `prune`) stay too. Returns the records left for that reason."""
    held = {p for p in bad if _stack_root(p) in hold}
    layers = _held(mounted)
    for home in _homes(store, True):
        mine = {p for p in bad - held if p.parent == home.sub("stacks")}
        if mine:
            _prune_home(home, None, drop=mine, held=layers)
    _prune_proxies(store)
    return held


def _stack_root(path: Path) -> bytes | None:
    try:
        return bytes.fromhex(json.loads(read_regular(path))["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune_proxies(store: Store) -> None:
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(trees_dir(store, "proxies")):
            for proxy in os.scandir(shard.path):
                if proxy.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(proxy.path)


def _held(mounted: Iterable[str]) -> set[tuple[int, int, str]]:
    """The layers in `mounted` (paths) as (dev, ino of their parent directory, name): a
    session may have named the store by another path (a symbolic link to it, a relative one)."""
    out: set[tuple[int, int, str]] = set()
    for path in mounted:
        parent, name = os.path.split(os.fspath(path))
        try:
            st = os.stat(parent or ".")
        except ValueError:  # (a NUL in a state file's path)
            continue
        except OSError:  # its directory is gone: a per-boot cache after a reboot (nothing to
            out.add((-1, -1, name))  # keep), or a store moved under a running session: its
            continue  # layers are kept by name, wherever they are (-1: any home)
        out.add((st.st_dev, st.st_ino, name))
    return out


def _prune_home(
    home: Home,
    keep: set[bytes] | None,
    drop: frozenset[Path] | set[Path] = frozenset(),
    held: set[tuple[int, int, str]] | frozenset[tuple[int, int, str]] = frozenset(),
) -> int:
    """Remove the stacks of roots not in `keep` (None: all kept) and those in `drop`, then the
    layers no remaining stack uses and that are not `held` (`_held`)."""
    stacks, layers = home.sub("stacks"), home.sub("layers")
    used: set[str] = set()
    with contextlib.suppress(OSError):
        st = os.stat(layers)
        here = ((st.st_dev, st.st_ino), (-1, -1))
        used |= {n for dev, ino, n in held if (dev, ino) in here}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(stacks):
            path = stacks / name
            try:
                data = json.loads(read_regular(path))
                root = bytes.fromhex(data["root"])
                names = {str(n) for n in data.get("layers", [])}
            except (OSError, ValueError, KeyError, TypeError):
                if path in drop:
                    path.unlink()
                continue
            if path in drop or (keep is not None and root not in keep):
                path.unlink()
            else:
                used |= names
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(layers):
            if name not in used:
                force_rmtree(layers / name)
                removed += 1
    return removed
