"""Evicting cached layers, stacks and proxies no kept root needs (for gc), and the stacks fsck
found damaged (for `fsck --repair`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from veloverlay.files import force_rmtree
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


def prune(store: Store, keep: set[bytes], *, everywhere: bool = False) -> int:
    """Evict cached layers: stacks of roots not in `keep`, layers no stack uses, proxies no
    layer links — in the store and in this user's per-boot cache for it (`everywhere`: in each
    per-boot base, as fsck --repair must: what it evicts must not be found by the sessions of
    another environment). For `gc` and `fsck --repair`, which hold the store lock exclusively
    (no session can be starting); `keep` must hold the roots of running sessions (their state
    files' roots): their layers are mounted, and overlayfs shows a lower's files vanishing under
    a session (its whole tree, measured). Returns the number of layers removed."""
    removed = sum(_prune_home(home, keep) for home in _homes(store, everywhere))
    _prune_proxies(store)
    return removed


def drop_stacks(store: Store, bad: set[Path], hold: frozenset[bytes] = frozenset()) -> set[Path]:
    """For `fsck --repair`: remove the stack records `bad` (their layers do not show their
    manifest's tree) and every layer that no other stack of its home uses, so the next session
    builds them again from the store (a build that finds a layer of its name in place puts its
    own beside it, `layers.publish_layer`). A stack of a root in `hold` (a running session has
    its layers mounted) is left as it is: removing them would empty that session's tree under
    it, and dropping the record alone would leave them to the next gc, which evicts layers no
    stack names, under the running session. The caller holds the store lock exclusively.
    Returns the records left for that reason."""
    held = {p for p in bad if _stack_root(p) in hold}
    for home in _homes(store, True):
        mine = {p for p in bad - held if p.parent == home.sub("stacks")}
        if mine:
            _prune_home(home, None, drop=mine)
    _prune_proxies(store)
    return held


def _stack_root(path: Path) -> bytes | None:
    try:
        return bytes.fromhex(json.loads(path.read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune_proxies(store: Store) -> None:
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(trees_dir(store, "proxies")):
            for proxy in os.scandir(shard.path):
                if proxy.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(proxy.path)


def _prune_home(
    home: Home, keep: set[bytes] | None, drop: frozenset[Path] | set[Path] = frozenset()
) -> int:
    """Remove the stacks of roots not in `keep` (None: all kept) and those in `drop`, then the
    layers no remaining stack uses."""
    stacks, layers = home.sub("stacks"), home.sub("layers")
    used: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(stacks):
            path = stacks / name
            try:
                data = json.loads(path.read_text())
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
