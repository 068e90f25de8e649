"""Ingest throughput against `git add -A` (git's own content-addressed store), in one run.

1. Scaling table: a 20,000-file and a 100,000-file tree (4 KiB files, 100 per directory), each
   ingested into a fresh store with 1, 2, 4 ... up to the machine's CPUs workers, and `git add -A`
   of the same tree into a fresh git dir, in the same run (median of --repeat runs each). Per row:
   files/s of the whole command (interpreter start-up included) and of the ingest call alone, the
   ratio against git, and the coordinator's serial cost: the CPU time (user + system) of the
   ingesting process itself, without its workers, per file.
2. A real tree (/usr/share by default, >= 10,000 files) against git, same way.
3. Re-ingest of the unchanged trees (stat cache).
4. Peak memory (PSS summed over the process tree, sampled every 50 ms) ingesting --memory-files
   small files (200,000 by default; --million: 1,000,000), and the unchanged re-ingest of that tree.

Every run uses new directories: on ext4, creating inodes right after mass deletes in the same block
group is several times slower (feasibility.md section 9), so nothing is deleted until the end. As
root, everything runs on a freshly made loop-mounted ext4 (--no-loop: --base as it is), and each
ingest and `git add` of the scaling rows starts from the same page cache: synced, the clean cache
dropped, the source tree read again (benchlib.settle).

Usage: python bench/bench_ingest.py [--base DIR] [--repeat N] [--jobs 1,2] [--million] [--quick]
       [--profile]
Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    RESULTS,
    ROOT,
    count_files,
    git_add,
    make_small_tree,
    run_sampled,
    scratch,
    self_cpu,
    settle,
    velo_cmd,
    warm,
)


def probe(store: str, tree: str, ref: str, jobs: int, profile: bool) -> None:
    """In a fresh interpreter: ingest once, print JSON (wall of the call, own CPU, counts)."""
    sys.path.insert(0, str(ROOT))
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    st = Store.init(store)
    m = Manifests(st)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = self_cpu(), time.perf_counter()
    if prof is not None:
        prof.enable()
    res = ingest(st, m, tree, ref, jobs=jobs)
    if prof is not None:
        prof.disable()
    secs, cpu = time.perf_counter() - t0, self_cpu() - c0
    k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
    m.close()
    if prof is not None:
        import pstats

        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    out = {"seconds": secs, "cpu": cpu, "workers_cpu": workers_cpu, "files": res.files}
    out["hashed"] = res.hashed
    print(json.dumps(out))


def run_probe(
    store: Path, tree: Path, ref: str, jobs: int, profile: bool = False
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", str(store), str(tree), ref, str(jobs)]
    if profile:
        cmd.append("--profile")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    out["command_s"] = time.perf_counter() - t0
    return out


def jobs_list(spec: str | None) -> list[int]:
    if spec:
        return [int(j) for j in spec.split(",")]
    n = os.cpu_count() or 1
    out, j = [], 1
    while j < n:
        out.append(j)
        j *= 2
    return [*out, n]


def bench_scaling(
    name: str, tree: Path, base: Path, repeat: int, jobs: list[int], profile: bool
) -> dict[str, Any]:
    """Ingest of `tree` with each worker count vs git add -A, interleaved in each repeat."""
    files, nbytes = count_files(tree)
    warm(tree)
    git: list[float] = []
    runs: dict[int, list[dict[str, Any]]] = {j: [] for j in jobs}
    reingest: list[dict[str, Any]] = []
    # Each run starts with nothing dirty (git does not sync its objects, and the next run's
    # syncfs would otherwise write them out on its own clock) and the same page cache: the
    # source tree, little else (`settle`).
    for i in range(repeat):
        settle(tree)
        git.append(git_add(tree, base / f"git-{name}-{i}"))
        for j in jobs:
            store = base / f"store-{name}-{i}-j{j}"
            settle(tree)
            runs[j].append(run_probe(store, tree, name, j))
            if j == jobs[-1]:
                os.sync()
                reingest.append(run_probe(store, tree, name, j))
    if profile:
        print(f"-- profile of the coordinator, {name}, {jobs[-1]} workers", file=sys.stderr)
        run_probe(base / f"store-{name}-prof", tree, name, jobs[-1], profile=True)
    g = statistics.median(git)
    rows = []
    for j in jobs:
        cmd = statistics.median(r["command_s"] for r in runs[j])
        call = statistics.median(r["seconds"] for r in runs[j])
        cpu = statistics.median(r["cpu"] for r in runs[j])
        rows.append(
            {
                "jobs": j,
                "command_s": cmd,
                "ingest_s": call,
                "files_per_s": files / cmd,
                "ingest_files_per_s": files / call,
                "ratio_vs_git": g / cmd,
                "coordinator_us_per_file": cpu / files * 1e6,
                "runs": runs[j],
            }
        )
    r_cmd = statistics.median(r["command_s"] for r in reingest)
    r_call = statistics.median(r["seconds"] for r in reingest)
    return {
        "tree": name,
        "files": files,
        "bytes": nbytes,
        "git_add_s": g,
        "git_files_per_s": files / g,
        "git_runs": git,
        "rows": rows,
        "reingest_command_s": r_cmd,
        "reingest_files_per_s": files / r_call,
        "reingest_command_files_per_s": files / r_cmd,
    }


def bench_memory(base: Path, files: int) -> dict[str, Any]:
    tree = base / "mem-tree"
    t0 = time.perf_counter()
    make_small_tree(tree, files, size=512, per_dir=500)
    made = time.perf_counter() - t0
    store = base / "store-mem"
    env = dict(os.environ, VELO_STORE=os.fspath(store))
    settle(tree)  # the new tree is written out first: not by the ingest's syncfs, on its clock
    secs, pss, rss = run_sampled([*velo_cmd(), "ingest", os.fspath(tree), "--name", "mem"], env)
    again = run_probe(store, tree, "mem", os.cpu_count() or 1)
    r_secs, r_pss, _ = run_sampled([*velo_cmd(), "ingest", os.fspath(tree), "--name", "mem"], env)
    return {
        "files": files,
        "generate_s": made,
        "seconds": secs,
        "files_per_s": files / secs,
        "peak_pss_mb": pss,
        "peak_rss_sum_mb": rss,
        "reingest_s": again["seconds"],
        "reingest_files_per_s": files / again["seconds"],
        "reingest_command_s": r_secs,
        "reingest_peak_pss_mb": r_pss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--base", default="/var/tmp", help="where trees and stores go (default ext4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--real", default="/usr/share", help="a real tree of >= 10,000 files ('' to skip)"
    )
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--big-files", type=int, default=100000)
    ap.add_argument("--jobs", help="worker counts, e.g. 1,2,4 (default: 1, 2, 4 ... CPUs)")
    ap.add_argument("--memory-files", type=int, default=200000, help="0 to skip")
    ap.add_argument("--million", action="store_true", help="the 1,000,000-file memory row (long)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (smoke test)")
    ap.add_argument("--profile", action="store_true", help="print the coordinator's profile")
    ap.add_argument(
        "--no-loop",
        action="store_true",
        help="use --base as it is instead of a fresh loop-mounted ext4 (the default as root)",
    )
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        store, tree, ref, jobs = args.probe
        probe(store, tree, ref, int(jobs), args.profile)
        return
    if args.million:
        args.memory_files = 1_000_000
    if args.quick:
        args.repeat, args.small_files, args.big_files = 1, 2000, 5000
        args.memory_files = min(args.memory_files, 5000)
    jobs = jobs_list(args.jobs)
    loop = os.geteuid() == 0 and not args.no_loop
    # One inode per 4 KiB: the trees and stores are mostly small files and shard dirs.
    size = (16 << 30) + (args.memory_files * 12 << 10)
    with scratch(args.base, "velo-bench-ingest-", size, 4096, loop) as base:
        trees = []
        for name, n in (("20k", args.small_files), ("100k", args.big_files)):
            if n <= 0:
                continue
            tree = base / f"tree-{name}"
            make_small_tree(tree, n)
            trees.append(bench_scaling(name, tree, base, args.repeat, jobs, args.profile))
        if args.real:
            trees.append(
                bench_scaling("real", Path(args.real), base, args.repeat, [jobs[-1]], False)
            )
        mem = bench_memory(base, args.memory_files) if args.memory_files > 0 else None
    where = "a fresh loop-mounted ext4" if loop else f"base {args.base}"
    print(
        f"ingest vs git add -A  ({where}, median of {args.repeat}, {os.cpu_count()} CPUs, "
        "cache warm; f/s of the whole command, interpreter start-up included)"
    )
    print(
        f"{'tree':6} {'files':>7} {'jobs':>4} {'velo f/s':>9} {'(call)':>8} {'git f/s':>8} "
        f"{'ratio':>6} {'coord us/f':>10}"
    )
    for t in trees:
        for r in t["rows"]:
            print(
                f"{t['tree']:6} {t['files']:>7} {r['jobs']:>4} {r['files_per_s']:>9,.0f} "
                f"{r['ingest_files_per_s']:>8,.0f} {t['git_files_per_s']:>8,.0f} "
                f"{r['ratio_vs_git']:>5.2f}x {r['coordinator_us_per_file']:>10.1f}"
            )
    print("goals: >= 20,000 files/s and >= 2.5x git on 2 cores; coordinator <= 8 us/file")
    for t in trees:
        print(
            f"re-ingest unchanged {t['tree']:5}: {t['reingest_files_per_s']:>9,.0f} files/s "
            f"(whole command {t['reingest_command_files_per_s']:,.0f})"
        )
    if mem:
        print(
            f"{mem['files']:,} files of 512 B: ingest {mem['files_per_s']:,.0f} files/s, "
            f"peak memory {mem['peak_pss_mb']:.0f} MB PSS (process tree; sum of RSS "
            f"{mem['peak_rss_sum_mb']:.0f} MB), goal < 1 GB at 1,000,000; unchanged re-ingest "
            f"{mem['reingest_files_per_s']:,.0f} files/s (goal >= 100,000), whole command "
            f"{mem['reingest_command_s']:.2f} s"
        )
    RESULTS.mkdir(exist_ok=True)
    real = [t for t in trees if t["tree"] == "real"]
    out = {"where": where, "repeat": args.repeat, "jobs": jobs}
    out |= {"trees": [t for t in trees if t["tree"] != "real"], "real": real[0] if real else None}
    out["memory"] = mem
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
