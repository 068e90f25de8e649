"""`make bench`: run every benchmark in this directory, one after another (they share 2 cores).

Each benchmark prints its own table and writes bench/results/<name>.json. Pass --quick for a smoke
run with small sizes. A benchmark that fails makes the whole run fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_ingest.py", "bench_session.py", "bench_shim.py"]


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for name in ORDER:
        path = HERE / name
        if not path.exists():
            print(f"== {name}: not present, skipped")
            continue
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(path), *extra])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
