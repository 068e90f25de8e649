"""What `doctor` says about remotes: every registry this store pushed to or pulled from, whether it
answers, and how it authenticates (scheme, user and credentials file; never the secret)."""

from __future__ import annotations

from typing import Any

from veloverlay.errors import Reason, VeloError
from veloverlay.remote.auth import find_credentials
from veloverlay.remote.client import Options, Registry
from veloverlay.remote.name import parse_remote
from veloverlay.remote.state import Versions
from veloverlay.store.cas import Store

__all__ = ["check_remotes"]


def check_remotes(store: Store, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for registry, refs in sorted(Versions(store).load().items()):
        repos = sorted({v[0] for v in refs.values() if isinstance(v, list) and v})
        row: dict[str, Any] = {"registry": registry, "ok": False, "auth": None, "user": None}
        row["reason"] = None
        try:
            if not repos:
                raise VeloError("no repository recorded", reason=Reason.NOT_FOUND)
            name = parse_remote(f"{registry}/{repos[0]}")
            creds = find_credentials(name.host, name.repo)
            if creds is not None:
                row["user"] = f"{creds.username} (from {creds.source})"
            with Registry(name, Options(retries=0, timeout=timeout)) as reg:
                reg.ping()
                reg.tags()  # the repository too, with pull access
                row["auth"] = reg.auth_scheme
            row["ok"] = True
        except VeloError as exc:
            row["reason"] = f"{exc.message} ({exc.reason.value})"
        out.append(row)
    return out
