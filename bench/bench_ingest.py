"""Ingest throughput against `git add -A` (git's own content-addressed store), in one run.

Trees: 20,000 files of 4 KiB (200 dirs), and a real tree of >= 10,000 files (/usr/share by
default). For each: page cache warmed first; `veloverlay ingest` into a fresh store and
`git add -A` into a fresh git dir (outside the tree), each timed as a whole command (wall clock,
interpreter start-up included), median of --repeat runs; then re-ingest of the unchanged tree (stat
cache). Finally peak memory (PSS summed over the process tree, sampled every 50 ms) for ingesting
200,000 small files. Every run uses new directories: on ext4, creating inodes right after mass
deletes in the same block group is several times slower (feasibility.md §9), so nothing is deleted
until the end.

Usage: python bench/bench_ingest.py [--base DIR] [--repeat N] [--quick]
Prints a table and writes bench/results/ingest.json.
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def make_small_tree(root: Path, files: int, size: int = 4096, per_dir: int = 100) -> None:
    rnd = os.urandom
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        with open(d / f"f{i % per_dir:03d}", "wb") as f:
            f.write(rnd(size))
    # Backdate: files younger than the racy window are read twice by design; a real tree is old.
    old = time.time_ns() - 3_600_000_000_000
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), ns=(old, old))


def count_files(root: Path) -> tuple[int, int]:
    n = b = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                n += 1
                b += os.lstat(p).st_size
    return n, b


def warm(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
                except OSError:
                    pass


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def velo_cmd() -> list[str]:
    return [sys.executable, "-m", "veloverlay"]


def bench_tree(name: str, tree: Path, base: Path, repeat: int) -> dict[str, object]:
    files, nbytes = count_files(tree)
    warm(tree)
    velo, git, reingest = [], [], []
    for i in range(repeat):
        store = base / f"store-{name}-{i}"
        env = dict(os.environ, VELO_STORE=os.fspath(store))
        velo.append(timed([*velo_cmd(), "ingest", os.fspath(tree), "--name", name], env))
        reingest.append(timed([*velo_cmd(), "ingest", os.fspath(tree), "--name", name], env))
        gitdir = base / f"git-{name}-{i}"
        subprocess.run(["git", "init", "-q", "--bare", os.fspath(gitdir)], check=True)
        git.append(
            timed(
                ["git", f"--git-dir={gitdir}", f"--work-tree={tree}", "add", "-A"],
                cwd=os.fspath(tree),
            )
        )
    v, g, r = statistics.median(velo), statistics.median(git), statistics.median(reingest)
    return {
        "tree": name,
        "files": files,
        "bytes": nbytes,
        "veloverlay_s": v,
        "git_add_s": g,
        "reingest_s": r,
        "veloverlay_files_per_s": files / v,
        "git_files_per_s": files / g,
        "reingest_files_per_s": files / r,
        "ratio_vs_git": g / v,
        "runs": {"veloverlay": velo, "git": git, "reingest": reingest},
    }


def _tree_mem_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of pid and all its descendants, from /proc. PSS splits pages shared between
    the processes (the forked workers share the interpreter with their parent) instead of
    counting them once per process as a sum of RSS does."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    pss = rss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return pss, rss


def bench_memory(base: Path, files: int) -> dict[str, object]:
    tree = base / "mem-tree"
    make_small_tree(tree, files, size=512, per_dir=500)
    store = base / "store-mem"
    env = dict(os.environ, VELO_STORE=os.fspath(store))
    proc = subprocess.Popen(
        [*velo_cmd(), "ingest", os.fspath(tree), "--name", "mem"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    peak = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_rss
        while not done.is_set():
            pss, rss = _tree_mem_kb(proc.pid)
            peak, peak_rss = max(peak, pss), max(peak_rss, rss)
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t0 = time.perf_counter()
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    if rc != 0:
        raise SystemExit(f"ingest of the memory tree failed ({rc})")
    return {
        "files": files,
        "peak_pss_mb": peak / 1024,
        "peak_rss_sum_mb": peak_rss / 1024,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/var/tmp", help="where trees and stores go (default ext4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real", default="/usr/share", help="a real tree of >= 10,000 files")
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--memory-files", type=int, default=200000)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (smoke test)")
    ap.add_argument(
        "--no-loop",
        action="store_true",
        help="use --base as it is instead of a fresh loop-mounted ext4 (the default as root)",
    )
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.small_files, args.memory_files = 1, 2000, 5000
    loop = None
    if os.geteuid() == 0 and not args.no_loop:
        # A fresh ext4: the same state for every run and for both tools (a busy ext4 that just
        # deleted many inodes creates new ones several times slower, measured: 2-3x swings).
        loop = Path(tempfile.mkdtemp(prefix="velo-bench-fs-", dir=args.base))
        image = loop / "fs.img"
        with open(image, "wb") as f:
            f.truncate(12 << 30)
        # One inode per 4 KiB: the trees and stores are mostly small files and shard dirs.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", os.fspath(image)], check=True)
        (loop / "mnt").mkdir()
        subprocess.run(
            ["mount", "-o", "loop", os.fspath(image), os.fspath(loop / "mnt")], check=True
        )
        args.base = os.fspath(loop / "mnt")
    base = Path(tempfile.mkdtemp(prefix="velo-bench-ingest-", dir=args.base))
    try:
        small = base / "small"
        make_small_tree(small, args.small_files)
        results = [bench_tree("small-4k", small, base, args.repeat)]
        results.append(bench_tree("real", Path(args.real), base, args.repeat))
        mem = bench_memory(base, args.memory_files)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if loop is not None:
            subprocess.run(["umount", os.fspath(loop / "mnt")], check=False)
            shutil.rmtree(loop, ignore_errors=True)
    where = "a fresh loop-mounted ext4" if loop is not None else f"base {args.base}"
    print(f"ingest vs git add -A  ({where}, median of {args.repeat}, 2 cores, cache warm)")
    hdr = (
        f"{'tree':10} {'files':>7} {'velo f/s':>10} {'git f/s':>9} {'ratio':>6} "
        f"{'re-ingest f/s':>14}"
    )
    print(hdr)
    for r in results:
        print(
            f"{r['tree']:10} {r['files']:>7} {r['veloverlay_files_per_s']:>10,.0f} "
            f"{r['git_files_per_s']:>9,.0f} {r['ratio_vs_git']:>5.2f}x "
            f"{r['reingest_files_per_s']:>14,.0f}"
        )
    print(
        f"peak memory ingesting {mem['files']:,} files: {mem['peak_pss_mb']:.0f} MB PSS "
        f"(process tree; sum of RSS {mem['peak_rss_sum_mb']:.0f} MB)"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {"where": where, "repeat": args.repeat, "trees": results, "memory": mem}
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
