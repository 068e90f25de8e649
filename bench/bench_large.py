"""Large files and a real venv, each against its peer in the same run.

1. Large files (--large-files x --large-mib MiB of random bytes): `veloverlay ingest` (hash and
   store) against the raw single-threaded BLAKE3 of the same bytes (read in 1 MiB chunks, as
   `b3sum --num-threads 1` does; b3sum itself too when installed), against `cp -a` of the tree,
   and against `cp -a` followed by `sync -f` (a durable copy: ingest's objects are on disk before
   it returns, so the disk's write speed bounds it where the filesystem cannot share extents).
   Goal: ingest >= 0.5 of the raw hash's speed. The files are backdated an hour, as a real
   tree's are: a file modified less than a second before ingest reads it is read twice by design
   (source.py, the racy check), and with --quick the youngest file was 0.99 s old when ingest
   started. The rows run once per filesystem of --fs, each on its own fresh loop mount (default
   ext4 and, where mkfs.xfs is installed, xfs). Where the filesystem cannot share extents (ext4)
   ingest writes every byte durably, so `cp -a` + sync is its floor, not the in-memory hash; on
   xfs the objects are reflinks of the sources and ingest reads the clones back (direct I/O,
   blake3 on every core in its workers), while `cp -a` reflinks too. Ingest's time includes
   starting the interpreter and opening the store (about 0.13 s here), the raw hash's does not.
2. A real venv (--venv DIR, else one made here with numpy and pandas from the package index; the
   row is skipped when that fails): ingest against `cp -a`, its first projection (`run -- true`
   with a fresh per-boot layer cache: the cold layer build) against `cp -a`, and the warm run.
   Goal: the cold layer build >= 2x faster than `cp -a`.

Page cache warm for every contender; as root on fresh loop mounts (--no-loop: --base's own
filesystem, one row).

Usage: python bench/bench_large.py [--base DIR] [--repeat N] [--venv DIR] [--no-venv]
       [--fs ext4,xfs] [--quick]
Prints a table and writes bench/results/large.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
from benchlib import RESULTS, count_files, scratch, timed, velo_cmd, warm


def raw_hash(tree: Path) -> float:
    """Single-threaded BLAKE3 of every file's bytes, read in 1 MiB chunks."""
    t0 = time.perf_counter()
    for dirpath, _d, names in os.walk(tree):
        for n in sorted(names):
            h = blake3.blake3(max_threads=1)
            with open(os.path.join(dirpath, n), "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.digest()
    return time.perf_counter() - t0


def b3sum(tree: Path) -> float | None:
    exe = shutil.which("b3sum")
    if exe is None:
        return None
    files = [os.path.join(d, n) for d, _s, ns in os.walk(tree) for n in ns]
    return timed([exe, "--num-threads", "1", *files])


def bench_large(base: Path, n: int, mib: int, repeat: int) -> dict[str, Any]:
    tree = base / "large"
    tree.mkdir()
    old = time.time_ns() - 3_600_000_000_000  # not racy (the module's docstring)
    for i in range(n):
        with open(tree / f"blob{i}", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        os.utime(tree / f"blob{i}", ns=(old, old))
    os.sync()
    warm(tree)
    velo, raw, cp, cps, b3 = [], [], [], [], []
    for i in range(repeat):
        raw.append(raw_hash(tree))
        b = b3sum(tree)
        if b is not None:
            b3.append(b)
        cp.append(timed(["cp", "-a", str(tree), str(base / f"cp-large-{i}")]))
        os.sync()
        t = time.perf_counter()
        subprocess.run(["cp", "-a", str(tree), str(base / f"cps-large-{i}")], check=True)
        subprocess.run(["sync", "-f", str(base)], check=True)
        cps.append(time.perf_counter() - t)
        env = dict(os.environ, VELO_STORE=str(base / f"store-large-{i}"))
        velo.append(timed([*velo_cmd(), "ingest", str(tree), "--name", "large"], env))
        os.sync()
    v, r, c = statistics.median(velo), statistics.median(raw), statistics.median(cp)
    cs = statistics.median(cps)
    total = n * mib
    return {
        "files": n,
        "mib": total,
        "veloverlay_s": v,
        "raw_blake3_s": r,
        "b3sum_s": statistics.median(b3) if b3 else None,
        "cp_a_s": c,
        "cp_sync_s": cs,
        "veloverlay_mib_s": total / v,
        "raw_mib_s": total / r,
        "cp_mib_s": total / c,
        "fraction_of_raw": r / v,
        "ratio_vs_cp": c / v,
        "ratio_vs_cp_sync": cs / v,
        "runs": {"veloverlay": velo, "raw": raw, "cp": cp, "cp_sync": cps, "b3sum": b3},
    }


def make_venv(base: Path) -> Path | None:
    venv = base / "venv"
    if subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False).returncode != 0:
        return None
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "numpy", "pandas"]
    r = subprocess.run(pip, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"bench: no venv row (pip install failed): {r.stderr[-300:]}", file=sys.stderr)
        return None
    return venv


def bench_venv(base: Path, venv: Path, repeat: int) -> dict[str, Any]:
    src = base / "venv-src"
    if venv.resolve() != src.resolve():
        subprocess.run(["cp", "-a", str(venv), str(src)], check=True)  # on the bench's fs
    files, nbytes = count_files(src)
    warm(src)
    ing, cp, cold, warm_run = [], [], [], []
    for i in range(repeat):
        os.sync()
        cp.append(timed(["cp", "-a", str(src), str(base / f"cp-venv-{i}")]))
        os.sync()
        runtime = tempfile.mkdtemp(prefix="velo-bench-runtime-", dir="/dev/shm")
        env = dict(os.environ, VELO_STORE=str(base / f"store-venv-{i}"), VELO_RUNTIME_DIR=runtime)
        try:
            ing.append(timed([*velo_cmd(), "ingest", str(src), "--name", "venv"], env))
            os.sync()
            at = base / f"proj-venv-{i}"
            at.mkdir()  # existing: a session removes a target it made itself at its end
            run = [*velo_cmd(), "run", "venv", "--at", str(at), "--", "true"]
            cold.append(timed(run, env))
            warm_run.append(timed(run, env))
        finally:
            shutil.rmtree(runtime, ignore_errors=True)
    c = statistics.median(cp)
    i_s, cold_s, w_s = statistics.median(ing), statistics.median(cold), statistics.median(warm_run)
    return {
        "files": files,
        "bytes": nbytes,
        "cp_a_s": c,
        "ingest_s": i_s,
        "ingest_vs_cp": c / i_s,
        "first_run_s": cold_s,
        "warm_run_s": w_s,
        "cold_build_s": cold_s - w_s,
        "cold_build_vs_cp": c / max(cold_s - w_s, 1e-9),
        "runs": {"cp": cp, "ingest": ing, "first_run": cold, "warm_run": warm_run},
    }


def _print_large(lg: dict[str, Any], repeat: int) -> None:
    on = f" on {lg['fs']}" if lg["fs"] else ""
    print(f"large files{on}: {lg['files']} x {lg['mib'] // lg['files']} MiB (median of {repeat})")
    print(
        f"  ingest {lg['veloverlay_mib_s']:,.0f} MiB/s, raw blake3 {lg['raw_mib_s']:,.0f} MiB/s, "
        f"cp -a {lg['cp_mib_s']:,.0f} MiB/s: {lg['fraction_of_raw']:.2f} of raw (goal >= 0.5), "
        f"{lg['ratio_vs_cp']:.2f}x cp -a, {lg['ratio_vs_cp_sync']:.2f}x cp -a + sync"
        + (f"; b3sum -j1 {lg['b3sum_s']:.2f} s" if lg["b3sum_s"] is not None else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--base", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large-files", type=int, default=4)
    ap.add_argument("--large-mib", type=int, default=256)
    ap.add_argument("--venv", help="an existing venv to use (default: make one with pip)")
    ap.add_argument("--no-venv", action="store_true", help="only the large files")
    ap.add_argument(
        "--fs",
        default="ext4,xfs",
        help="the loop filesystems of the large-file rows, comma separated (ext4, xfs; default "
        "both: xfs where mkfs.xfs is installed); the venv rows run on the first",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-loop", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.large_files, args.large_mib = 1, 2, 32
    loop = os.geteuid() == 0 and not args.no_loop
    kinds = [k for k in args.fs.split(",") if k]
    if any(k not in ("ext4", "xfs") for k in kinds) or not kinds:
        ap.error(f"--fs: ext4 and/or xfs, not {args.fs!r}")
    if not loop:
        kinds = kinds[:1]  # --base's own filesystem, whatever it is
    elif "xfs" in kinds and shutil.which("mkfs.xfs") is None:
        print("bench: no xfs rows (mkfs.xfs not found: apt-get install xfsprogs)", file=sys.stderr)
        kinds = [k for k in kinds if k != "xfs"] or ["ext4"]
    size = (8 << 30) + args.repeat * 4 * args.large_files * (args.large_mib << 20)
    results: dict[str, Any] = {"large": [], "venv": None}
    for i, fstype in enumerate(kinds):
        with scratch(args.base, "velo-bench-large-", size, None, loop, fstype=fstype) as base:
            row = bench_large(base, args.large_files, args.large_mib, args.repeat)
            row["fs"] = fstype if loop else None
            results["large"].append(row)
            if i == 0 and not args.no_venv:
                venv = Path(args.venv) if args.venv else make_venv(base)
                if venv is not None:
                    results["venv"] = bench_venv(base, venv, args.repeat)
    for row in results["large"]:
        _print_large(row, args.repeat)
    v = results["venv"]
    if v is not None:
        print(
            f"venv: {v['files']:,} files, {v['bytes'] / 2**20:.0f} MiB: cp -a {v['cp_a_s']:.2f} s; "
            f"ingest {v['ingest_s']:.2f} s ({v['ingest_vs_cp']:.2f}x cp -a); first run "
            f"{v['first_run_s']:.2f} s, warm {v['warm_run_s']:.2f} s: cold layer build "
            f"{v['cold_build_s']:.2f} s = {v['cold_build_vs_cp']:.2f}x cp -a (goal >= 2x)"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "large.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
