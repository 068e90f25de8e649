"""A real registry for the remote tests: Debian's `docker-registry` (CNCF distribution), started
once per session on 127.0.0.1 at a free port with its own config, storage, htpasswd (bcrypt) and
TLS from a throw-away CA made with openssl; stopped by pid at the end.

A counting TCP proxy in front of it (`proxy`) says how many bytes the registry sent: the tests
count what a pull fetched there, not from the product's own report (the proxy counts each byte
before it forwards it, so the count is complete when the client has its answer; the registry's
access log is written after the response and may lag). Its storage directory says what a push
stored (a blob is stored before the registry answers the upload).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import must_work
from tests.helpers.trees import force_rmtree
from tests.remote.fake_registry import FakeRegistry

USER, PASSWORD = "velo", "s3cret-pw"


class Registry:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.ca = root / "ca.crt"
        self.storage = root / "storage"
        self.log = root / "registry.log"
        self.auth_file = root / "auth.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.proxy: CountingProxy | None = None

    def remote(self, repo: str, tag: str | None = None) -> str:
        return f"{self.host}/{repo}" + (f":{tag}" if tag else "")

    def stored_blob_bytes(self) -> int:
        """Bytes of every blob the registry stores."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.storage / "docker/registry/v2/blobs"):
            if "data" in files:
                total += os.path.getsize(os.path.join(dirpath, "data"))
        return total

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def counted(self, repo: str, tag: str | None = None) -> str:
        """The remote name through the counting proxy (`sent()` then says what was fetched)."""
        assert self.proxy is not None
        return self.proxy.remote(repo, tag)

    def received(self) -> int:
        """Bytes sent to the registry through the proxy so far."""
        assert self.proxy is not None
        return self.proxy.up

    def sent(self) -> int:
        """Bytes the registry has sent through the proxy so far (TLS records and headers too)."""
        assert self.proxy is not None
        return self.proxy.down


class CountingProxy:
    """Forwards 127.0.0.1:port to the registry, counting the bytes each way."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.down = 0
        self.up = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def remote(self, repo: str, tag: str | None = None) -> str:
        return f"{self.host}/{repo}" + (f":{tag}" if tag else "")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if count:
                        self.down += len(data)
                    else:
                        self.up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str, cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)


def _make_tls(d: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=veloverlay test CA", cwd=d)  # fmt: skip
    _run("openssl", "req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1",
         cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "san.ext",
         cwd=d)  # fmt: skip


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt does bcrypt, the only scheme distribution's htpasswd takes

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    exe = shutil.which("docker-registry")
    if exe is None or shutil.which("openssl") is None:
        # The README's set-up installs both; a host without them (a VM matrix box with no
        # package mirror) skips, saying so, unless VELO_TEST_MUST_WORK names 'tools' (CI does).
        why = "docker-registry (Debian package) and openssl are needed: run 'make setup'"
        if "tools" in must_work() or "all" in must_work():
            pytest.fail(f"VELO_TEST_MUST_WORK names 'tools' but {why}")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="velo-registry-"))
    try:
        _make_tls(root)
        (root / "htpasswd").write_text(f"{USER}:{_bcrypt(PASSWORD)}\n")
        reg = Registry(root, _free_port())
        cfg = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(reg.storage)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {
                "addr": reg.host,
                "secret": "veloverlay-test",
                "tls": {"certificate": str(root / "srv.crt"), "key": str(root / "srv.key")},
            },
            "auth": {"htpasswd": {"realm": "velo-test", "path": str(root / "htpasswd")}},
        }
        (root / "config.yml").write_text(json.dumps(cfg))  # JSON is YAML
        reg.proxy = CountingProxy(reg.port)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        auths = {reg.host: {"auth": auth}, reg.proxy.host: {"auth": auth}}
        reg.auth_file.write_text(json.dumps({"auths": auths}))
        with open(reg.log, "wb") as log:
            reg.proc = subprocess.Popen(
                [exe, "serve", str(root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", reg.port), timeout=1).close()
                break
            except OSError:
                if reg.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("docker-registry did not start:\n" + reg.log.read_text()[-2000:])
                time.sleep(0.05)
        yield reg
    finally:
        if "reg" in locals() and reg.proxy is not None:
            reg.proxy.close()
        proc = locals().get("reg") and reg.proc
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_rmtree(str(root))


@pytest.fixture
def logged_in(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The registry, with REGISTRY_AUTH_FILE naming the right credentials."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(registry.auth_file))
    return registry


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    """An in-process registry whose answers a test scripts (fake_registry.py), closed after."""
    f = FakeRegistry()
    yield f
    f.close()
