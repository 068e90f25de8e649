"""What `doctor` says about remotes: every registry this store pushed to or pulled from, whether it
answers, and how it authenticates (scheme, user and credentials file; never the secret).

`doctor` must answer in bounded time whatever the registries do: they are asked at once, each in
a thread of its own, with no retries and a short timeout, the tag list's first page only, and a
registry (or credential helper) still busy at the deadline is reported as not answering."""

from __future__ import annotations

import threading
import time
from typing import Any

from veloverlay.errors import Reason, VeloError
from veloverlay.remote.auth import find_credentials
from veloverlay.remote.client import Options, Registry
from veloverlay.remote.name import parse_remote
from veloverlay.remote.state import Versions
from veloverlay.store.cas import Store

__all__ = ["check_remotes", "DEADLINE"]

DEADLINE = 12.0  # seconds for all registries together


def _check(registry: str, repos: list[str], timeout: float) -> dict[str, Any]:
    row: dict[str, Any] = {"registry": registry, "ok": False, "auth": None, "user": None}
    row["reason"] = None
    try:
        if not repos:
            raise VeloError("no repository recorded", reason=Reason.NOT_FOUND)
        name = parse_remote(f"{registry}/{repos[0]}")
        creds = find_credentials(name.host, name.repo)
        if creds is not None:
            row["user"] = f"{creds.username} (from {creds.source})"
        # a body slower than 1 KiB/s is cut after `timeout` s, not after the usual minute
        opts = Options(retries=0, timeout=timeout, low_speed_time=timeout)
        with Registry(name, opts) as reg:
            reg.ping()
            # the repository too, with pull access: the tag list's first page is enough
            reg.request("GET", reg.url("tags/list"), expect=(200, 404))
            row["auth"] = reg.auth_scheme
        row["ok"] = True
    except VeloError as exc:
        row["reason"] = f"{exc.message} ({exc.reason.value})"
    return row


def check_remotes(
    store: Store, *, timeout: float = 5.0, deadline: float = DEADLINE
) -> list[dict[str, Any]]:
    todo = []
    notes: dict[str, Any] = dict(Versions(store).load())  # (the store's file: any shape)
    for registry, refs in sorted(notes.items()):
        known = refs.values() if isinstance(refs, dict) else ()
        names = {v[0] for v in known if isinstance(v, list) and v and isinstance(v[0], str)}
        todo.append((registry, sorted(names)))
    results: list[dict[str, Any] | None] = [None] * len(todo)

    def run(i: int, registry: str, repos: list[str]) -> None:
        results[i] = _check(registry, repos, timeout)

    threads = []
    for i, (registry, repos) in enumerate(todo):
        # daemon: a registry that never answers must not hold the process at exit either
        t = threading.Thread(target=run, args=(i, registry, repos), daemon=True)
        t.start()
        threads.append(t)
    end = time.monotonic() + deadline
    out: list[dict[str, Any]] = []
    for i, t in enumerate(threads):
        t.join(max(0.0, end - time.monotonic()))
        row = results[i]
        if row is None:
            row = {"registry": todo[i][0], "ok": False, "auth": None, "user": None}
            row["reason"] = f"no answer within {deadline:g} s ({Reason.REMOTE_UNREACHABLE.value})"
        out.append(row)
    return out
