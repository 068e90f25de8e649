"""Shim backend benchmarks (DESIGN.md "Backends", issue 5), each a ratio measured in one run:

1. open/stat-heavy workloads with the shim loaded against the same without it (goal <= 1.2x):
   `python3 -c 'import json, email, http'` (hundreds of opens and stats in one process),
   `find TREE -type f -exec cat {} +` over a projected tree (many opens, few processes) and
   `find SUB -type f -exec cat {} \\;` (one process per file: the shim's start-up and check-in).
   The shimmed runs use a real session export, journal and a listening check-in socket;
2. materialisation of a 100,000-file tree by reflink/copy and by --link, against `cp -a` of the
   same tree (wall clock of the materialise call vs the cp process).

Medians of --repeat runs. Everything runs in fresh directories under --base (ext4 by default),
removed at the end.

Usage: python bench/bench_shim.py [--base DIR] [--files N] [--repeat N] [--quick]
Prints a table and writes bench/results/shim.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

from veloverlay.ingest import ingest  # noqa: E402
from veloverlay.session.shim import library as shim  # noqa: E402
from veloverlay.session.shim.materialize import materialize, prepare_target  # noqa: E402
from veloverlay.store.cas import Store  # noqa: E402
from veloverlay.store.manifest import Manifests  # noqa: E402

PY = "/usr/bin/python3"


def make_tree(root: Path, files: int, per_dir: int = 100) -> None:
    old = time.time_ns() - 3_600_000_000_000
    for i in range(files):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        p = d / f"f{i % per_dir:03d}.txt"
        with open(p, "wb") as f:
            f.write(os.urandom(200 + (i * 7919) % 1800))
        os.utime(p, ns=(old, old))


def timed(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_of(repeat: int, fn: Any, *, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up (page cache, dentries)
    return float(statistics.median(fn() for _ in range(repeat)))


def say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


class Listener:
    """A check-in socket that accepts and drops connections, like the daemon's."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            c.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="work directory (default: a temp dir on /)")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = min(args.files, 5_000), 3
    base = Path(tempfile.mkdtemp(prefix="velo-bench-shim-", dir=args.base or "/var/tmp"))
    results: dict[str, Any] = {"files": args.files, "repeat": args.repeat}
    try:
        src = base / "src"
        say(f"making {args.files} files")
        make_tree(src, args.files)
        say("ingest")
        store = Store.init(base / "store")
        m = Manifests(store)
        try:
            ingest(store, m, os.fspath(src), "t", jobs=os.cpu_count() or 1)
            with m.read() as txn:
                _ref, c = m.resolve(txn, "t")
                root = bytes.fromhex(c.root)
            # -- 2. materialisation --------------------------------------------------------
            n = 0

            def mat(link: bool) -> float:
                nonlocal n
                n += 1
                target = os.fspath(base / f"m{n}")
                t0 = time.perf_counter()
                prepare_target(target, store)
                with m.read() as txn:
                    res = materialize(store, m, txn, root, target, link=link)
                results.setdefault("forms", {})["link" if link else "copy"] = res.form
                return time.perf_counter() - t0

            def cp() -> float:
                nonlocal n
                n += 1
                return timed(["cp", "-a", os.fspath(src), os.fspath(base / f"c{n}")])

            # No warm-up runs here: each run leaves a full tree behind (nothing is deleted
            # before the end, see bench/README.md), and ingest has just read every object.
            mrep = max(1, min(args.repeat, 3))
            say("materialise (copy)")
            t_copy = median_of(mrep, lambda: mat(False), warm=False)
            say("materialise (--link)")
            t_link = median_of(mrep, lambda: mat(True), warm=False)
            say("cp -a")
            t_cp = median_of(mrep, cp, warm=False)
            results["materialize"] = {
                "copy_s": t_copy,
                "link_s": t_link,
                "cp_a_s": t_cp,
                "copy_vs_cp": t_copy / t_cp,
                "link_vs_cp": t_link / t_cp,
            }
            proj = base / "m1"  # a materialised (copy) tree to read through the shim
        finally:
            m.close()
        # -- 1. overhead of the shim on reads ----------------------------------------------
        sess = base / "sess"
        (sess / "locks").mkdir(parents=True)
        shim.create_journal(sess / "journal", "bench")
        listener = Listener(os.fspath(sess / "d.sock"))
        try:
            shim.write_config(
                sess / "shim.conf",
                root=os.fsencode(proj),
                journal=os.fsencode(sess / "journal"),
                sock=os.fsencode(sess / "d.sock"),
                locks=os.fsencode(sess / "locks"),
                protect=[os.fsencode(store.objects)],
                link=False,
                proxies=[],
            )
            plain = dict(os.environ)
            plain.pop("LD_PRELOAD", None)
            shimmed = shim.environment(plain, shim.library_path(), sess / "shim.conf")
            sub = sorted(p for p in proj.iterdir() if p.is_dir())[:10]  # 1,000 files
            work = {
                "python_imports": [PY, "-c", "import json, email, http"],
                "find_exec_cat_plus": [
                    "find",
                    os.fspath(proj),
                    "-type",
                    "f",
                    "-exec",
                    "cat",
                    "{}",
                    "+",
                ],
                "find_exec_cat_each": [
                    "find",
                    *map(os.fspath, sub),
                    "-type",
                    "f",
                    "-exec",
                    "cat",
                    "{}",
                    ";",
                ],
            }
            over: dict[str, Any] = {}
            cwd = os.fspath(proj)
            for name, argv in work.items():
                say(name)
                rep = args.repeat * (4 if name == "python_imports" else 1)
                timed(argv, env=plain, cwd=cwd)
                timed(argv, env=shimmed, cwd=cwd)
                a, b = [], []
                for _ in range(rep):  # interleaved, so drift in load hits both alike
                    a.append(timed(argv, env=plain, cwd=cwd))
                    b.append(timed(argv, env=shimmed, cwd=cwd))
                without, with_ = statistics.median(a), statistics.median(b)
                over[name] = {"without_s": without, "with_s": with_, "ratio": with_ / without}
            results["overhead"] = over
            results["journal_bytes"] = (sess / "journal").stat().st_size
        finally:
            listener.close()
    except BaseException:
        import traceback

        traceback.print_exc()
        raise
    finally:
        say(f"removing {base}")
        shutil.rmtree(base, ignore_errors=True)
    print(f"shim benchmarks ({args.files} files, medians of {args.repeat})")
    print(f"{'workload':<26}{'without':>10}{'with shim':>11}{'ratio':>8}  goal")
    for name, v in results["overhead"].items():
        print(f"{name:<26}{v['without_s']:>9.3f}s{v['with_s']:>10.3f}s{v['ratio']:>7.2f}x  <= 1.2x")
    mz = results["materialize"]
    print(f"{'materialise':<26}{'time':>10}{'cp -a':>11}{'ratio':>8}")
    forms = results.get("forms", {})
    print(
        f"{'  copy (' + forms.get('copy', '?') + ')':<26}{mz['copy_s']:>9.2f}s"
        f"{mz['cp_a_s']:>10.2f}s{mz['copy_vs_cp']:>7.2f}x"
    )
    print(f"{'  --link':<26}{mz['link_s']:>9.2f}s{mz['cp_a_s']:>10.2f}s{mz['link_vs_cp']:>7.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shim.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
