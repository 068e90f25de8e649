"""The parallel walk (ingest/scan.py): subtrees split between workers, nodes encoded in them, a
clean directory whose node is gone, the worker pool's task queue, and publishing objects with
renameat2(RENAME_NOREPLACE) and without it. Every result is compared with the source tree itself
(a checkout of the ref against the directory), never with the product's own output."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections import deque
from typing import Any

import pytest

from tests.helpers.trees import assert_same_tree, settle_ctimes
from veloverlay import _libc
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import scan
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.store.tree import Entry, Kind, decode, encode
from veloverlay.verbs.repo import Repo
from veloverlay.workers import Workers

OLD_NS = 1_500_000_000_123_456_789


def _age(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))
    settle_ctimes(root)


def _wide_tree(root: str, dirs: int, per_dir: int) -> None:
    """More names than one task's budget: the walk hands subtrees back as new tasks."""
    for d in range(dirs):
        sub = os.path.join(root, f"d{d:03d}", "inner" if d % 3 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        for f in range(per_dir):
            with open(os.path.join(sub, f"f{f:03d}"), "wb") as fh:
                fh.write(b"%d/%d" % (d, f))
        if d % 5 == 0:
            os.symlink(f"../d{d:03d}", os.path.join(root, f"d{d:03d}", "up"))
    _age(root)


def _checkout_equals(repo: Repo, ref: str, src: str, dest: str) -> None:
    repo.checkout(ref, dest)
    assert_same_tree(src, dest)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_tree_larger_than_a_task_round_trips_and_reingests(
    repo: Repo, shm_tmp: str, jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan, "BUDGET", 64)  # many tasks, many handed-back subtrees
    src = os.path.join(shm_tmp, "wide")
    _wide_tree(src, 60, 12)
    first = ingest(repo.store, repo.m, src, "w", jobs=jobs)
    assert (first.files, first.symlinks, first.dirs) == (720, 12, 80)
    _checkout_equals(repo, "w", src, os.path.join(shm_tmp, "out1"))
    # A deep change in place leaves every directory's own stat as it was: the clean ancestors
    # are rewritten from their stored nodes, nothing else is read.
    deep = os.path.join(src, "d003", "inner", "f005")
    with open(deep, "r+b") as fh:
        fh.write(b"CHANGED")
    os.utime(deep, ns=(OLD_NS + 7, OLD_NS + 7))
    settle_ctimes(src)
    second = ingest(repo.store, repo.m, src, "w", jobs=jobs)
    assert second.hashed == 1 and second.root != first.root
    _checkout_equals(repo, "w", src, os.path.join(shm_tmp, "out2"))
    third = ingest(repo.store, repo.m, src, "w", jobs=jobs)
    assert third.hashed == 0 and third.unchanged and third.root == second.root


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_clean_directory_whose_node_is_gone_is_listed_again(
    repo: Repo, shm_tmp: str, jobs: int
) -> None:
    src = os.path.join(shm_tmp, "src")
    _wide_tree(src, 4, 3)
    first = ingest(repo.store, repo.m, src, "r", jobs=jobs)
    with repo.m.read() as txn:
        sub = repo.m.lookup(txn, bytes.fromhex(first.root), b"d001")
    assert sub is not None
    with repo.m.write() as txn:  # as a gc of an old version would
        repo.m.delete_node(txn, sub.digest)
    again = ingest(repo.store, repo.m, src, "r", jobs=jobs)
    assert again.root == first.root and again.hashed == 0
    assert (again.files, again.symlinks, again.dirs) == (first.files, first.symlinks, first.dirs)
    with repo.m.read() as txn:
        assert repo.m.has_node(txn, sub.digest)
    _checkout_equals(repo, "r", src, os.path.join(shm_tmp, "out"))


_FD_PROBE = """
import os, resource, sys
from veloverlay.ingest import scan
from veloverlay.ingest.pipeline import ingest
from veloverlay.verbs.repo import Repo
store, src, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
scan._HELD = 8
r = Repo.open(store)
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8 + 24, hard))
print(ingest(r.store, r.m, src, "fd", jobs=jobs).dirs)
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_walk_keeps_few_descriptors_open(repo: Repo, shm_tmp: str, jobs: int) -> None:
    """The walk goes by directory descriptors, but a wide directory holds one (its own) while
    its subdirectories are walked, and a deep tree only its ancestors that still have
    subdirectories to walk, at most _HELD (8 here) per task: beyond, they are handed back. Run
    with RLIMIT_NOFILE 32 above what the process had open: 3,000 subdirectories side by side and
    a comb 60 levels deep (each level: two leaf directories and the next level) round-trip."""
    src = os.path.join(shm_tmp, "src")
    for i in range(3000):
        os.makedirs(os.path.join(src, "wide", f"d{i:04d}"))
    p = os.path.join(src, "comb")
    for level in range(60):
        for leaf in "amz":  # m goes on: one of a and z is walked after it, whatever the order
            os.makedirs(os.path.join(p, leaf))
            with open(os.path.join(p, leaf, "f"), "w") as f:
                f.write(str(level))
        p = os.path.join(p, "m")
    _age(src)
    out = subprocess.run(
        [sys.executable, "-c", _FD_PROBE, os.fspath(repo.store.root), src, str(jobs)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == 1 + 3000 + 1 + 60 * 3
    _checkout_equals(repo, "fd", src, os.path.join(shm_tmp, "out"))


def test_nodes_from_encoded_parts_equal_the_reference_encoding() -> None:
    entries = [
        Entry(b"b", Kind.FILE, 0o644, 3, 5, hash_bytes(b"b"), b"", 2),
        Entry(b"a", Kind.SYMLINK, 0o777, 2, 6, b"", b"..", 0),
        Entry(b"c", Kind.DIR, digest=hash_bytes(b"c")),
    ]
    ref_digest, ref_data = encode(0o755, 9, entries)
    from veloverlay.store.tree import dir_entry_bytes, encode_parts, entry_bytes

    parts = [
        entry_bytes(b"a", Kind.SYMLINK, 0, 0o777, 2, 6, b".."),
        entry_bytes(b"b", Kind.FILE, 2, 0o644, 3, 5, hash_bytes(b"b")),
        dir_entry_bytes(b"c", hash_bytes(b"c")),
    ]
    assert encode_parts(0o755, 9, 3, parts) == (ref_digest, ref_data)
    assert decode(ref_data).entries == tuple(sorted(entries, key=lambda e: e.name))


def _spawn(n: int) -> list[int]:
    """A task that discovers more tasks: n -> its children below 40."""
    return [c for c in (2 * n + 1, 2 * n + 2) if c < 40]


def _die(n: int) -> int:
    os._exit(3)


def _chatty(n: int) -> int:
    from veloverlay import workers

    for i in range(n):
        workers.report(i)
    return n


def test_reports_reach_the_pool_user_while_the_task_runs() -> None:
    got: list[int] = []
    with Workers(2) as w:
        assert list(w.map_queue(_chatty, deque([3]), got.append)) == [3]
        assert sorted(w.each(_chatty, 2)) == [2, 2]  # reports dropped where no one listens
        assert list(w.map_unordered(_chatty, [1])) == [1]
    assert got == [0, 1, 2]


def test_ingest_progress_counts_every_file_read(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    _wide_tree(src, 3, 100)
    calls: list[tuple[int, int | None, int, int | None]] = []

    def progress(
        done: int, total: int | None = None, nbytes: int = 0, tbytes: int | None = None
    ) -> None:
        calls.append((done, total, nbytes, tbytes))

    ingest(repo.store, repo.m, src, "r", jobs=2, progress=progress)
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == 300 and len(calls) > 2
    assert calls[-1][2] == sum(
        os.path.getsize(os.path.join(d, f))
        for d, _s, fs in os.walk(src)
        for f in fs
        if not os.path.islink(os.path.join(d, f))
    )


def test_the_task_queue_runs_tasks_added_while_it_runs() -> None:
    with Workers(2) as w:
        queue: deque[int] = deque([0])
        seen = []
        for children in w.map_queue(_spawn, queue):
            queue.extend(children)
            seen.append(children)
    done = {c for ch in seen for c in ch} | {0}
    assert done == set(range(40)) and len(seen) == 40
    with Workers(2) as w, pytest.raises(VeloError, match="died"):
        list(w.map_queue(_die, deque([1, 2, 3])))


def _started(arg: tuple[int, int, bytes]) -> int:
    """Say on the pipe `fd` that task `n` started, then return it."""
    fd, n, _pad = arg
    os.write(fd, b"%d\n" % n)
    return n


def _starts(fd: int, want: int, deadline: float) -> set[int]:
    """The task numbers read from the pipe until `want` are seen or the deadline passes."""
    import select
    import time

    got = b""
    while got.count(b"\n") < want:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        got += os.read(fd, 4096)
    return {int(x) for x in got.split()}


def test_a_busy_worker_is_sent_its_next_task_while_work_is_plenty() -> None:
    """With more tasks queued than workers, each worker has its next task before it finishes
    the one it runs: while the pool user holds the first result (reads nothing more), the
    tasks sent ahead start anyway. A frame larger than the smallest pipe is never sent ahead
    (the write could wait on a worker that waits for its result to be read)."""
    import time

    r, w_fd = os.pipe()
    try:
        with Workers(2) as w:
            queue = deque((w_fd, n, b"") for n in range(8))
            results = w.map_queue(_started, queue)
            first = next(results)
            # Held here: without sending ahead, only the two first tasks could have started.
            started = _starts(r, 3, time.monotonic() + 30)
            assert first in started and len(started) >= 3, started
            assert sorted([first, *results]) == list(range(8))
    finally:
        os.close(r)
        os.close(w_fd)


def _echo(arg: bytes) -> bytes:
    return arg


def test_a_task_larger_than_a_small_pipe_is_not_sent_ahead() -> None:
    """Pipes of one page (a user past fs.pipe-user-pages-soft gets no more): a task frame of
    5,000 bytes sent ahead would wait for the worker to read it, while the worker waits for
    its 5,000-byte result to be read: a deadlock (SIGALRM ends the test instead)."""
    import fcntl
    import signal

    def hung(*_: object) -> None:
        raise TimeoutError("map_queue deadlocked")

    old = signal.signal(signal.SIGALRM, hung)
    try:
        with Workers(2) as w:
            for _pid, task_w, res_r in w._procs:
                fcntl.fcntl(task_w, fcntl.F_SETPIPE_SZ, 4096)
                fcntl.fcntl(res_r, fcntl.F_SETPIPE_SZ, 4096)
            items = [bytes([n]) * 5000 for n in range(8)]
            signal.alarm(60)
            got = list(w.map_queue(_echo, deque(items)))
            signal.alarm(0)
        assert sorted(got) == sorted(items)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_publish_keeps_an_existing_object_and_drops_the_staged_copy(repo: Repo) -> None:
    store = repo.store
    with store.stage() as stage:
        digest = stage.add_bytes(b"same bytes")
        staged = stage.staged[digest]
        dst = store.object_path(digest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as fh:  # another writer got there first
            fh.write(b"same bytes")
        os.chmod(dst, 0o444)
        ino = os.stat(dst).st_ino
        assert stage.publish() == 0
        assert os.stat(dst).st_ino == ino and not os.path.exists(staged)


def test_publish_without_rename_noreplace(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses RENAME_NOREPLACE (EINVAL) still gets every object, once."""

    def refuse(*_a: Any) -> None:
        raise OSError(errno.EINVAL, "not supported")

    monkeypatch.setattr(_libc, "renameat2", refuse)
    src = os.path.join(shm_tmp, "src")
    _wide_tree(src, 5, 4)
    res = ingest(repo.store, repo.m, src, "r", jobs=1)
    assert res.new_objects == 20
    assert len(list(repo.store.iter_objects())) == 20
    _checkout_equals(repo, "r", src, os.path.join(shm_tmp, "out"))
    with repo.store.stage() as stage:  # and an existing object stays the one it was
        digest = stage.add_bytes(b"0/0-other")
        assert stage.publish() == 1
        ino = os.stat(repo.store.object_path(digest)).st_ino
        stage.staged[digest] = stage._tmpname()
        with open(stage.staged[digest], "wb") as fh:
            fh.write(b"0/0-other")
        assert stage.publish() == 0
        assert os.stat(repo.store.object_path(digest)).st_ino == ino


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("fs", ["proc", "sysfs", "tmpfs"])
def test_mounts_inside_the_source(repo: Repo, shm_tmp: str, fs: str, jobs: int) -> None:
    """A filesystem mounted inside the source is walked like the rest, unless it is a kernel
    pseudo filesystem: procfs says its files hold 0 bytes (they were committed empty, while
    reading them gives their text) and sysfs says 4096 (the ingest failed: 'kept changing').
    Their mount point is kept as an empty directory and reported skipped."""
    src = os.path.join(shm_tmp, "src")
    mnt = os.path.join(src, "sub", "mnt")
    os.makedirs(mnt)
    with open(os.path.join(src, "sub", "f"), "wb") as f:
        f.write(b"file")
    what = {"proc": "/proc/sys/kernel/random", "sysfs": "/sys/kernel/mm"}.get(fs)
    cmd = ["mount", "--bind", what, mnt] if what else ["mount", "-t", "tmpfs", "none", mnt]
    subprocess.run(cmd, check=True)
    try:
        if fs == "tmpfs":
            with open(os.path.join(mnt, "x"), "wb") as f:
                f.write(b"on the inner tmpfs")
        elif fs == "proc":  # what the manifest would have said, were it read
            with open(os.path.join(mnt, "poolsize"), "rb") as f:
                assert f.read() and os.stat(f.name).st_size == 0
        res = ingest(repo.store, repo.m, src, "m", jobs=jobs)
        dest = os.path.join(shm_tmp, "out")
        repo.checkout("m", dest)
        if fs == "tmpfs":
            assert res.skipped == []
            assert_same_tree(src, dest)
        else:
            assert res.skipped == [("sub/mnt", "pseudo-filesystem")]
            assert os.listdir(os.path.join(dest, "sub", "mnt")) == []
            with open(os.path.join(dest, "sub", "f"), "rb") as f:
                assert f.read() == b"file"
            again = ingest(repo.store, repo.m, src, "m", jobs=jobs)
            assert again.root == res.root and again.skipped == res.skipped
    finally:
        subprocess.run(["umount", mnt], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_proc_file_bind_mounted_inside_the_source(repo: Repo, shm_tmp: str) -> None:
    """A single procfs file bind-mounted onto a file of the tree stats as 0 bytes: it was
    committed empty (and cached so) while reading it gives text. It is skipped and reported,
    like a directory of a pseudo filesystem; a file bind-mounted from a real one is read."""
    src = os.path.join(shm_tmp, "src")
    os.makedirs(src)
    other = os.path.join(shm_tmp, "other")
    with open(other, "wb") as f:
        f.write(b"a real file")
    for name in ("poolsize", "real"):
        with open(os.path.join(src, name), "wb"):
            pass
    pf, rf = os.path.join(src, "poolsize"), os.path.join(src, "real")
    subprocess.run(["mount", "--bind", "/proc/sys/kernel/random/poolsize", pf], check=True)
    try:
        subprocess.run(["mount", "--bind", other, rf], check=True)
        try:
            with open(pf, "rb") as f:
                assert f.read() and os.stat(pf).st_size == 0
            for _ in range(2):
                res = ingest(repo.store, repo.m, src, "m", jobs=1)
                assert res.skipped == [("poolsize", "pseudo-filesystem")]
                assert {e.path for e in repo.ls("m", recursive=True)} == {b"real"}
            dest = os.path.join(shm_tmp, "out")
            repo.checkout("m", dest)
            with open(os.path.join(dest, "real"), "rb") as f:
                assert f.read() == b"a real file"
        finally:
            subprocess.run(["umount", rf], check=True)
    finally:
        subprocess.run(["umount", pf], check=True)


@pytest.mark.parametrize("top", ["/proc/sys/kernel/random", "/sys/kernel/mm", "/proc"])
def test_a_kernel_interface_as_the_source_is_refused(repo: Repo, top: str) -> None:
    """The source itself on a pseudo filesystem is no tree. Old code: its contents were skipped
    as those of one mounted inside a tree, and an empty version was committed under the name."""
    assert os.path.isdir(top) and os.listdir(top)  # a directory, with entries
    with pytest.raises(VeloError) as err:
        ingest(repo.store, repo.m, top, "k", jobs=1)
    assert err.value.reason is Reason.NOT_A_DIRECTORY, err.value
    assert err.value.message.startswith(f"the source {top} is on "), err.value
    with repo.m.read() as txn:
        assert repo.m.get_ref(txn, "k") is None


def _open_fds(below: int) -> set[int]:
    import fcntl

    out = set()
    for fd in range(below):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        out.add(fd)
    return out


def _start_workers_with_five_free_descriptors() -> dict[str, object]:
    """Workers(2) where the open-file limit leaves room for one worker's pipes only (4 fds, 2
    kept) and not for both pipes of the second (a low `ulimit -n`): what it raises, and what it
    leaves open or running."""
    import resource

    from veloverlay.errors import SysError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = _open_fds(soft)
    limit = 0  # (descriptors open above the limit stay open: only new ones count)
    while limit - len([f for f in before if f < limit]) < 5:
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        Workers(2)
        raised: object = None
    except SysError as exc:
        raised = (exc.syscall, exc.errno, exc.hint is not None and "ulimit -n" in exc.hint)
    except OSError as exc:
        raised = f"{type(exc).__name__}: {exc}"
    leaked = sorted(_open_fds(limit) - before)
    try:
        children: object = os.waitpid(-1, os.WNOHANG)[0] or "running"
    except ChildProcessError:
        children = None
    return {"raised": raised, "leaked": leaked, "children": children}


def test_workers_that_cannot_all_start_leave_nothing_open() -> None:
    """`ulimit -n 16` and `ingest`: the second worker's pipe2 failed with EMFILE, the first
    worker kept running and its pipes open, and the stage's clean-up then failed with EMFILE
    itself, so the user saw a bare '[Errno 24] Too many open files' from scandir, not the cause.
    Now the started workers stop, their pipes close, and the error names pipe2 and ulimit -n."""
    from veloverlay import ns

    got = ns.run_in_child(_start_workers_with_five_free_descriptors)
    assert got == {
        "raised": ("pipe2", errno.EMFILE, True),
        "leaked": [],
        "children": None,
    }


def _pid(_item: int) -> int:
    return os.getpid()


def test_a_huge_job_count_starts_at_most_four_workers_per_cpu(
    monkeypatch: pytest.MonkeyPatch, repo: Repo, shm_tmp: str
) -> None:
    """`ingest -j 100000` (or VELO_JOBS=100000) forked 100,000 copies of the process for a
    one-file tree (minutes and gigabytes: it never finished), and a layer build made 8 lists per
    job. A pool starts at most 4 workers per CPU, and the ingest still equals its source."""
    from veloverlay import workers

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setenv("VELO_JOBS", str(10**30))
    assert workers.default_jobs() == 4
    with Workers(50) as w:
        assert len({*w.map_unordered(_pid, range(200))}) <= 4
        assert len(w._procs) == 4
    src = os.path.join(shm_tmp, "src")
    _wide_tree(src, 3, 20)
    res = ingest(repo.store, repo.m, src, "r", jobs=10**30)
    out = os.path.join(shm_tmp, "out")
    repo.checkout("r", out)
    assert_same_tree(src, out)
    assert res.root
