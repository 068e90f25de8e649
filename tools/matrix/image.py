#!/usr/bin/python3
"""Build (or reuse) the matrix's guest images and kernels, cached outside the repository.

For each Debian release a box needs (tools/matrix/boxes.py):
1. a debootstrap minbase rootfs from the mirror apt is configured with, plus what the suite needs
   (python3-venv, gcc, libcap-dev, python3-dev, make, git, e2fsprogs, attr, util-linux, kmod,
   initramfs-tools), an unprivileged user `velo` (uid 1500) and the boot stub /velo-init.sh;
2. every kernel a box boots with that image: the linux-image package (and, for the split 7.x
   packages, linux-binary-* / linux-modules-*) fetched with `apt-get download` through a private
   apt configuration, unpacked with `dpkg-deb -x`; its modules go into the rootfs and an
   initramfs is made in the rootfs with `mkinitramfs` (MODULES=list: virtio_pci, virtio_blk,
   ext4 — Debian builds them as modules, so the kernel cannot mount /dev/vda without it);
3. a wheelhouse for the guest's own Python (`pip wheel` run inside the rootfs, so binary wheels
   match its Python and python-prctl's sdist is compiled against its libcap), and a venv
   /opt/velo/venv with every dependency installed from it: the guest installs offline;
4. `mkfs.ext4 -d rootfs` -> images/<release>.img (raw, sparse). Runs boot a qcow2 overlay of it.

Each step keeps a stamp of its inputs and is skipped when they are unchanged. The kernel chosen
for each line is recorded in kernels.json on first resolve and kept (`--refresh-kernels` to move).

Usage: image.py [--refresh-kernels] [RELEASE ...]   (as root; default: every release in use)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from boxes import KERNELS, dists  # noqa: E402
from common import (  # noqa: E402
    REPO,
    cache_dir,
    debian_mirrors,
    ensure_host_packages,
    fingerprint,
    log,
    run,
)

PACKAGES = (
    "python3,python3-venv,python3-dev,gcc,libc6-dev,libcap-dev,make,git,e2fsprogs,attr,"
    "util-linux,kmod,procps,psmisc,initramfs-tools,ca-certificates,file"
)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
UNPRIV_UID = 1500
IMAGE_SIZE = "6G"

BOOT_STUB = """#!/bin/sh
# veloverlay matrix guest (tools/matrix/image.py): mount the job disk (/dev/vdb) and run the
# init script the host put there (tools/matrix/guest-init.sh). Powers off on any failure.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /job
if mount /dev/vdb /job; then
  exec /bin/sh /job/init.sh
fi
echo "VELO-GUEST-ERROR no job disk on /dev/vdb"
echo o > /proc/sysrq-trigger
sleep 60
"""


def _chroot_env() -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """proc, sysfs and a bind of /dev for chroot steps; unmounted (lazily) afterwards."""
    done: list[Path] = []
    try:
        for fstype, src, sub in (("proc", "proc", "proc"), ("sysfs", "sys", "sys")):
            (root / sub).mkdir(exist_ok=True)
            run(["mount", "-t", fstype, src, str(root / sub)])
            done.append(root / sub)
        (root / "dev").mkdir(exist_ok=True)
        run(["mount", "--bind", "/dev", str(root / "dev")])
        done.append(root / "dev")
        yield
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-l", str(path)], check=False)


def chroot(root: Path, *cmd: str, env: dict[str, str] | None = None) -> None:
    run(["chroot", str(root), *cmd], env=env or _chroot_env())


def host_pip_cert() -> str | None:
    """The CA bundle the host's pip uses ($PIP_CERT or `pip config`), if one is set."""
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    for path in (
        "/etc/pip.conf",
        os.path.expanduser("~/.config/pip/pip.conf"),
        os.path.expanduser("~/.pip/pip.conf"),
    ):
        if os.path.exists(path):
            m = re.search(r"^\s*cert\s*=\s*(\S+)", Path(path).read_text(), re.M)
            if m and os.path.exists(m.group(1)):
                return m.group(1)
    return None


def _stamp_ok(path: Path, value: str) -> bool:
    return path.exists() and path.read_text().strip() == value


# --- kernels --------------------------------------------------------------------------------
def _apt_opts(kdir: Path) -> list[str]:
    return [
        f"-oDir::Etc::sourcelist={kdir / 'sources.list'}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::Etc::preferencesparts={kdir / 'prefs.d'}",
        f"-oDir::State::Lists={kdir / 'lists'}",
        f"-oDir::State::status={kdir / 'status'}",
        f"-oDir::Cache={kdir / 'cache'}",
        "-oAPT::Get::List-Cleanup=0",
    ]


def resolve_kernel(kid: str, *, refresh: bool) -> dict[str, str]:
    """The pinned kernel of line `kid`: {version, release, packages} (resolved once, then kept)."""
    lock_path = cache_dir() / "kernels.json"
    locks = json.loads(lock_path.read_text()) if lock_path.exists() else {}
    if kid in locks and not refresh:
        return dict(locks[kid])
    kernel = KERNELS[kid]
    archive, security = debian_mirrors()
    kdir = cache_dir() / "apt" / kid
    for sub in ("lists/partial", "cache/archives/partial", "prefs.d"):
        (kdir / sub).mkdir(parents=True, exist_ok=True)
    (kdir / "status").touch()
    key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    lines = [
        f"deb {key} {security if s.endswith('-security') else archive} {s} main"
        for s in kernel.suites
    ]
    (kdir / "sources.list").write_text("\n".join(lines) + "\n")
    run(["apt-get", *_apt_opts(kdir), "-qq", "update"])
    out = subprocess.run(
        ["apt-cache", *_apt_opts(kdir), "policy", "linux-image-amd64"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cand = re.search(r"Candidate:\s*(\S+)", out)
    if not cand or cand.group(1) == "(none)":
        raise SystemExit(f"error: no linux-image-amd64 in {', '.join(kernel.suites)}")
    meta = subprocess.run(
        ["apt-cache", *_apt_opts(kdir), "show", f"linux-image-amd64={cand.group(1)}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    dep = re.search(r"^Depends:.*?(linux-image-[0-9][^ ,]*)", meta, re.M)
    if not dep:
        raise SystemExit(f"error: linux-image-amd64 {cand.group(1)} names no kernel package")
    image_pkg = dep.group(1)
    release = image_pkg.removeprefix("linux-image-")
    pkgs = [image_pkg]
    meta2 = subprocess.run(
        ["apt-cache", *_apt_opts(kdir), "show", f"{image_pkg}={cand.group(1)}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Linux 7.x packages split the image into linux-binary-* (vmlinuz) and linux-modules-*.
    for extra in re.findall(r"(linux-(?:binary|modules)-[0-9][^ ,]*)", meta2.split("\n\n")[0]):
        if extra not in pkgs:
            pkgs.append(extra)
    entry = {"version": cand.group(1), "release": release, "packages": " ".join(pkgs)}
    entry["suites"] = " ".join(kernel.suites)
    locks[kid] = entry
    lock_path.write_text(json.dumps(locks, indent=2, sort_keys=True) + "\n")
    log(f"kernel {kid}: {entry}")
    return entry


def fetch_kernel(kid: str, entry: dict[str, str]) -> Path:
    """Unpacked kernel packages of `kid` under cache/kernels/<release>/pkg (downloaded once)."""
    kdir = cache_dir() / "kernels" / entry["release"]
    unpacked = kdir / "pkg"
    stamp = kdir / ".unpacked"
    if _stamp_ok(stamp, entry["version"]):
        return unpacked
    shutil.rmtree(kdir, ignore_errors=True)
    (kdir / "debs").mkdir(parents=True)
    apt = cache_dir() / "apt" / kid
    for pkg in entry["packages"].split():
        run(
            ["apt-get", *_apt_opts(apt), "-qq", "download", f"{pkg}={entry['version']}"],
            cwd=kdir / "debs",
        )
    unpacked.mkdir()
    for deb in sorted((kdir / "debs").glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    stamp.write_text(entry["version"] + "\n")
    return unpacked


def install_kernel(root: Path, kid: str, entry: dict[str, str]) -> None:
    """Modules into the rootfs, an initramfs made in it; vmlinuz + initrd into the cache."""
    rel = entry["release"]
    kdir = cache_dir() / "kernels" / rel
    stamp = root / f".velo-kernel-{rel}"
    value = fingerprint(sorted(entry.items()), INITRD_MODULES)
    if _stamp_ok(stamp, value) and (kdir / "initrd.img").exists():
        return
    pkg = fetch_kernel(kid, entry)
    mods = next(p for p in (pkg / "lib/modules" / rel, pkg / "usr/lib/modules" / rel) if p.is_dir())
    dest = root / "usr/lib/modules" / rel  # merged /usr: /lib -> usr/lib in both releases
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", str(mods), str(dest)])
    # Up to 6.x the image lives in /boot; the split 7.x packages keep it beside the modules.
    vmlinuz = next(p for p in [*(pkg / "boot").glob("vmlinuz-*"), mods / "vmlinuz"] if p.exists())
    shutil.copy2(vmlinuz, kdir / "vmlinuz")
    for cfg in [*(pkg / "boot").glob("config-*"), *mods.glob("config*")]:
        shutil.copy2(cfg, root / "boot" / f"config-{rel}")
    (root / "etc/initramfs-tools/modules").write_text("\n".join(INITRD_MODULES) + "\n")
    conf = root / "etc/initramfs-tools/initramfs.conf"
    text = re.sub(r"^MODULES=.*$", "MODULES=list", conf.read_text(), flags=re.M)
    conf.write_text(re.sub(r"^COMPRESS=.*$", "COMPRESS=gzip", text, flags=re.M))
    with chroot_mounts(root):
        chroot(root, "depmod", "-a", rel)
        chroot(root, "mkinitramfs", "-o", f"/boot/initrd.img-{rel}", rel)
    shutil.copy2(root / "boot" / f"initrd.img-{rel}", kdir / "initrd.img")
    (kdir / "release").write_text(rel + "\n")
    stamp.write_text(value + "\n")


# --- rootfs ---------------------------------------------------------------------------------
def python_deps() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return sorted(set(deps)) + ["setuptools>=68", "wheel"]


def debootstrap(root: Path, dist: str) -> None:
    archive, _ = debian_mirrors()
    stamp = root / ".velo-debootstrap"
    value = fingerprint(dist, PACKAGES)
    if _stamp_ok(stamp, value):
        return
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", dist, str(root), archive],
        stdout=subprocess.DEVNULL,
    )
    log(f"debootstrap {dist}: {time.monotonic() - t0:.0f} s")
    # The guest: no network, a user for the root-free runs, the boot stub.
    (root / "etc/hostname").write_text(f"velo-{dist}\n")
    (root / "etc/fstab").write_text("# the matrix guest mounts what it needs in /job/init.sh\n")
    with chroot_mounts(root):
        chroot(root, "useradd", "-m", "-u", str(UNPRIV_UID), "-U", "-s", "/bin/bash", "velo")
    stub = root / "velo-init.sh"
    stub.write_text(BOOT_STUB)
    stub.chmod(0o755)
    stamp.write_text(value + "\n")


def python_env(root: Path) -> None:
    """A wheelhouse for the guest's Python and /opt/velo/venv installed from it (offline)."""
    deps = python_deps()
    stamp = root / ".velo-python"
    value = fingerprint(deps)
    if _stamp_ok(stamp, value):
        return
    shutil.rmtree(root / "opt/velo", ignore_errors=True)
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    # The host's pip settings that reach the registry (CA bundle, index) hold in the chroot too:
    # the CA bundle is copied in for the build and removed afterwards.
    env = _chroot_env()
    cert = host_pip_cert()
    if cert:
        shutil.copy2(cert, root / "tmp/velo-host-ca.crt")
        env["PIP_CERT"] = "/tmp/velo-host-ca.crt"
    for key in ("PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        with chroot_mounts(root):
            chroot(root, "python3", "-m", "venv", "/opt/velo/venv")
            pip = "/opt/velo/venv/bin/pip"
            # python-prctl is an sdist with a setup.py only: building its wheel needs `wheel`.
            chroot(root, pip, "install", "-q", "setuptools>=68", "wheel", env=env)
            chroot(root, pip, "wheel", "-q", "--wheel-dir", "/opt/velo/wheels", *deps, env=env)
            chroot(
                root,
                pip,
                "install",
                "-q",
                "--no-index",
                "--find-links",
                "/opt/velo/wheels",
                *deps,
                env=env,
            )
    finally:
        (root / "etc/resolv.conf").unlink(missing_ok=True)
        (root / "tmp/velo-host-ca.crt").unlink(missing_ok=True)
    run(["chmod", "-R", "a+rX", str(root / "opt/velo")])
    stamp.write_text(value + "\n")


def make_image(root: Path, image: Path) -> None:
    stamps = sorted(p.name + "=" + p.read_text().strip() for p in root.glob(".velo-*"))
    stamp = image.with_suffix(".stamp")
    value = fingerprint(stamps, IMAGE_SIZE)
    if image.exists() and _stamp_ok(stamp, value):
        return
    image.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    t0 = time.monotonic()
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "velo-root", "-d", str(root), str(tmp), IMAGE_SIZE],
        stdout=subprocess.DEVNULL,
    )
    os.replace(tmp, image)
    stamp.write_text(value + "\n")
    log(f"image {image.name}: {time.monotonic() - t0:.0f} s")


def build(dist: str, *, refresh: bool = False) -> dict[str, object]:
    t0 = time.monotonic()
    root = cache_dir() / "rootfs" / dist
    debootstrap(root, dist)
    python_env(root)
    kernels = {}
    for kid in sorted(dists()[dist]):
        entry = resolve_kernel(kid, refresh=refresh)
        install_kernel(root, kid, entry)
        kernels[kid] = entry
    image = cache_dir() / "images" / f"{dist}.img"
    make_image(root, image)
    seconds = time.monotonic() - t0
    log(f"{dist}: image ready in {seconds:.0f} s")
    return {"image": str(image), "kernels": kernels, "seconds": seconds}


def kernel_files(kid: str) -> tuple[Path, Path, str]:
    """(vmlinuz, initrd, release) of a built kernel line."""
    locks = json.loads((cache_dir() / "kernels.json").read_text())
    rel = locks[kid]["release"]
    kdir = cache_dir() / "kernels" / rel
    return kdir / "vmlinuz", kdir / "initrd.img", rel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dists", nargs="*", help="Debian releases (default: all in use)")
    ap.add_argument("--refresh-kernels", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: image.py needs root (debootstrap, chroot, mount)", file=sys.stderr)
        return 1
    ensure_host_packages()  # run on its own, it needs debootstrap and qemu-img as matrix.py does
    timings = {}
    for dist in args.dists or sorted(dists()):
        timings[dist] = build(dist, refresh=args.refresh_kernels)
    (cache_dir() / "images" / "last-build.json").write_text(json.dumps(timings, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
