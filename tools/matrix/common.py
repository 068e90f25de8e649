"""Host-side helpers for the VM matrix: the cache dir, the configured Debian mirror, logging.

The mirror is read from this machine's apt configuration at build time (never written into the
repository); the cache lives outside the repository ($VELO_MATRIX_CACHE, default
/var/cache/veloverlay-matrix). Standard library only.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    path = Path(os.environ.get("VELO_MATRIX_CACHE", "/var/cache/veloverlay-matrix"))
    path.mkdir(parents=True, exist_ok=True)
    return path


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[matrix {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """subprocess.run with check=True and text output; logs the command."""
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _apt_entries() -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled Debian source in /etc/apt/sources.list{,.d/*}."""
    out: list[tuple[str, list[str]]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if (
                fields.get("enabled", "yes").lower() == "no"
                or "deb" not in fields.get("types", "").split()
            ):
                continue
            for uri in fields.get("uris", "").split():
                out.append((uri, fields.get("suites", "").split()))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # type: ignore[assignment]
            if len(line) >= 3 and line[0] == "deb":
                out.append((line[1], [line[2]]))
    return out


def debian_mirrors() -> tuple[str, str]:
    """(archive URI, security URI) as this machine's apt is configured (Debian sources only)."""
    archive = security = None
    for uri, suites in _apt_entries():
        if not any(re.match(r"^(bullseye|bookworm|trixie|forky|sid)", s) for s in suites):
            continue
        if any(s.endswith("-security") for s in suites):
            security = security or uri
        else:
            archive = archive or uri
    if archive is None:
        raise SystemExit("error: no Debian archive in /etc/apt/sources.list*; cannot build images")
    if security is None:
        security = archive.rstrip("/") + "-security"
    return archive, security


# qemu + images; debugfs (e2fsprogs) reads results; vagrant + vagrant-libvirt for `validate`.
HOST_PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "debootstrap",
    "e2fsprogs",
    "vagrant",
    "vagrant-libvirt",
)


def ensure_host_packages() -> None:
    """Install the Debian packages the matrix needs on the host (idempotent, quick if present)."""
    missing = [
        p
        for p in HOST_PACKAGES
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout
    ]
    if not missing:
        return
    log(f"installing host packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def exit_on_sigterm() -> None:
    """SIGTERM ends the run through SystemExit, so `finally` blocks kill the qemu they started."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
