"""The VM matrix: which boxes exist, what each one boots, and what each one must choose.

One table shared by the image builder (`image.py`: which Debian releases and kernels to fetch),
the qemu runner (`run.py`: what the guest applies before the suite) and the matrix driver
(`matrix.py`: what `veloverlay doctor --json` must report, or the box fails). Nothing here is
inferred from a kernel version at run time: the expected choices are written down per box, and
the run proves the product makes them by probing.

Standard library only; runs under Debian's /usr/bin/python3 on the host.
"""

from __future__ import annotations

import dataclasses

# The feature names are veloverlay/probe.py's FEATURES (a stable API, also used by .ci/run).
_BASE = ("chattr", "whiteout_mknod")
_ROOT = ("root", "overlay_root", "overlay_native")
_USERNS = ("userns", "overlay_userns", "userns_unrestricted")
_NEW_API = ("lowerdir_append", "fsconfig_fd")  # lowerdir+ and FSCONFIG_SET_FD: Linux >= 6.8
# data-only lowers in a userns: >= 6.16 (root-native ones: >= 6.5 with metacopy=on, >= 6.16 off)
_DATA_ONLY = ("data_only_root", "data_only_userns", "data_only_native")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A Debian kernel package line: linux-image-amd64's candidate among `suites`."""

    id: str
    suites: tuple[
        str, ...
    ]  # e.g. ("bookworm", "bookworm-security"); "-security" is the security URI
    note: str


@dataclasses.dataclass(frozen=True)
class Expect:
    """What doctor --json's "chosen" section must say for one identity."""

    backend: str  # "overlay" or "shim"
    lower_form: str | None  # "data-only" / "links" when overlay; None for shim (not asserted)


@dataclasses.dataclass(frozen=True)
class Box:
    name: str
    dist: str  # Debian release of the root image
    kernel: str  # Kernel.id
    summary: str
    root: Expect
    user: Expect
    # VELO_TEST_MUST_WORK for the suite run as root / as the unprivileged user (uid 1500).
    must_root: tuple[str, ...]
    must_user: tuple[str, ...]
    sysctls: tuple[tuple[str, str], ...] = ()
    no_overlay: bool = False  # overlay.ko removed and `install overlay /bin/false`
    full: bool = False  # the whole suite (`-m ""` minus slow), not the smoke subset
    # An ext4 made with `-O verity` (a third disk) mounted on the guest's /tmp, where the suite
    # keeps its stores (VELO_INTERNAL__TEST_SCRATCH=/tmp): objects get fs-verity there.
    verity_disk: bool = False
    suite: tuple[str, ...] = ()  # this box's own suite instead of the smoke subset
    extra: tuple[str, ...] = ()  # suites run after the smoke subset


KERNELS = {
    k.id: k
    for k in (
        Kernel("deb11", ("bullseye", "bullseye-security"), "Debian 11's kernel (< 5.11)"),
        Kernel("deb12", ("bookworm", "bookworm-security"), "Debian 12's kernel"),
        Kernel("deb13", ("trixie", "trixie-security"), "Debian 13's kernel"),
        Kernel("deb13-bpo", ("trixie-backports",), "Debian 13 backports (>= 6.16)"),
    )
}

LINKS = Expect("overlay", "links")
DATA_ONLY = Expect("overlay", "data-only")
SHIM = Expect("shim", None)

BOXES = (
    Box(
        "deb12",
        "bookworm",
        "deb12",
        "Debian 12, its 6.1 kernel: proxy-link lowers",
        root=LINKS,
        user=LINKS,
        must_root=(*_BASE, *_ROOT, *_USERNS),
        must_user=(*_USERNS,),
    ),
    Box(
        "deb13",
        "trixie",
        "deb13",
        "Debian 13, its 6.12 kernel: proxy-link lowers, new mount API",
        root=LINKS,
        user=LINKS,
        must_root=(*_BASE, *_ROOT, *_USERNS, *_NEW_API),
        must_user=(*_USERNS, "whiteout_mknod", *_NEW_API),
    ),
    Box(
        "deb13-bpo",
        "trixie",
        "deb13-bpo",
        "Debian 13 with the backports kernel (>= 6.16): data-only lowers; the full suite",
        root=DATA_ONLY,
        user=DATA_ONLY,
        must_root=(*_BASE, *_ROOT, *_USERNS, *_NEW_API, *_DATA_ONLY),
        must_user=(*_USERNS, "whiteout_mknod", *_NEW_API, "data_only_userns"),
        full=True,
    ),
    Box(
        "deb13-verity",
        "trixie",
        "deb13",
        "Debian 13, its 6.12 kernel, stores on an ext4 with fs-verity: objects the kernel "
        "keeps immutable, root-free",
        root=LINKS,
        user=LINKS,
        must_root=(*_BASE, *_ROOT, *_USERNS, *_NEW_API, "fsverity"),
        must_user=(*_USERNS, "whiteout_mknod", *_NEW_API, "fsverity"),
        verity_disk=True,
        suite=(
            "tests/kernel/test_verity.py",
            "tests/unit/test_verity_store.py",
            "tests/session/test_behaviour.py",
            "tests/shim/test_behaviour.py",
            "tests/shim/test_materialize.py",
            "tests/reliability/test_hostile.py",
            "tests/shim/test_hostile.py",
            "tests/envs/test_real_envs.py",
        ),
    ),
    Box(
        "deb12-nouserns",
        "bookworm",
        "deb12",
        "Debian 12, user.max_user_namespaces=0: root-free must choose the shim, root the "
        "root-native overlay (no user namespace needed to mount; its mounts are not locked)",
        root=LINKS,  # root-native (issue 17): a private mount namespace, trusted.overlay.*
        user=SHIM,
        must_root=(*_BASE, "root", "overlay_native", "shim"),
        must_user=("shim",),
        sysctls=(("user.max_user_namespaces", "0"),),
    ),
    Box(
        "deb12-nooverlay",
        "bookworm",
        "deb12",
        "Debian 12 without the overlay module: everyone must choose the shim",
        root=SHIM,
        user=SHIM,
        must_root=("root", "chattr", "userns", "shim"),
        must_user=("userns", "shim"),
        no_overlay=True,
    ),
    Box(
        "deb12-k5.10",
        "bookworm",
        "deb11",
        "Debian 12 image on Debian 11's 5.10 kernel: no overlay in a user namespace (< 5.11)",
        # overlayfs is mountable in a user namespace only from 5.11 (measured: EPERM for overlay
        # as root inside its user namespace): root-free must choose the shim; root mounts
        # root-native, in a private mount namespace of the initial user namespace (issue 17).
        root=LINKS,
        user=SHIM,
        must_root=(*_BASE, "root", "userns", "overlay_native", "shim"),
        must_user=("userns", "shim"),
        # The oldest kernel: ingest's userfaultfd test hung there (THP 'always'), and its tmpfs
        # has no inode flags and jiffies timestamps, which store tests assumed (session 14).
        extra=("tests/ingest", "tests/store"),
    ),
)


def box(name: str) -> Box:
    for b in BOXES:
        if b.name == name:
            return b
    raise KeyError(f"no box {name!r} (known: {', '.join(b.name for b in BOXES)})")


def dists() -> dict[str, set[str]]:
    """Debian release -> the kernel ids its image must carry modules for."""
    out: dict[str, set[str]] = {}
    for b in BOXES:
        out.setdefault(b.dist, set()).add(b.kernel)
    return out
