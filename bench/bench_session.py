"""Session benchmarks, each a ratio measured in one run (DESIGN.md, issue 4):

1. warm `run REF -- true` on a 100,000-file manifest against `unshare -rm` + the same overlay
   mount + `true`; our overhead beyond interpreter start-up (goal <= 50 ms);
2. cold lower build of 100,000 files against `cp -a` of the same tree (goal >= 2x faster);
3. the next session after a 10-file commit against the warm start (goal <= 1.5x: no rebuild);
4. harvest + commit of 10 changed files in a 100,000-file manifest against a 1,000-file one
   (goal <= 1.5x), and against `git add -A && git commit` of the same change.
5. as root: the warm start in the root-native overlay mode (the default for real root since
   issue 17) against the same session in the userns mode (root's sessions before it;
   VELO_OVERLAY_MODE forces each).

Harvest + commit runs alternate between the two manifests (at least 9 of each, medians).
Commands are timed as whole processes (wall clock, interpreter start-up included) with hyperfine
when installed, else time.perf_counter: --repeat rounds, each running every command once in a
rotating order (medians), so that the machine's drift weighs on every command alike. Harvest +
commit comes from the session's own phase timings (SessionResult.timings). Everything runs in
fresh directories under --base (ext4 by default: creating inodes right after mass deletes is
several times slower there, feasibility.md section 9), removed at the end.

Usage: python bench/bench_session.py [--base DIR] [--files N] [--repeat N] [--quick]
Prints a table and writes bench/results/session.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

from benchlib import GIT_ENV, GIT_QUIET, copy_tree, hyperfine_rounds  # noqa: E402

from veloverlay import session  # noqa: E402
from veloverlay.ingest import ingest  # noqa: E402
from veloverlay.lower.stacks import ensure_lowers  # noqa: E402
from veloverlay.session import select  # noqa: E402
from veloverlay.store.cas import Store  # noqa: E402
from veloverlay.store.manifest import Manifests  # noqa: E402


def make_tree(root: Path, files: int, per_dir: int = 100, size: int | None = None) -> None:
    """`files` files of 200-2,000 bytes (or `size`) in directories of `per_dir`, backdated."""
    old = time.time_ns() - 3_600_000_000_000
    for i in range(files):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        p = d / f"f{i % per_dir:03d}.txt"
        with open(p, "wb") as f:
            f.write(os.urandom(size if size is not None else 200 + (i * 7919) % 1800))
        os.utime(p, ns=(old, old))


def ten_files(root: Path) -> list[str]:
    return [f"d{i:05d}/f007.txt" for i in range(0, 10)]


def hyperfine(cmds: dict[str, str], runs: int, prepare: str | None = None) -> dict[str, float]:
    """Median seconds per command, the commands interleaved (`benchlib.hyperfine_rounds`; without
    hyperfine, timed here the same way)."""
    for name, cmd in cmds.items():  # once first, so that a failing command names itself
        pre = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
        if pre.returncode != 0:
            raise SystemExit(f"error: {name} failed ({pre.returncode}): {pre.stderr.strip()}")
    if shutil.which("hyperfine") is not None:
        got = hyperfine_rounds(cmds, runs, prepare=prepare)
        return {name: statistics.median(wall for wall, _cpu in ts) for name, ts in got.items()}
    names = list(cmds)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if prepare:
                subprocess.run(prepare, shell=True, check=True, stdout=subprocess.DEVNULL)
            t0 = time.perf_counter()
            subprocess.run(cmds[name], shell=True, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(argv: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def lib_cmd(py: str, store: Path, ref: str, at: Path) -> str:
    code = (
        "import sys;"
        "from veloverlay.store.cas import Store;"
        "from veloverlay.session import run, SessionOptions;"
        f"sys.exit(run(Store({str(store)!r}), SessionOptions(refs=[{ref!r}], at={str(at)!r}),"
        " ['true']).exit_status)"
    )
    return f'{py} -c "{code}"'


def change_ten(store: Store, ref: str, at: Path, tag: str) -> session.SessionResult:
    script = "; ".join(f"printf {tag} >> {f}" for f in ten_files(at))
    return session.run(
        store,
        session.SessionOptions(refs=[ref], at=str(at), grace=1.0),
        ["sh", "-c", f"cd {at}; {script}"],
    )


def kernel_memory() -> int:
    """Bytes of kernel memory a tmpfs tree holds: slab (inodes, dentries, xattrs) + shmem."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["Slab"] + fields["Shmem"]


def unlock_tree(path: Path) -> None:
    """Clear +i (objects of a root store) so the bench directory can be removed."""
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-R", "-i", str(path)], stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/var/tmp")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--million", action="store_true", help="a 1,000,000-file manifest (long)")
    ap.add_argument(
        "--fs",
        choices=("loop", "dir"),
        default="loop" if os.geteuid() == 0 and shutil.which("mkfs.ext4") else "dir",
        help="loop: a fresh ext4 image mounted under --base (root); dir: --base itself",
    )
    args = ap.parse_args()
    if args.million:
        args.files = 1_000_000
    if args.quick:
        args.files, args.repeat = 5_000, 5
    py = sys.executable
    top = Path(tempfile.mkdtemp(prefix="velo-bench-session-", dir=args.base))
    # The per-boot layer cache (lower/homes.py) of this run: on tmpfs, removed at the end.
    runtime = tempfile.mkdtemp(prefix="velo-bench-runtime-", dir="/dev/shm")
    os.environ["VELO_RUNTIME_DIR"] = runtime
    # Interpreters start with compiled bytecode as an installed package would (this machine
    # sets PYTHONDONTWRITEBYTECODE): the cache goes to a temp dir, not into the work tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(top / "pycache")
    os.environ["PYTHONPATH"] = str(ROOT)
    env = dict(os.environ)
    subprocess.run([py, "-c", "import veloverlay.cli, veloverlay.session"], check=True, env=env)
    mounted = False
    if args.fs == "loop":
        img = top / "fs.img"
        with open(img, "wb") as f:
            # --million holds about 5 inodes per file at the end (the source, its objects, the
            # layers kept in the store, cp -a's copy, git's copy) and their blocks
            f.truncate((16 << 30) + args.files * (32 << 10))
        inodes = str(max(3_000_000, args.files * 7))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", inodes, str(img)], check=True)
        (top / "fs").mkdir()
        subprocess.run(["mount", "-o", "loop", str(img), str(top / "fs")], check=True)
        mounted = True
        base = top / "fs"
    else:
        base = top / "work"
        base.mkdir()
    results: dict[str, Any] = {"files": args.files, "small": args.small, "fs": args.fs}
    m: Manifests | None = None
    store: Store | None = None
    try:
        big_src, small_src = base / "src-big", base / "src-small"
        t0 = time.perf_counter()
        make_tree(big_src, args.files)
        make_tree(small_src, args.small)
        results["generate_s"] = time.perf_counter() - t0
        store = Store.init(base / "store")
        choice = select.decide(select.capabilities(store), "overlay")
        choice.raise_error()
        assert choice.form is not None
        form, privileged, protect = choice.form, choice.privileged, choice.protect
        results.update(form=form, privileged=privileged, protect=protect)
        m = Manifests(store)
        t0 = time.perf_counter()
        ingest(store, m, str(big_src), "big")
        results["ingest_big_s"] = time.perf_counter() - t0
        ingest(store, m, str(small_src), "small")
        with m.read() as txn:
            big_root = bytes.fromhex(m.resolve(txn, "big")[1].root)

        # 2. cold lower build vs cp -a (both on the page-cache-warm tree, fresh directories;
        # dirty data written back first so that neither pays for the generation's writeback).
        # In the per-boot tmpfs cache (the default), then — +i cleared again, untimed — with the
        # layers kept in the store (VELO_RUNTIME_DIR=off: short names made, +i set).
        os.sync()
        mem0 = kernel_memory()
        t0 = time.perf_counter()
        lowers = ensure_lowers(store, m, big_root, form=form, protect=protect)
        cold = time.perf_counter() - t0
        ram = kernel_memory() - mem0
        unlock_tree(store.objects)
        os.environ["VELO_RUNTIME_DIR"] = "off"
        os.sync()
        t0 = time.perf_counter()
        ensure_lowers(store, m, big_root, form=form, protect=protect)
        store_kept = time.perf_counter() - t0
        os.environ["VELO_RUNTIME_DIR"] = runtime
        m.close()
        os.sync()
        cpa = timed(["cp", "-a", str(big_src), str(base / "cp-a")])
        os.sync()
        results["cold_build"] = {
            "veloverlay_s": cold,
            "cp_a_s": cpa,
            "speedup": cpa / cold,
            "goal": ">= 2x",
            "form": form,
            "home": lowers.home,
            "immutable": lowers.immutable,
            "ram_bytes_per_file": ram / args.files,
            "store_kept_s": store_kept,
            "store_kept_speedup": cpa / store_kept,
        }
        # Larger files: cp -a pays for the bytes, a metadata layer does not.
        m = Manifests(store)
        n_large = min(max(1000, args.files // 5), 20_000)
        large_src = base / "src-large"
        make_tree(large_src, n_large, size=32 << 10)
        ingest(store, m, str(large_src), "large")
        with m.read() as txn:
            root3 = bytes.fromhex(m.resolve(txn, "large")[1].root)
        os.sync()
        t0 = time.perf_counter()
        ensure_lowers(store, m, root3, form=form, protect=protect)
        large_build = time.perf_counter() - t0
        os.sync()
        large_cp = timed(["cp", "-a", str(large_src), str(base / "cp-a-large")])
        os.sync()
        results["cold_build_32k"] = {
            "files": n_large,
            "veloverlay_s": large_build,
            "cp_a_s": large_cp,
            "speedup": large_cp / large_build,
        }
        m.close()

        # 1. warm run vs unshare -rm + overlay mount + true
        os.sync()
        # existing targets, as a project's directory is: a session removes a target it made
        # itself at its end, and the baseline mounts on this one
        at = base / "proj-big"
        at_small = base / "proj-small"
        at.mkdir()
        at_small.mkdir()
        session.run(store, session.SessionOptions(refs=["big"], at=str(at)), ["true"])
        session.run(store, session.SessionOptions(refs=["small"], at=str(at_small)), ["true"])
        native = choice.mode == "native"
        results["mode"] = choice.mode
        if native:  # warm the userns mode's own layers too (user.overlay.* markers)
            os.environ["VELO_OVERLAY_MODE"] = "userns"
            try:
                session.run(store, session.SessionOptions(refs=["big"], at=str(at)), ["true"])
            finally:
                del os.environ["VELO_OVERLAY_MODE"]
        up, wk = base / "bl-upper", base / "bl-work"
        up.mkdir()
        wk.mkdir()
        lowerdir = ":".join(lowers.layers) + "".join("::" + d for d in lowers.data_layers)
        mnt = (
            f"mount -t overlay overlay -o lowerdir={lowerdir},upperdir={up},workdir={wk},"
            f"userxattr {at}"
        )
        cmds = {
            "python -c pass": f"{py} -c pass",
            "unshare -rm + overlay mount + true": f"unshare -rm sh -c '{mnt} && exec true'",
            "veloverlay (library) run -- true": lib_cmd(py, store.root, "big", at),
            "veloverlay (library) run small -- true": lib_cmd(py, store.root, "small", at_small),
            "veloverlay (CLI) run -- true": (
                f"{py} -m veloverlay --store {store.root} run big --at {at} -- true"
            ),
            "python -c 'import veloverlay.cli'": f"{py} -c 'import veloverlay.cli'",
        }
        if native:
            cmds["veloverlay (library) run -- true, userns mode"] = (
                "env VELO_OVERLAY_MODE=userns " + lib_cmd(py, store.root, "big", at)
            )
        warm = hyperfine(cmds, args.repeat)
        startup = warm["python -c pass"]
        baseline = warm["unshare -rm + overlay mount + true"]
        lib = warm["veloverlay (library) run -- true"]
        cli = warm["veloverlay (CLI) run -- true"]
        results["warm_run"] = {
            "medians_s": warm,
            "library_overhead_beyond_startup_and_baseline_ms": (lib - startup - baseline) * 1e3,
            "library_minus_startup_ms": (lib - startup) * 1e3,
            "cli_minus_startup_ms": (cli - startup) * 1e3,
            "cli_import_ms": (warm["python -c 'import veloverlay.cli'"] - startup) * 1e3,
            "small_library_minus_startup_ms": (
                warm["veloverlay (library) run small -- true"] - startup
            )
            * 1e3,
            "big_over_small": lib / warm["veloverlay (library) run small -- true"],
            "goal": "<= 50 ms beyond interpreter start-up",
        }
        if native:
            userns = warm["veloverlay (library) run -- true, userns mode"]
            results["native_vs_userns"] = {
                "native_s": lib,
                "userns_s": userns,
                "ratio_native_over_userns": lib / userns,
                "native_minus_startup_ms": (lib - startup) * 1e3,
                "userns_minus_startup_ms": (userns - startup) * 1e3,
            }

        # 3. the next session after a 10-file commit (a delta layer, no rebuild)
        nexts = []
        for i in range(max(3, args.repeat // 3)):
            change_ten(store, "big", at, f"n{i}")
            nexts.append(timed(["sh", "-c", lib_cmd(py, store.root, "big", at)], env=env))
        results["next_after_commit"] = {
            "median_s": statistics.median(nexts),
            "warm_s": lib,
            "ratio": statistics.median(nexts) / lib,
            "goal": "<= 1.5x the warm start",
        }

        # 4. harvest + commit of 10 changed files: 100k vs 1k manifests, vs git
        def harvest_commit(ref: str, at: Path, tag: str) -> float:
            r = change_ten(store, ref, at, tag)
            assert r.commit, r
            return r.timings["harvest"] + r.timings["commit"]

        os.sync()
        harvest_commit("small", base / "proj-small", "h")  # builds its lower
        # the two alternate, so that a machine getting busier or quieter meanwhile moves both
        bigs, smalls = [], []
        for i in range(max(args.repeat, 9)):
            bigs.append(harvest_commit("big", at, f"b{i}"))
            smalls.append(harvest_commit("small", base / "proj-small", f"s{i}"))
        hc_big, hc_small = statistics.median(bigs), statistics.median(smalls)
        git_dir = base / "git-big"
        copy_tree(big_src, git_dir)
        genv = dict(env, **GIT_ENV)
        git = "git " + " ".join(GIT_QUIET)
        subprocess.run(["git", "init", "-q"], cwd=git_dir, check=True)
        subprocess.run(
            ["sh", "-c", f"{git} add -A && {git} commit -qm base"],
            cwd=git_dir,
            check=True,
            env=genv,
        )
        gits = []
        for i in range(max(3, args.repeat // 3)):
            for name in ten_files(git_dir):
                with open(git_dir / name, "a") as fh:
                    fh.write(f"g{i}")
            gits.append(
                timed(
                    ["sh", "-c", f"{git} add -A && {git} commit -qm change"], cwd=git_dir, env=genv
                )
            )
        results["harvest_commit"] = {
            "big_s": hc_big,
            "small_s": hc_small,
            "ratio_big_small": hc_big / hc_small,
            "git_add_commit_big_s": statistics.median(gits),
            "ratio_git_over_ours": statistics.median(gits) / hc_big,
            "goal": "<= 1.5x (100k vs 1k)",
        }
    finally:
        if m is not None:
            m.close()  # idempotent; an open environment keeps the loop fs busy
        if store is not None:
            store.close()  # so do the store's own descriptors (what held it in a 2026-12 run)
        unlock_tree(base)
        shutil.rmtree(runtime, ignore_errors=True)
        if mounted:
            r = subprocess.run(["umount", str(base)], capture_output=True, text=True)
            if r.returncode != 0:  # say what holds it, then detach it anyway
                fu = subprocess.run(["fuser", "-vm", str(base)], capture_output=True, text=True)
                print(f"bench: umount {base}: {r.stderr.strip()}\n{fu.stderr}", file=sys.stderr)
                results["umount_busy"] = fu.stderr
                subprocess.run(["umount", "-l", str(base)], check=False)
        shutil.rmtree(top, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "session.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    w = results["warm_run"]
    c = results["cold_build"]
    n = results["next_after_commit"]
    h = results["harvest_commit"]
    cl = results["cold_build_32k"]
    rows = [
        (
            "warm run -- true (library), median",
            f"{w['medians_s']['veloverlay (library) run -- true'] * 1e3:.1f} ms",
            "",
        ),
        (
            "  unshare -rm + overlay mount + true",
            f"{w['medians_s']['unshare -rm + overlay mount + true'] * 1e3:.1f} ms",
            "",
        ),
        ("  python -c pass (start-up)", f"{w['medians_s']['python -c pass'] * 1e3:.1f} ms", ""),
        (
            "  our overhead beyond start-up + baseline",
            f"{w['library_overhead_beyond_startup_and_baseline_ms']:.1f} ms",
            "goal <= 50 ms",
        ),
        (
            f"  the same, {args.small}-file manifest, minus start-up",
            f"{w['small_library_minus_startup_ms']:.1f} ms",
            f"big/small {w['big_over_small']:.2f}",
        ),
        (
            "warm run -- true (CLI), minus start-up",
            f"{w['cli_minus_startup_ms']:.1f} ms",
            f"(CLI import {w['cli_import_ms']:.0f} ms)",
        ),
        (
            f"cold lower build, {args.files} files ({c['form']})",
            f"{c['veloverlay_s']:.2f} s",
            f"cp -a {c['cp_a_s']:.2f} s",
        ),
        ("  speedup over cp -a", f"{c['speedup']:.2f}x", "goal >= 2x"),
        ("  kernel memory of the per-boot layer", f"{c['ram_bytes_per_file']:.0f} B/file", ""),
        (
            "  layers kept in the store (VELO_RUNTIME_DIR=off)",
            f"{c['store_kept_s']:.2f} s",
            f"{c['store_kept_speedup']:.2f}x cp -a",
        ),
        (
            f"cold lower build, {results['cold_build_32k']['files']} x 32 KiB",
            f"{results['cold_build_32k']['veloverlay_s']:.2f} s",
            f"cp -a {cl['cp_a_s']:.2f} s ({cl['speedup']:.2f}x)",
        ),
        (
            "next session after a 10-file commit",
            f"{n['median_s'] * 1e3:.1f} ms",
            f"{n['ratio']:.2f}x warm; goal <= 1.5x",
        ),
        (f"harvest+commit 10 files, {args.files} files", f"{h['big_s'] * 1e3:.1f} ms", ""),
        (
            f"harvest+commit 10 files, {args.small} files",
            f"{h['small_s'] * 1e3:.1f} ms",
            f"ratio {h['ratio_big_small']:.2f}; goal <= 1.5",
        ),
        (
            "git add -A && git commit, same change",
            f"{h['git_add_commit_big_s'] * 1e3:.1f} ms",
            f"{h['ratio_git_over_ours']:.1f}x ours",
        ),
    ]
    if "native_vs_userns" in results:
        nv = results["native_vs_userns"]
        rows.append(
            (
                "warm run -- true, root-native (minus start-up)",
                f"{nv['native_minus_startup_ms']:.1f} ms",
                f"{nv['ratio_native_over_userns']:.2f}x the userns mode "
                f"({nv['userns_minus_startup_ms']:.1f} ms)",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
