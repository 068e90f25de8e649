"""A registry that lies: an in-process HTTP server speaking enough of the distribution API for a
pull or a push (blobs with ranges, manifests, monolithic uploads), whose answers a test can replace
with a hook, and helpers that craft a veloverlay version (nodes, packs, config, manifest)
directly, so a test can serve what no honest push would make. Stopped by the fixture that
started it."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from veloverlay.remote.client import dumps
from veloverlay.remote.pack import KIND_NODE, KIND_OBJECT, PackWriter
from veloverlay.remote.version import (
    A_INDEX,
    A_KIND,
    CONFIG_TYPE,
    INDEX_TYPE,
    PACK_TYPE,
    Descriptor,
    PackRef,
    build_manifest,
)
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


Hook = Callable[["Handler", str], bool]  # (handler, method) -> True when it answered


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeRegistry

    def log_message(self, *args: Any) -> None:
        pass

    def send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        hs = dict(headers or {})
        hs.setdefault("Content-Length", str(len(body)))
        for k, v in hs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        fake = self.fake
        fake.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        if fake.hook is not None and fake.hook(self, self.command):
            return
        path = self.path.split("?")[0]
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if path == "/v2/":
            return self.send(200, b"{}")
        m = re.match(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$", path)
        if m and self.command in ("GET", "HEAD"):
            data = fake.blobs.get(m.group(2))
            if data is None:
                return self.send(404)
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                a, b = map(int, rng.split("=")[1].split("-"))
                return self.send(
                    206, data[a : b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
                )
            return self.send(200, data, {"Content-Length": str(len(data))})
        if self.command == "POST" and path.endswith("/blobs/uploads/"):
            return self.send(202, headers={"Location": f"/upload/{uuid.uuid4().hex}"})
        if self.command == "PUT" and path.startswith("/upload/"):
            fake.blobs[self.path.split("digest=")[1]] = body
            return self.send(201)
        m = re.match(r"^/v2/(.+)/manifests/(.+)$", path)
        if m and self.command == "PUT":  # refused if it names a blob not held, as distribution
            named = json.loads(body)
            for desc in [named["config"], *named["layers"]]:
                if desc["digest"] not in fake.blobs:
                    err = {"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "detail": desc["digest"]}]}
                    return self.send(400, json.dumps(err).encode())
            fake.manifests[m.group(2)] = fake.manifests[sha(body)] = body
            return self.send(201, headers={"Docker-Content-Digest": sha(body)})
        if m and self.command == "GET":
            hit = fake.manifests.get(m.group(2))
            if hit is None:
                return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            return self.send(200, hit, {"Content-Type": OCI_MANIFEST})
        return self.send(404)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


class FakeRegistry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.hook: Hook | None = None
        self.seen: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        handler = type("BoundHandler", (Handler,), {"fake": self})
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def remote(self, tag: str = "v1") -> str:
        return f"http://{self.host}/team/env:{tag}"

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join()

    def put(self, data: bytes) -> str:
        self.blobs[sha(data)] = data
        return sha(data)

    def serve_version(
        self,
        nodes: dict[bytes, bytes],
        objects: dict[bytes, bytes],
        root: bytes,
        *,
        tag: str = "v1",
        config: dict[str, Any] | None = None,
        node_packs: list[dict[bytes, bytes]] | None = None,
    ) -> str:
        """Publish a version of `root` (its nodes and objects, each kind in one pack; or the
        nodes in `node_packs`, one pack each) under `tag`; returns the manifest's digest."""
        packs = []
        groups = [(KIND_NODE, g, "nodes") for g in (node_packs or [nodes])]
        for kind, items, kname in [*groups, (KIND_OBJECT, objects, "objects")]:
            if not items:
                continue
            w = PackWriter(kind)
            for d in sorted(items):
                w.add(d, items[d])
            pack, index = w.finish()
            idesc = Descriptor(INDEX_TYPE, self.put(index), len(index))
            pdesc = Descriptor(
                PACK_TYPE, self.put(pack), len(pack), ((A_INDEX, idesc.digest), (A_KIND, kname))
            )
            packs.append(PackRef(kname, pdesc, idesc))
        cfg: dict[str, Any] = {
            "format": "veloverlay-version/1",
            "ref": "env",
            "root": root.hex(),
            "tiers": None,
            "message": "pushed",
            "time_ns": 0,
            "commit": "0" * 64,
            "parent": None,
        }
        cfg.update(config or {})
        cb = dumps(cfg)
        body = build_manifest(Descriptor(CONFIG_TYPE, self.put(cb), len(cb)), packs, [], {})
        self.manifests[tag] = self.manifests[sha(body)] = body
        return sha(body)


def file_entry(name: bytes, data: bytes, mode: int = 0o644, size: int | None = None) -> tree.Entry:
    return tree.Entry(
        name, tree.Kind.FILE, mode, len(data) if size is None else size, 0, hash_bytes(data), b"", 1
    )


def one_dir(entries: list[tree.Entry]) -> tuple[bytes, dict[bytes, bytes]]:
    d, data = tree.encode(0o755, 0, entries)
    return d, {d: data}


def deep_tree(levels: int, leaf: tree.Entry) -> tuple[bytes, dict[bytes, bytes]]:
    nodes: dict[bytes, bytes] = {}
    d, data = tree.encode(0o755, 0, [leaf])
    nodes[d] = data
    for _ in range(levels):
        sub = tree.Entry(b"d", tree.Kind.DIR, digest=d)  # (a DIR entry carries no mode or tier)
        d, data = tree.encode(0o755, 0, [sub])
        nodes[d] = data
    return d, nodes
