"""Remotes: push and pull refs through any OCI registry.

Owns the registry client (`client`, with `transport` and `challenge`: the modules that import
httpx; `auth`: credential files and parsing challenges; `challenge`: answering them), the
artifact and pack formats (`version`, `pack`), `push` and `pull`, and
what a store remembers about remotes (`state`: `<store>/remote-v1/`). May import the store (and
ingest); the session core imports it to pull a remote ref before a session starts. The format
and guarantees: docs/remote.md."""

from __future__ import annotations

from veloverlay.remote.client import Options, Registry
from veloverlay.remote.name import RemoteName, parse_remote
from veloverlay.remote.progress import Transfer
from veloverlay.remote.pull import PullResult, pull
from veloverlay.remote.push import PushResult, push

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
