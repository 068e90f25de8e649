"""A ref's version as an OCI artifact: the manifest, its config, and how pull reads them back.

    manifest  application/vnd.oci.image.manifest.v1+json
      artifactType  application/vnd.veloverlay.version.v1
      config        application/vnd.veloverlay.version.config.v1+json  (JSON, below)
      layers        per pack: the pack (…pack.v1, annotation org.veloverlay.pack.kind = nodes |
                    objects, org.veloverlay.pack.index = the index's digest), then its index
                    (…pack.index.v1); per large object: …object.v1 with org.veloverlay.blake3
      annotations   org.opencontainers.image.created, org.veloverlay.ref, org.veloverlay.root

    config    {"format": "veloverlay-version/1", "ref", "root" (BLAKE3 hex of the root node),
               "tiers", "message", "time_ns", "commit" (the pushed commit's id in the source
               store), "parent" (the manifest digest this tag named before the push, or null)}

What history travels: one version per push (its root, message and time), linked to the version
the tag named before (`parent`), so a tag's pushes form a chain a registry keeps as long as their
manifests exist. The source store's own commit log does not travel.
"""

from __future__ import annotations

import json
import re
from typing import Any

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record, field
from veloverlay.remote.client import OCI_MANIFEST, dumps
from veloverlay.remote.pack import MAX_INDEX_ENTRIES, index_bytes_max

__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "PACK_TYPE",
    "INDEX_TYPE",
    "OBJECT_TYPE",
    "Descriptor",
    "PackRef",
    "Version",
    "build_manifest",
    "parse_manifest",
    "parse_config",
]

ARTIFACT_TYPE = "application/vnd.veloverlay.version.v1"
CONFIG_TYPE = "application/vnd.veloverlay.version.config.v1+json"
PACK_TYPE = "application/vnd.veloverlay.pack.v1"
INDEX_TYPE = "application/vnd.veloverlay.pack.index.v1"
OBJECT_TYPE = "application/vnd.veloverlay.object.v1"
FORMAT = "veloverlay-version/1"
A_KIND = "org.veloverlay.pack.kind"
A_INDEX = "org.veloverlay.pack.index"
A_BLAKE3 = "org.veloverlay.blake3"
_SHA = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HEX = re.compile(r"^[0-9a-f]{64}\Z")


class Descriptor(Record, frozen=True):
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


class PackRef(Record, frozen=True):
    """A pack on the remote and its index."""

    kind: str  # "nodes" or "objects"
    pack: Descriptor
    index: Descriptor


class Version(Record):
    digest: str
    config: Descriptor
    packs: list[PackRef] = field(default_factory=list)
    large: dict[bytes, Descriptor] = field(default_factory=dict)  # BLAKE3 -> blob
    annotations: dict[str, str] = field(default_factory=dict)


def build_manifest(
    config: Descriptor,
    packs: list[PackRef],
    large: list[tuple[bytes, Descriptor]],
    annotations: dict[str, str],
) -> bytes:
    layers: list[dict[str, Any]] = []
    for p in packs:
        layers.append(p.pack.to_json())
        layers.append(p.index.to_json())
    for _d, desc in large:
        layers.append(desc.to_json())
    return dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config.to_json(),
            "layers": layers,
            "annotations": annotations,
        }
    )


def _bad(why: str) -> VeloError:
    return VeloError(
        f"the remote manifest is not a veloverlay version: {why}",
        reason=Reason.REMOTE_INVALID,
        hint="pull only what 'veloverlay push' wrote",
    )


def _descriptor(d: object) -> Descriptor:
    if not isinstance(d, dict):
        raise _bad("a descriptor is not an object")
    mt, dg, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(mt, str) or not isinstance(dg, str) or not _SHA.match(dg):
        raise _bad("a descriptor lacks a media type or a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad("a descriptor has a bad size")
    ann = d.get("annotations") or {}
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise _bad("bad annotations")
    return Descriptor(mt, dg, size, tuple(sorted(ann.items())))


def parse_manifest(body: bytes, digest: str, media_type: str) -> Version:
    try:
        m = json.loads(body)
    except (ValueError, RecursionError):  # nesting deeper than the parser goes
        raise _bad("not JSON") from None
    if not isinstance(m, dict):
        raise _bad("not a JSON object")
    if m.get("artifactType") != ARTIFACT_TYPE:
        got = m.get("artifactType") or m.get("mediaType") or media_type
        raise _bad(f"its artifactType is '{got}', not {ARTIFACT_TYPE}")
    config = _descriptor(m.get("config"))
    if config.media_type != CONFIG_TYPE:
        raise _bad(f"config media type '{config.media_type}'")
    layers = m.get("layers")
    if not isinstance(layers, list):
        raise _bad("no layers")
    descs = [_descriptor(x) for x in layers]
    by_digest = {d.digest: d for d in descs}
    v = Version(digest, config)
    ann = m.get("annotations") or {}
    if isinstance(ann, dict):
        v.annotations = {k: w for k, w in ann.items() if isinstance(k, str) and isinstance(w, str)}
    packs_seen: set[str] = set()
    for d in descs:
        a = dict(d.annotations)
        if d.media_type == PACK_TYPE:
            kind, idx = a.get(A_KIND), a.get(A_INDEX)
            if kind not in ("nodes", "objects") or idx not in by_digest:
                raise _bad(f"pack {d.digest} has no index or kind")
            if d.digest in packs_seen:
                # two indexes of one pack could name overlapping entries (read as one list)
                raise _bad(f"pack {d.digest} is listed twice")
            packs_seen.add(d.digest)
            index = by_digest[idx]
            if index.media_type != INDEX_TYPE:
                raise _bad(f"the index of pack {d.digest} has media type '{index.media_type}'")
            v.packs.append(PackRef(kind, d, index))
        elif d.media_type == OBJECT_TYPE:
            hexd = a.get(A_BLAKE3, "")
            if not _HEX.match(hexd):
                raise _bad(f"object blob {d.digest} has no BLAKE3 annotation")
            v.large[bytes.fromhex(hexd)] = d
        elif d.media_type != INDEX_TYPE:
            raise _bad(f"unknown layer media type '{d.media_type}'")
    if sum(p.index.size for p in v.packs) > index_bytes_max(len(v.packs)):
        # each index alone is bounded; a version of thousands of full ones would be read whole
        raise _bad(f"its pack indexes hold more than {MAX_INDEX_ENTRIES:,} entries together")
    return v


def parse_config(data: bytes) -> dict[str, Any]:
    try:
        c = json.loads(data)
    except (ValueError, RecursionError):
        raise _bad("the config is not JSON") from None
    if not isinstance(c, dict) or c.get("format") != FORMAT:
        raise _bad(f"the config's format is not {FORMAT}")
    if not isinstance(c.get("root"), str) or not _HEX.match(c["root"]):
        raise _bad("the config has no root digest")
    return c
