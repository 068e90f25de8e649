#!/usr/bin/python3
"""Boot one matrix box under plain qemu (TCG) and collect what its guest wrote.

A run = a qcow2 overlay of the cached release image (the image itself is never written), a job
disk made with `mkfs.ext4 -d` from a staging dir (the repository's working tree: tracked and
untracked-but-not-ignored files; guest-init.sh; job.env), the box's kernel booted directly
(-kernel/-initrd, init=/velo-init.sh), no network device. The guest writes its results into the
job disk and powers off with sysrq; the host reads them back with `debugfs -R rdump` (no mount).
A run that outlives its timeout is killed (SIGKILL to the qemu pid this module started).

Usage: run.py BOX [--suite 'pytest args' | --bench 'bench/NAME.py args'] [--timeout S] [--keep]
(as root)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from boxes import Box, box  # noqa: E402
from common import HERE, REPO, cache_dir, exit_on_sigterm, log, run  # noqa: E402
from image import kernel_files  # noqa: E402

QEMU = "qemu-system-x86_64"
CMDLINE = "console=ttyS0 root=/dev/vda rw init=/velo-init.sh panic=-1 loglevel=4 net.ifnames=0"


def working_tree(dest: Path) -> int:
    """Copy the repository's working tree (tracked + untracked, minus ignored) to dest."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    count = 0
    for raw in names:
        if not raw:
            continue
        rel = os.fsdecode(raw)
        src = REPO / rel
        if not os.path.lexists(src) or os.path.isdir(src):
            continue  # deleted in the working tree, or a submodule
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out, follow_symlinks=False)
        count += 1
    return count


def job_env(b: Box, *, mode: str, suite: str, extra: dict[str, str]) -> str:
    values = {
        "BOX": b.name,
        "MODE": mode,
        "SYSCTLS": " ".join(f"{k}={v}" for k, v in b.sysctls),
        "NO_OVERLAY": "1" if b.no_overlay else "0",
        "VERITY_DISK": "1" if b.verity_disk else "0",
        "SUITE": suite,
        "MUST_ROOT": ",".join(b.must_root),
        "MUST_USER": ",".join(b.must_user),
        **extra,
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


@dataclasses.dataclass
class Guest:
    """One booted qemu: start it, wait for it or kill it."""

    proc: subprocess.Popen[bytes]
    console: Path
    started: float

    def wait(self, timeout: float) -> tuple[int | None, float]:
        """(exit status or None when killed at the timeout, wall seconds)."""
        try:
            rc: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        return rc, time.monotonic() - self.started

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def boot(
    kernel: str,
    disks: list[tuple[Path, str, str]],
    console: Path,
    *,
    memory: int = 2048,
    append: str = "",
) -> Guest:
    """Start qemu on `disks` [(file, format, cache mode)]; the first is the root disk."""
    vmlinuz, initrd, _rel = kernel_files(kernel)
    cmd = [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-smp", "2",
        "-m", str(memory),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(vmlinuz),
        "-initrd", str(initrd),
        "-append", f"{CMDLINE} {append}".strip(),
    ]  # fmt: skip
    for path, fmt, cache in disks:
        cmd += ["-drive", f"file={path},format={fmt},if=virtio,cache={cache}"]
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(console.with_suffix(".qemu-err"), "wb"),
    )
    return Guest(proc, console, time.monotonic())


def make_job_disk(
    workdir: Path,
    b: Box,
    *,
    mode: str,
    suite: str,
    extra: dict[str, str] | None = None,
    files: dict[str, Path] | None = None,
    size: str = "1G",
) -> Path:
    stage = workdir / "job"
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "results").mkdir(parents=True)
    n = working_tree(stage / "src")
    shutil.copy2(HERE / "guest-init.sh", stage / "init.sh")
    for name, path in (files or {}).items():
        shutil.copy2(path, stage / name)
    (stage / "job.env").write_text(job_env(b, mode=mode, suite=suite, extra=extra or {}))
    img = workdir / "job.img"
    img.unlink(missing_ok=True)
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "velo-job", "-d", str(stage), str(img), size],
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(stage)
    log(f"job disk: {n} files of the working tree")
    return img


def verity_disk(workdir: Path, size: str = "4G") -> Path:
    """A sparse ext4 with the `verity` feature (Debian's mke2fs leaves it off): the guest's
    /dev/vdc, mounted on its /tmp (guest-init.sh)."""
    img = workdir / "verity.img"
    img.unlink(missing_ok=True)
    run(
        ["mkfs.ext4", "-q", "-F", "-O", "verity", "-L", "velo-verity", str(img), size],
        stdout=subprocess.DEVNULL,
    )
    return img


def read_results(job_img: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debugfs", "-R", f"rdump /results {dest}", str(job_img)], check=True, capture_output=True
    )


def junit_counts(path: Path) -> dict[str, object]:
    """passed/failed/errors/skipped, and the test ids that failed, from a pytest junit file."""
    out: dict[str, object] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "ids": []}
    if not path.exists():
        return out
    failed_ids: list[str] = []
    classes: set[str] = set()
    for case in ET.parse(path).getroot().iter("testcase"):
        cid = f"{case.get('classname')}::{case.get('name')}"
        classes.add(str(case.get("classname")))
        tags = {child.tag for child in case}
        if "failure" in tags:
            out["failed"] = int(out["failed"]) + 1  # type: ignore[call-overload]
            failed_ids.append(cid)
        elif "error" in tags:
            out["errors"] = int(out["errors"]) + 1  # type: ignore[call-overload]
            failed_ids.append(cid)
        elif "skipped" in tags:
            out["skipped"] = int(out["skipped"]) + 1  # type: ignore[call-overload]
        else:
            out["passed"] = int(out["passed"]) + 1  # type: ignore[call-overload]
    out["ids"] = failed_ids
    out["modules"] = sorted(classes)
    return out


def passed_in(path: Path, prefix: str) -> int:
    """How many tests whose classname starts with `prefix` passed (e.g. 'tests.shim')."""
    if not path.exists():
        return 0
    n = 0
    for case in ET.parse(path).getroot().iter("testcase"):
        if str(case.get("classname", "")).startswith(prefix) and len(case) == 0:
            n += 1
    return n


def run_box(
    name: str, *, suite: str, timeout: float, keep: bool = False, bench: str | None = None
) -> dict[str, object]:
    """Boot box `name`, run `suite` as root and as uid 1500 (or, with `bench`, that benchmark
    and its arguments as root), return what the guest reported."""
    b = box(name)
    image = cache_dir() / "images" / f"{b.dist}.img"
    if not image.exists():
        raise SystemExit(f"error: {image} missing: run tools/matrix/image.py {b.dist}")
    runs = cache_dir() / "runs"
    runs.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runs))
    result: dict[str, object] = {"box": name, "workdir": str(workdir)}
    guest = None
    try:
        overlay = workdir / "root.qcow2"
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(overlay)]
        )
        extra = {"TEST_TIMEOUT": str(int(min(600, timeout / 3)))}
        if bench is not None:
            extra["BENCH"] = bench
        job = make_job_disk(
            workdir, b, mode="suite" if bench is None else "bench", suite=suite, extra=extra
        )
        console = workdir / "console.log"
        disks = [(overlay, "qcow2", "unsafe"), (job, "raw", "writeback")]
        if b.verity_disk:
            disks.append((verity_disk(workdir), "raw", "unsafe"))
        guest = boot(b.kernel, disks, console)
        rc, wall = guest.wait(timeout)
        result.update({"qemu_rc": rc, "wall": round(wall, 1), "timed_out": rc is None})
        out = workdir / "results"
        read_results(job, out)
        result["console_tail"] = guest.console_text()[-3000:]
        result.update(collect(out))
        # The last results of each box stay in the cache (cache/last/BOX), to read failures.
        keep_dir = cache_dir() / "last" / name
        shutil.rmtree(keep_dir, ignore_errors=True)
        keep_dir.parent.mkdir(exist_ok=True)
        shutil.copytree(out, keep_dir)
        shutil.copy2(console, keep_dir / "console.log")
        result["kept"] = str(keep_dir)
    finally:
        if guest is not None:
            guest.kill()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def collect(out: Path) -> dict[str, object]:
    """The guest's results dir -> doctor choices, suite counts, step times."""
    res: dict[str, object] = {}
    guest = out / "results" if (out / "results").is_dir() else out
    info = {}
    if (guest / "guest.txt").exists():
        for line in (guest / "guest.txt").read_text().splitlines():
            k, _, v = line.partition("=")
            info[k] = v
    res["guest"] = info
    for who in ("root", "user"):
        doc = guest / f"doctor-{who}.json"
        try:
            data = json.loads(doc.read_text())
            res[f"doctor_{who}"] = data.get("chosen", {})
            res[f"features_{who}"] = {k: v["ok"] for k, v in data.get("features", {}).items()}
        except (OSError, ValueError) as exc:
            err = guest / f"doctor-{who}.err"
            res[f"doctor_{who}"] = {
                "error": f"{exc}; {err.read_text()[-500:] if err.exists() else ''}"
            }
        rc = guest / f"rc-{who}"
        res[f"rc_{who}"] = int(rc.read_text()) if rc.exists() else None
        res[f"tests_{who}"] = junit_counts(guest / f"junit-{who}.xml")
        res[f"shim_passed_{who}"] = passed_in(guest / f"junit-{who}.xml", "tests.shim")
        log_ = guest / f"pytest-{who}.log"
        res[f"pytest_tail_{who}"] = (
            log_.read_text(errors="replace")[-2500:] if log_.exists() else ""
        )
    steps = {}
    if (guest / "steps.txt").exists():
        for line in (guest / "steps.txt").read_text().splitlines():
            k, _, v = line.partition(" ")
            steps[k] = float(v)
    res["steps"] = steps
    if (guest / "error.txt").exists():
        res["error"] = (guest / "error.txt").read_text().strip()
    if (guest / "bench.log").exists():
        res["bench_tail"] = (guest / "bench.log").read_text(errors="replace")[-2500:]
        with contextlib.suppress(OSError, ValueError):
            res["bench"] = json.loads((guest / "verity.json").read_text())
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("box")
    ap.add_argument("--suite", default="tests/session/test_behaviour.py")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--keep", action="store_true", help="keep the run dir and results")
    ap.add_argument("--bench", help="run this benchmark (bench/NAME.py ARGS) instead, as root")
    args = ap.parse_args()
    exit_on_sigterm()
    res = run_box(
        args.box, suite=args.suite, timeout=args.timeout, keep=args.keep, bench=args.bench
    )
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
