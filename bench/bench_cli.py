"""The command line's share of a warm session start, beside the CLI it replaced (issue 16).

Warm `veloverlay run REF -- true` on a --files manifest (default 100,000), timed as whole
processes with hyperfine, every command once per round in a rotating order (medians, plus
user+system CPU, which a loaded machine disturbs less):

- `python -c pass`: interpreter start-up, the floor every figure is measured from;
- the CLI of this tree (typer), and the library call it makes (`session.run`), the same session;
- the CLI of `--old-rev` (default 762678f: the argparse CLI over the same library, the last
  commit before the typer CLI), extracted with `git archive` and run from there;
- `import typer` and `import veloverlay.cli` alone.

The goal (issue 16): the CLI's warm run within 50 ms of start-up. Prints a table, writes
bench/results/cli.json. Usage: python bench/bench_cli.py [--files N] [--repeat N] [--quick]
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

from benchlib import RESULTS, ROOT, hyperfine_rounds


def hyperfine(cmds: dict[str, str], runs: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each command's median wall and CPU seconds, the commands interleaved in rounds."""
    got = hyperfine_rounds(cmds, runs, env=env)
    return {
        name: {
            "median_s": statistics.median(wall for wall, _cpu in ts),
            "cpu_s": statistics.median(cpu for _wall, cpu in ts),
        }
        for name, ts in got.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--old-rev", default="762678f")
    ap.add_argument("--base", default="/dev/shm")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 5_000, 10
    if shutil.which("hyperfine") is None:
        print("bench_cli: needs hyperfine (tools/setup.sh installs it)", file=sys.stderr)
        return 1
    py = sys.executable
    top = Path(tempfile.mkdtemp(prefix="velo-bench-cli-", dir=args.base))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode as an installed package has it
    env.update(
        PYTHONPYCACHEPREFIX=str(top / "pycache"),
        VELO_STORE=str(top / "store"),
        VELO_RUNTIME_DIR=str(top / "runtime"),
        NO_COLOR="1",
    )
    (top / "runtime").mkdir()
    old = top / "old"
    old.mkdir()
    results: dict[str, Any] = {"files": args.files, "old_rev": args.old_rev}
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.old_rev, "veloverlay"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        src = top / "src"
        for i in range(args.files):
            d = src / f"d{i // 100:05d}"
            if i % 100 == 0:
                d.mkdir(parents=True)
            (d / f"f{i % 100:03d}.txt").write_bytes(os.urandom(200 + (i * 7919) % 1800))
        new_env = dict(env, PYTHONPATH=str(ROOT))
        subprocess.run(
            [py, "-m", "veloverlay", "ingest", str(src), "-n", "big"],
            env=new_env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        at = top / "at"  # an existing target (a session removes one it made at its end)
        at.mkdir()
        (top / "at-old").mkdir()
        run = f"run big --at {at} -- true"
        subprocess.run(
            f"{py} -m veloverlay {run}",
            shell=True,
            env=new_env,
            check=True,
            stderr=subprocess.DEVNULL,
        )  # builds the lower layers: later runs are warm
        # The old CLI gets a store of its own making: the store format moved on since (the
        # one-level fan-out, the manifest record), and old code cannot open a new store.
        old_store = top / "store-old"
        old_env = dict(env, PYTHONPATH=str(old), VELO_STORE=str(old_store))
        subprocess.run(
            [py, "-m", "veloverlay", "ingest", str(src), "-n", "big"],
            env=old_env,
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=top,  # `python -m` puts the working directory first on sys.path
        )
        old_run = f"run big --at {top / 'at-old'} -- true"  # its own projection point too
        subprocess.run(
            f"{py} -m veloverlay {old_run}",
            shell=True,
            env=old_env,
            check=True,
            stderr=subprocess.DEVNULL,
            cwd=top,
        )
        lib = (
            "import sys; from veloverlay.store.cas import Store; "
            "from veloverlay.session import run, SessionOptions; "
            f"sys.exit(run(Store({str(top / 'store')!r}), "
            f"SessionOptions(refs=['big'], at={str(at)!r}), ['true']).exit_status)"
        )
        cmds = {
            "python -c pass": f"{py} -c pass",
            "CLI (typer), run -- true": f"env PYTHONPATH={ROOT} {py} -m veloverlay {run}",
            "library session.run -- true": f'{py} -c "{lib}"',
            f"old CLI ({args.old_rev}, argparse), run -- true": (
                f"env PYTHONPATH={old} VELO_STORE={old_store} {py} -m veloverlay {old_run}"
            ),
            "python -c 'import typer'": f"{py} -c 'import typer'",
            "python -c 'import veloverlay.cli'": f"{py} -c 'import veloverlay.cli'",
        }
        os.chdir(top)  # `python -m` puts the working directory first on sys.path
        for name, cmd in cmds.items():  # each once first: a failure names its command
            once = subprocess.run(cmd, shell=True, env=new_env, capture_output=True, text=True)
            if once.returncode != 0:
                raise SystemExit(f"bench_cli: {name!r} failed ({once.returncode}):\n{once.stderr}")
        t0 = time.perf_counter()
        warm = hyperfine(cmds, args.repeat, new_env)
        results["seconds"] = time.perf_counter() - t0
    finally:
        subprocess.run(["chattr", "-R", "-i", str(top)], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(top, ignore_errors=True)
    start = warm["python -c pass"]
    results["medians"] = warm

    def beyond(name: str, key: str) -> float:
        return (warm[name][key] - start[key]) * 1e3

    new_cli = "CLI (typer), run -- true"
    old_cli = f"old CLI ({args.old_rev}, argparse), run -- true"
    results["cli_minus_startup_ms"] = beyond(new_cli, "median_s")
    results["old_cli_minus_startup_ms"] = beyond(old_cli, "median_s")
    results["library_minus_startup_ms"] = beyond("library session.run -- true", "median_s")
    results["cli_cpu_minus_startup_ms"] = beyond(new_cli, "cpu_s")
    results["old_cli_cpu_minus_startup_ms"] = beyond(old_cli, "cpu_s")
    results["goal"] = "CLI run within 50 ms of start-up"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"warm `run big -- true`, {args.files}-file manifest, {args.repeat} runs each")
    print(f"{'':44} {'median':>9} {'- start':>9} {'CPU':>9} {'- start':>9}")
    for name, r in warm.items():
        print(
            f"{name:44} {r['median_s'] * 1e3:7.1f}ms {beyond(name, 'median_s'):7.1f}ms "
            f"{r['cpu_s'] * 1e3:7.1f}ms {beyond(name, 'cpu_s'):7.1f}ms"
        )
    print(
        f"CLI beyond start-up: {results['cli_minus_startup_ms']:.1f} ms (old CLI "
        f"{results['old_cli_minus_startup_ms']:.1f} ms); goal <= 50 ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
