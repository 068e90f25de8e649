"""Helpers shared by the benchmarks: trees, a fresh loop-mounted ext4, timing, peers, memory.

Not a benchmark itself (run_all.py runs only the bench_*.py files).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# Peers run with these: `git gc --auto` detaches a background repack (its cwd in the repository)
# after commits of many loose objects. It outlived the command being timed, kept the benchmark's
# loop-mounted ext4 busy ("target is busy" at clean-up) and competed with the next measurement.
GIT_QUIET = ["-c", "gc.auto=0", "-c", "gc.autoDetach=false", "-c", "maintenance.auto=false"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@b",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@b",
}


def make_small_tree(root: Path, files: int, size: int = 4096, per_dir: int = 100) -> None:
    """`files` files of `size` random bytes in directories of `per_dir`, backdated an hour
    (files younger than the racy window are read twice by design; a real tree is old)."""
    rnd = os.urandom
    old = time.time_ns() - 3_600_000_000_000
    for i in range(files):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        p = d / f"f{i % per_dir:03d}"
        with open(p, "wb") as f:
            f.write(rnd(size))
        os.utime(p, ns=(old, old))


def count_files(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under root."""
    n = b = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                n += 1
                b += st.st_size
    return n, b


def warm(root: Path) -> None:
    """Read every regular file once (page cache warm for every contender)."""
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


def settle(tree: Path) -> None:
    """The same start for every contender of an ingest: nothing dirty (sync), and as root a page
    cache holding the source tree and little else (drop the clean cache, read the tree again).
    Without it each run met the cache the earlier runs filled: on a loop mount every object is
    cached twice (the loop filesystem and its image file), the machine's free memory ran out
    midway through the run, and the later rows paid for page reclaim the earlier ones did not
    (the 100k rows ran ~20% slower after a dozen ingests than on a fresh machine)."""
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        # The dropped cache held the contenders' programs too: load them again (git and its
        # libraries; the interpreter and the modules an ingest imports), or each run would
        # also be a cold start, the interpreter's many files more than git's one binary.
        subprocess.run(["git", "--version"], check=True, stdout=subprocess.DEVNULL)
        code = "import veloverlay.cli, veloverlay.ingest, veloverlay.store.cas"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    warm(tree)


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def velo_cmd() -> list[str]:
    return [sys.executable, "-m", "veloverlay"]


def git_add(tree: Path, gitdir: Path) -> float:
    """`git add -A` of `tree` into a fresh bare git dir (outside the tree), timed."""
    subprocess.run(["git", "init", "-q", "--bare", os.fspath(gitdir)], check=True)
    return timed(
        ["git", *GIT_QUIET, f"--git-dir={gitdir}", f"--work-tree={tree}", "add", "-A"],
        cwd=os.fspath(tree),
    )


def copy_tree(src: Path, dst: Path) -> None:
    """`cp -a src dst` (symlinks kept as links); a failure (e.g. the benchmark's filesystem is
    full) ends the benchmark with cp's first complaint, not one line per file."""
    r = subprocess.run(["cp", "-a", "--", str(src), str(dst)], capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        first = lines[0] if lines else f"exit status {r.returncode}"
        raise SystemExit(f"bench: copying {src} failed: {first}{more}")


def unlock_tree(path: Path) -> None:
    """Clear +i (objects of a root store) so a bench directory can be removed."""
    if os.geteuid() == 0 and shutil.which("chattr") and path.exists():
        subprocess.run(["chattr", "-R", "-i", str(path)], stderr=subprocess.DEVNULL, check=False)


@contextlib.contextmanager
def scratch(
    base: str,
    prefix: str,
    size: int,
    inode_ratio: int | None,
    loop: bool,
    mkfs_opts: tuple[str, ...] = (),
    fstype: str = "ext4",
) -> Iterator[Path]:
    """A fresh directory for a benchmark: on a new loop-mounted `fstype` (ext4, or xfs with
    reflinks) under `base` when `loop` (root only), else a temp dir in `base`. Everything is
    removed and unmounted afterwards; a failed unmount says what still holds the filesystem."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    mnt = top / "mnt"
    mounted = False
    try:
        if loop:
            image = top / "fs.img"
            with open(image, "wb") as f:
                f.truncate(size)
            if fstype == "xfs":
                mkfs = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", *mkfs_opts]
            else:
                opts = [*(["-i", str(inode_ratio)] if inode_ratio else []), *mkfs_opts]
                mkfs = ["mkfs.ext4", "-q", "-F", *opts]
            subprocess.run([*mkfs, os.fspath(image)], check=True)
            mnt.mkdir()
            subprocess.run(["mount", "-o", "loop", os.fspath(image), os.fspath(mnt)], check=True)
            mounted = True
        else:
            mnt.mkdir()
        yield mnt
    finally:
        unlock_tree(mnt)
        if mounted:
            r = subprocess.run(["umount", os.fspath(mnt)], capture_output=True, text=True)
            if r.returncode != 0:
                holders = subprocess.run(
                    ["fuser", "-vm", os.fspath(mnt)], capture_output=True, text=True
                )
                print(
                    f"bench: cannot unmount {mnt}: {r.stderr.strip()}\n{holders.stderr}",
                    file=sys.stderr,
                )
                subprocess.run(["umount", "-l", os.fspath(mnt)], check=False)
        shutil.rmtree(top, ignore_errors=True)


def tree_mem_kb(pid: int) -> tuple[int, int]:
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


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run `cmd`, sampling the PSS of its process tree every 50 ms: (seconds, peak PSS MB, peak
    sum-of-RSS MB)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    peak = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_rss
        while not done.is_set():
            pss, rss = tree_mem_kb(proc.pid)
            peak, peak_rss = max(peak, pss), max(peak_rss, rss)
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t0 = time.perf_counter()
    t.start()
    rc = proc.wait()
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc})")
    return secs, peak / 1024, peak_rss / 1024


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def hyperfine_rounds(
    cmds: dict[str, str],
    runs: int,
    env: dict[str, str] | None = None,
    prepare: str | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """Time every command `runs` times with hyperfine, interleaved: each round runs every command
    once, in an order that rotates from round to round (3 warm-up runs each in the first).
    Returns each command's (wall, user + system CPU) seconds per run. Timed one command after
    the other instead (all runs of the first, then of the second...), figures of a machine whose
    speed drifts within minutes, as this kind's does, came from different minutes: a --million
    bench_session run measured the root-native warm run 14 ms slower than the userns mode's
    that way; in alternation (20 rounds), on a manifest of the same shape, 7 ms faster."""
    names = list(cmds)
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        with tempfile.NamedTemporaryFile(suffix=".json") as export:
            args = ["hyperfine", "-N", "--warmup", "3" if r == 0 else "0", "--runs", "1"]
            args += ["--export-json", export.name, "--style", "none"]
            if prepare:
                args += ["--prepare", prepare]
            for name in order:
                args += ["-n", name, cmds[name]]
            done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            if done.returncode != 0:
                raise SystemExit(
                    f"bench: hyperfine failed:\n{done.stderr.decode(errors='replace')}"
                )
            data = json.loads(Path(export.name).read_text())
        for res in data["results"]:
            got[res["command"]].append((float(res["times"][0]), res["user"] + res["system"]))
    return got
