"""Linters are tests: ruff (lint and format) over the package, tests and benchmarks; mypy (strict,
configured in pyproject.toml) over the package and the benchmarks. A missing tool is a skip, unless
VELO_TEST_MUST_WORK names `lint` (or `all`): then it is a failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF_PATHS = ["veloverlay", "tests", "bench"]


def _tool(module: str) -> list[str]:
    if importlib.util.find_spec(module) is None:
        wanted = {w.strip() for w in os.environ.get("VELO_TEST_MUST_WORK", "").split(",")}
        if wanted & {"lint", "all"}:
            pytest.fail(f"VELO_TEST_MUST_WORK names lint but {module} is not installed")
        pytest.skip(f"{module} is not installed")
    return [sys.executable, "-m", module]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd[2:])} failed:\n{p.stdout}\n{p.stderr}"


def test_ruff_check() -> None:
    _run([*_tool("ruff"), "check", *RUFF_PATHS])


def test_ruff_format() -> None:
    _run([*_tool("ruff"), "format", "--check", *RUFF_PATHS])


def test_mypy(tmp_path: Path) -> None:
    # Files and flags come from [tool.mypy] in pyproject.toml. The cache is the checkout's own
    # unless another user made it (root ran the suite first in the VM matrix): mypy then fails
    # with an INTERNAL ERROR, so this run gets a private one.
    cache = ROOT / ".mypy_cache"
    usable = os.access(cache, os.W_OK) if cache.exists() else os.access(ROOT, os.W_OK)
    _run([*_tool("mypy"), "--cache-dir", str(cache if usable else tmp_path / "mypy-cache")])
