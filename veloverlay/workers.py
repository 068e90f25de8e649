"""A small pool of forked worker processes, without threads.

Why not multiprocessing/concurrent.futures: both start helper threads in the parent (a process
that ever had threads cannot create a user namespace, and a session manager must), a worker
killed by a signal hangs `multiprocessing.Pool` forever (its task is lost), and Python 3.11's
`ProcessPoolExecutor` can hang in `terminate_broken()` when its feeder thread is blocked on a
full call queue (measured in crash tests). Here: a task in flight per worker (and its next one,
while there is plenty of work) over its own pipe pair, results read with `select`; a worker that
dies is an error, never a hang; workers die with their parent (PR_SET_PDEATHSIG) and never
outlive the pool.

Functions and arguments cross as pickles, so `fn` must be a module-level function.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
import select
import signal
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

from veloverlay import envvars
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.process import die_with_parent

__all__ = ["Workers", "allow_files", "more_files", "default_jobs", "max_jobs"]

T = TypeVar("T")
R = TypeVar("R")
_LEN = struct.Struct("<Q")


# Tasks in flight per worker in `map_queue`: the one it runs and the next, sent ahead.
_PIPELINED = 2
# A pipe's smallest capacity: one page (a user past fs.pipe-user-pages-soft gets no more).
_PIPE_MIN = 4096


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_frame(fd: int, obj: object) -> None:
    _write_all(fd, _frame(obj))


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            return None
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _read_frame(fd: int) -> tuple[bool, object]:
    head = _read_exact(fd, _LEN.size)
    if head is None:
        return False, None
    body = _read_exact(fd, _LEN.unpack(head)[0])
    if body is None:
        return False, None
    return True, pickle.loads(body)


# Where `report` sends: the result pipe in a worker process; elsewhere (a pool-less run in the
# calling process) the callback given to `local_reports`.
_REPORT: list[Callable[[Any], None]] = []


def report(value: object) -> None:
    """From inside a task: send `value` to the pool user's `on_report` now (e.g. progress of a
    long task), without ending the task."""
    if _REPORT:
        _REPORT[0](value)


def local_reports(fn: Callable[[Any], None] | None) -> None:
    """Route `report` to `fn` in this process (None: drop reports)."""
    _REPORT[:] = [fn] if fn is not None else []


# Workers beyond this many per CPU only wait for a core (hashing is CPU-bound; a few extra cover
# reads that block on the disk). `-j 100000` or VELO_JOBS=100000 forked that many copies of the
# process for a one-file tree (~5 ms and a page table each: minutes, and gigabytes), and a layer
# build made 8 lists per job: they are held to this bound instead.
JOBS_PER_CPU = 4


def max_jobs() -> int:
    """The most worker processes a pool starts: JOBS_PER_CPU per CPU."""
    return JOBS_PER_CPU * (os.cpu_count() or 1)


def default_jobs() -> int:
    """Worker processes to use: VELO_JOBS (0: the default), else one per CPU; at most
    `max_jobs()`."""
    n = envvars.get_int("VELO_JOBS", minimum=0) or (os.cpu_count() or 1)
    return min(n, max_jobs())


class Workers:
    """`with Workers(n, init, args) as w: for r in w.map_unordered(fn, items): ...` (n is held
    to `max_jobs()`)."""

    def __init__(
        self, n: int, init: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self._procs: list[tuple[int, int, int]] = []  # (pid, task write fd, result read fd)
        try:
            for _ in range(min(n, max_jobs())):
                self._start(init, initargs)
        except OSError as exc:
            # EMFILE (a low `ulimit -n`), EAGAIN (`ulimit -u`): the workers already started
            # stop and their pipes close, so that the caller's clean-up has descriptors to work
            # with (it failed with EMFILE itself, hiding this error).
            self.close()
            call = "pipe2" if exc.errno in (errno.EMFILE, errno.ENFILE) else "fork"
            raise SysError(exc.errno or errno.EAGAIN, call) from None

    def _start(self, init: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        parent = os.getpid()
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        try:
            res_r, res_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(task_r)
            os.close(task_w)
            raise
        try:
            pid = os.fork()
        except OSError:
            for fd in (task_r, task_w, res_r, res_w):
                os.close(fd)
            raise
        if pid == 0:
            try:
                for _pid, tw, rr in self._procs:  # siblings' pipes are not ours
                    os.close(tw)
                    os.close(rr)
                os.close(task_w)
                os.close(res_r)
                die_with_parent(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                if init is not None:
                    init(*initargs)
                self._serve(task_r, res_w)
            finally:
                os._exit(0)
        os.close(task_r)
        os.close(res_w)
        self._procs.append((pid, task_w, res_r))

    @staticmethod
    def _serve(task_r: int, res_w: int) -> None:
        _REPORT[:] = [lambda value: _write_frame(res_w, (None, value))]
        while True:
            ok, msg = _read_frame(task_r)
            if not ok:
                return
            fn, arg = cast(tuple[Callable[[Any], Any], Any], msg)
            try:
                out: tuple[bool, object] = (True, fn(arg))
            except BaseException as exc:  # report, then keep serving
                out = (False, exc)
            _write_frame(res_w, out)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker: idle ones have nothing to lose, busy ones are being abandoned."""
        for pid, tw, rr in self._procs:
            os.close(tw)
            os.close(rr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        self._procs = []

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items, results in completion order; exceptions in fn are re-raised here."""
        return self.map_queue(fn, deque(items))

    def map_queue(
        self,
        fn: Callable[[T], R],
        queue: deque[T],
        on_report: Callable[[Any], None] | None = None,
    ) -> Iterator[R]:
        """fn over the items of `queue`, results in completion order. The consumer may add items
        to `queue` between results (tasks that discover more tasks); it ends when the queue is
        empty and no task is running. What a task sends with `report` goes to `on_report`.

        While the queue holds more tasks than there are workers, a busy worker is sent its next
        task before it finishes (`_PIPELINED`): it starts on it at once instead of waiting for
        this process to be scheduled, read its result and answer. Only a frame that fits an
        empty pipe of the smallest size is sent ahead, so that the write never waits on a
        worker that is itself waiting for its result to be read."""
        idle = list(self._procs)
        busy: dict[int, tuple[tuple[int, int, int], int]] = {}  # result fd: (proc, in flight)
        n = len(self._procs)
        while True:
            while idle and queue:
                proc = idle.pop()
                self._send(proc, _frame((fn, queue.popleft())))
                busy[proc[2]] = (proc, 1)
            if len(queue) > n:
                for fd, (proc, flying) in list(busy.items()):
                    if flying >= _PIPELINED or len(queue) <= n:
                        continue
                    frame = _frame((fn, queue[0]))
                    if len(frame) > _PIPE_MIN:
                        break
                    queue.popleft()
                    self._send(proc, frame)
                    busy[fd] = (proc, flying + 1)
            if not busy:
                return
            ready, _, _ = select.select(list(busy), [], [])
            for fd in ready:
                proc, flying = busy.pop(fd)
                ok, msg = _read_frame(fd)
                if not ok:
                    raise self._died(proc[0])
                success, value = cast(tuple[bool | None, Any], msg)
                if success is None:  # a report from a task still running
                    busy[fd] = (proc, flying)
                    if on_report is not None:
                        on_report(value)
                    continue
                if not success:
                    raise cast(BaseException, value)
                if flying > 1:
                    busy[fd] = (proc, flying - 1)
                else:
                    idle.append(proc)
                yield cast(R, value)

    def _send(self, proc: tuple[int, int, int], frame: bytes) -> None:
        try:
            _write_all(proc[1], frame)
        except BrokenPipeError:
            raise self._died(proc[0]) from None

    def each(self, fn: Callable[[T], R], arg: T) -> list[R]:
        """fn(arg) once in every worker (call it with none busy); the results, worker by worker."""
        frame = _frame((fn, arg))
        for proc in self._procs:
            self._send(proc, frame)
        out: list[R] = []
        error: BaseException | None = None
        for pid, _tw, rr in self._procs:
            success: bool | None = None
            while success is None:  # reports, if any, are dropped
                ok, msg = _read_frame(rr)
                if not ok:
                    raise self._died(pid)
                success, value = cast(tuple[bool | None, Any], msg)
            if not success:
                error = error or cast(BaseException, value)
            else:
                out.append(cast(R, value))
        if error is not None:
            raise error
        return out

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(self.map_unordered(fn, items))

    @staticmethod
    def _died(pid: int) -> VeloError:
        return VeloError(
            f"worker process {pid} died (killed?); nothing was committed",
            reason=Reason.SYSCALL,
            hint="retry; anything staged is reclaimed",
        )


@contextlib.contextmanager
def more_files(n: int) -> Iterator[None]:
    """Raise the soft limit of open files to `n` (or the hard limit) for the block, then set it
    back: a process that holds many files open for a while (a pull's unnamed objects), and
    whose later children must still start with the limit they would have had."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    allow_files(n)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def allow_files(n: int) -> None:
    """Raise this process's soft limit of open files to `n`, or to its hard limit if lower (a
    worker that holds many files open; never the coordinator: a program it starts would inherit
    descriptors numbered past select()'s 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(hard, n)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
