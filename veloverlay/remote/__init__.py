"""Remotes: push and pull refs through any OCI registry (see push.py, pull.py, version.py for the
format, pack.py for packs, client.py for the HTTP side, auth.py for credentials)."""

from __future__ import annotations

from .client import Options, Registry
from .name import RemoteName, parse_remote
from .progress import Transfer
from .pull import PullResult, pull
from .push import PushResult, push

__all__ = [
    "Options",
    "Registry",
    "RemoteName",
    "parse_remote",
    "Transfer",
    "push",
    "pull",
    "PushResult",
    "PullResult",
]
