"""`make bench`: run every benchmark in this directory, one after another (they share 2 cores).

Each benchmark prints its own table and writes bench/results/<name>.json. Pass --quick for a smoke
run with small sizes, --million for the 1,000,000-file rows (long: tens of minutes). A benchmark
that fails makes the whole run fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "bench_ingest.py",
    "bench_large.py",
    "bench_verity.py",
    "bench_session.py",
    "bench_cli.py",
    "bench_shim.py",
    "bench_remote.py",
]
MILLION = {"bench_ingest.py", "bench_session.py"}  # the benchmarks with 1,000,000-file rows


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for name in ORDER:
        path = HERE / name
        if not path.exists():
            print(f"== {name}: not present, skipped")
            continue
        print(f"== {name}", flush=True)
        args = [a for a in extra if a != "--million" or name in MILLION]
        rc = subprocess.call([sys.executable, str(path), *args])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
