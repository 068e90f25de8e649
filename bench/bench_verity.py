"""The cost of fs-verity per object: ingest with every object sealed, and without, in one run.

A tree of --files files of 4 KiB (100 per directory) is ingested into fresh stores on two fresh
loop-mounted ext4s made alike but for the `verity` feature (`mkfs.ext4 -O verity`): on that one,
the store's probe finds fs-verity and every object is sealed when it is named
(FS_IOC_ENABLE_VERITY: the kernel builds the Merkle tree and writes it out); on the other, none
is. Ingests alternate between the two, median of --repeat; files/s of the whole command
(interpreter start-up included). Needs root (the loop mounts); where the kernel has no fs-verity
(CONFIG_FS_VERITY), the row says so and why. The matrix box deb13-verity runs it
(tools/matrix/run.py deb13-verity --bench ...).

Usage: python bench/bench_verity.py [--base DIR] [--files N] [--repeat N] [--quick]
Prints one row and writes bench/results/verity.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

from benchlib import RESULTS, count_files, make_small_tree, scratch, timed, velo_cmd, warm


def _first_object_sealed(store: Path) -> tuple[bool, str]:
    from veloverlay import verity
    from veloverlay.store.cas import Store

    s = Store(store)
    for _name, path in s.iter_objects():
        return verity.is_enabled(path), s.verity()[1]
    return False, "no object in the store"


def bench(base: str, files: int, repeat: int) -> dict[str, Any]:
    size = (2 << 30) + (files * 40 << 10)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(scratch(base, "velo-bench-verity-", size, 4096, True))
        sealed_fs = stack.enter_context(
            scratch(base, "velo-bench-verity-", size, 4096, True, ("-O", "verity"))
        )
        tree = plain / "tree"
        make_small_tree(tree, files)
        n, _bytes = count_files(tree)
        warm(tree)
        runs: dict[str, list[float]] = {"without": [], "with": []}
        for i in range(repeat):
            for key, fs in (("without", plain), ("with", sealed_fs)):
                store = fs / f"store-{i}"
                env = dict(os.environ, VELO_STORE=os.fspath(store))
                runs[key].append(
                    timed([*velo_cmd(), "ingest", os.fspath(tree), "--name", "v"], env)
                )
                sealed, reason = _first_object_sealed(store)
                if key == "with" and not sealed:
                    return {"available": False, "reason": reason, "files": n}
                if key == "without" and sealed:
                    raise SystemExit("an object was sealed on the ext4 made without -O verity")
    without, with_ = statistics.median(runs["without"]), statistics.median(runs["with"])
    return {
        "available": True,
        "files": n,
        "kernel": os.uname().release,
        "without_s": without,
        "with_s": with_,
        "without_files_per_s": n / without,
        "with_files_per_s": n / with_,
        "time_ratio": with_ / without,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--base", default="/var/tmp", help="where the two loop images go")
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 2000, 1
    if os.geteuid() != 0:
        row: dict[str, Any] = {"available": False, "reason": "needs root (two loop mounts)"}
    else:
        row = bench(args.base, args.files, args.repeat)
    if row["available"]:
        print(
            f"fs-verity cost ({row['kernel']}, two fresh loop-mounted ext4s, median of "
            f"{args.repeat}): ingest of {row['files']:,} files of 4 KiB: "
            f"{row['without_files_per_s']:,.0f} files/s without, {row['with_files_per_s']:,.0f} "
            f"with every object sealed ({row['time_ratio']:.2f}x the time)"
        )
    else:
        print(f"fs-verity cost: not measured here: {row['reason']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verity.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
