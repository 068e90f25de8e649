"""docs/reliability.md: every section of figures says which commit it was measured at, and is
not older than the last change to the code it measures (a figure of code that changed since is
not a figure of this code). Part of `make test-full`, which regenerates the crash sections
first; the power-cut section needs `make powercut` (tools/matrix/powercut.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.reliability.report import DOC, ROOT, STAMP_RE, sections

# What each section measures: a change to any of these paths makes its figures stale.
MEASURES: dict[str, tuple[str, ...]] = {
    "crash-store": ("veloverlay", "tests/reliability/test_crash_store.py"),
    "crash-session": (
        "veloverlay",
        "tests/reliability/test_crash_session.py",
        "tests/session/_util.py",
    ),
    # The power-cut run and what it imports or boots (not the matrix driver, matrix.py).
    "powercut": (
        "veloverlay",
        "tools/matrix/powercut.py",
        "tools/matrix/powercut.sh",
        "tools/matrix/run.py",
        "tools/matrix/image.py",
        "tools/matrix/boxes.py",
        "tools/matrix/common.py",
        "tools/matrix/guest-init.sh",
    ),
}


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_every_figure_section_is_stamped_at_or_after_the_code_it_measures() -> None:
    if shutil.which("git") is None or _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout: no history to compare stamps with")
    found = sections(DOC.read_text())
    assert set(found) == set(MEASURES), "a section without a MEASURES entry, or one missing"
    problems = []
    for name, body in sorted(found.items()):
        m = STAMP_RE.search(body)
        if m is None:
            problems.append(f"{name}: no 'Measured at commit ...' stamp")
            continue
        commit, state = m.groups()
        if state != "clean tree":
            problems.append(f"{name}: measured at {commit} with uncommitted changes")
        last = _git("log", "-1", "--format=%H", "--", *MEASURES[name]).stdout.strip()
        if _git("merge-base", "--is-ancestor", last, commit).returncode != 0:
            problems.append(
                f"{name}: measured at {commit}, older than {last[:12]}, the last change to "
                f"{', '.join(MEASURES[name])} (regenerate: make test-full / make powercut)"
            )
    assert not problems, "\n".join(problems)
