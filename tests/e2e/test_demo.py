"""`make demo`, the README's first command, runs examples/demo.sh: it must keep working as the
product changes (CI at e.g. 0d778f6 was green while the demo failed: it listed the directory a
session had made, which the session now removes at its end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.needs("root", "overlay_root")


def test_the_demo_runs_through() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    r = subprocess.run(
        ["bash", str(ROOT / "examples/demo.sh")],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "hello from v2" in r.stdout  # the harvested change, run in the next session
    assert "0 problems" in r.stdout, r.stdout[-500:]  # fsck, last
