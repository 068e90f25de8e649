"""Evicting cached layers, stacks and proxies no kept root needs (for gc)."""

from __future__ import annotations

import contextlib
import json
import os

from veloverlay.files import force_rmtree
from veloverlay.lower.homes import Home, boot_home, disk_home, trees_dir
from veloverlay.store.cas import Store

__all__ = ["prune"]


def prune(store: Store, keep: set[bytes]) -> int:
    """Evict cached layers: stacks of roots not in `keep`, layers no stack uses, proxies no
    layer links — in the store and in this user's per-boot cache for it. For `gc`, which holds
    the store lock exclusively (no session can be starting); a running session keeps its layers
    mounted whatever happens to their names. Returns the number of layers removed."""
    homes = [disk_home(store)]
    if (fast := boot_home(store)) is not None:
        homes.append(fast)
    removed = sum(_prune_home(home, keep) for home in homes)
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(trees_dir(store, "proxies")):
            for proxy in os.scandir(shard.path):
                if proxy.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(proxy.path)
    return removed


def _prune_home(home: Home, keep: set[bytes]) -> int:
    stacks, layers = home.sub("stacks"), home.sub("layers")
    used: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(stacks):
            path = stacks / name
            try:
                data = json.loads(path.read_text())
                root = bytes.fromhex(data["root"])
            except (OSError, ValueError, KeyError):
                continue
            if root in keep:
                used.update(str(n) for n in data.get("layers", []))
            else:
                path.unlink()
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(layers):
            if name not in used:
                force_rmtree(layers / name)
                removed += 1
    return removed
