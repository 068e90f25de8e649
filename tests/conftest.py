"""Test-wide policy: facility markers, the must-work switch, and stores on tmpfs.

A test marked `@pytest.mark.needs("overlay_userns", ...)` is skipped with the probe's reason when
the host lacks a facility — unless the facility is named in `VELO_TEST_MUST_WORK` (comma separated,
or `all`), where the skip becomes a failure. `.ci/run` sets that list, so on CI machines nothing the
product promises can go silently untested.

The per-boot layer cache (veloverlay/volatile.py) of every test goes to one directory made for the
run (VELO_RUNTIME_DIR, unless the caller set it) and removed at its end, so the suite leaves no
layers in /run or /dev/shm behind.
"""

from __future__ import annotations

import os
import tempfile

import pytest

pytest_plugins = ["tests.helpers.fixtures"]


def must_work() -> set[str]:
    return {w.strip() for w in os.environ.get("VELO_TEST_MUST_WORK", "").split(",") if w.strip()}


_RUNTIME: list[str] = []


@pytest.hookimpl(tryfirst=True)  # before the tmp_path factory reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*features): skip unless the probe finds the features")
    if config.option.basetemp is None:
        # tmp_path's base: one directory for the run, removed at its end by force_rmtree (a
        # store in it holds chattr +i objects, which pytest's own clean-up cannot remove: it
        # left them as /tmp/pytest-of-USER/garbage-* and kept the last three runs' trees)
        config.option.basetemp = tempfile.mkdtemp(prefix="velo-test-tmp-")
        _RUNTIME.append(config.option.basetemp)
    if "VELO_RUNTIME_DIR" not in os.environ:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        from tests.helpers.unpriv import mine

        path = mine(tempfile.mkdtemp(prefix="velo-test-runtime-", dir=base))
        os.chmod(path, 0o1777)  # each uid (root, the root-free test uid) makes its own subdir
        os.environ["VELO_RUNTIME_DIR"] = path
        _RUNTIME.append(path)


def _first_unreadable(paths: list[str]) -> str | None:
    for p in paths:
        try:
            os.listdir(p)
        except OSError:
            return p
    return None


# What a run may add to the checkout's top level or its working directory: tool caches. Anything
# else there is a test writing a relative path into the caller's cwd (a session's command runs in
# the caller's cwd when that is outside the projection): a stray file `b` was committed so.
_MAY_APPEAR = {".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__", ".hypothesis"}
_BEFORE: dict[str, set[str]] = {}


def _watched() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return list(dict.fromkeys([root, os.getcwd()]))


def pytest_sessionstart(session: pytest.Session) -> None:
    for d in _watched():
        _BEFORE[d] = set(os.listdir(d))
    _readable_by_the_test_uid()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stray = sorted(
        os.path.join(d, name)
        for d, before in _BEFORE.items()
        if os.path.isdir(d)
        for name in set(os.listdir(d)) - before - _MAY_APPEAR
    )
    if stray:
        session.config.get_terminal_writer().line(
            f"error: the run left files in the checkout or its working directory: {stray}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _readable_by_the_test_uid() -> None:
    """As root, the root-free tests run this installation as the test uid, which must be able to
    read it: say so once, clearly, instead of failing a hundred tests with EACCES."""
    if os.getuid() != 0:
        return
    import lmdb

    import veloverlay
    from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged

    paths = [os.path.dirname(veloverlay.__file__), os.path.dirname(lmdb.__file__)]
    blocked = run_unprivileged(_first_unreadable, paths)
    if blocked is not None:
        pytest.exit(
            f"error: uid {UNPRIV_UID} (the root-free tests' user) cannot read {blocked}\n"
            "hint: put the checkout and its .venv where every user can traverse the path "
            "(e.g. not under a 0700 directory such as mktemp -d or /root)",
            returncode=3,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.helpers.trees import force_rmtree

    for path in _RUNTIME:
        force_rmtree(path)
    os.environ.pop("VELO_RUNTIME_DIR", None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Every `needs` mark counts: a test's own and those of each of its parameters (the closest
    # one alone let a parametrised test run where a parameter's facility is missing).
    names = list(dict.fromkeys(n for m in item.iter_markers("needs") for n in m.args))
    if not names:
        return
    from veloverlay import probe

    caps = probe.detect()
    required = must_work()
    for name in names:
        feature = caps.feature(name)
        if feature.ok:
            continue
        msg = f"{name}: {feature.reason}"
        if name in required or "all" in required:
            pytest.fail(f"VELO_TEST_MUST_WORK names {name!r} but the probe says: {msg}")
        pytest.skip(msg)
