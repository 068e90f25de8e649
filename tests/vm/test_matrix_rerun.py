"""`make matrix --rerun`: a stored box result is reused only while what that box ran is unchanged.

Checked against this checkout's own history: the commit before the last change to the package
must be refused for every box, and the commit before the last change to the fs-verity tests only
for the box whose suite runs them (and the full-suite box).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def driver() -> Any:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if _git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone: no history to compare with")
    sys.path.insert(0, str(ROOT / "tools" / "matrix"))
    try:
        import matrix  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "tools" / "matrix"))
    return matrix


def _before_last_change(path: str) -> str:
    last = _git("log", "-1", "--format=%H", "--", path)
    if not last or not _git("rev-list", "--parents", "-n1", last).split()[1:]:
        pytest.skip(f"no commit before the last change to {path}")
    return last + "^"


def test_a_result_from_before_a_package_change_is_refused_for_every_box(driver: Any) -> None:
    old = _before_last_change("veloverlay")
    for b in driver.BOXES:
        changed = driver.changed_since(b, old)
        assert any(p.startswith("veloverlay/") for p in changed), (b.name, changed)


def test_a_suite_change_refuses_only_the_boxes_that_run_it(driver: Any) -> None:
    path = "tests/unit/test_verity_store.py"  # the verity box's own suite alone runs it
    old = _before_last_change(path)
    refused = {b.name for b in driver.BOXES if path in driver.changed_since(b, old)}
    running = {
        b.name
        for b in driver.BOXES
        if any(path == p or path.startswith(p + "/") for p in driver.suite_for(b).split())
    }
    assert "deb13-verity" in running and "deb12" not in running
    assert refused == running


def test_the_current_commit_is_reusable_as_far_as_the_index_goes(driver: Any) -> None:
    head = _git("rev-parse", "HEAD")
    dirty = set(_git("diff", "--name-only", "HEAD").split())
    for b in driver.BOXES:
        assert set(driver.changed_since(b, head)) <= dirty, b.name
