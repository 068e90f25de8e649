"""gc gets its turn at the store lock while readers and writers keep coming.

Linux gives a process waiting for an exclusive flock no priority: a verb that asks for the lock
shared while gc waits gets it at once, so gc, waiting for the holders it found, waited for ever
behind readers and writers that overlapped one another (found by holding one `cat REF f` open
on a pipe nobody read, as `| less` does, and starting gc and then more `cat`s: each new cat ran,
gc never did). gc now takes `lock.gate` before it waits, and verbs that come after it queue
behind it (veloverlay/store/storelock.py). It also said nothing while it waited: it now says
whom it waits for (`waiting for the store lock ..., held by pid N (its command)`), and so does
a verb that waits behind it.

The reader holds the lock for as long as its output pipe is full; every later step waits until
the process started has finished or waits for a lock (/proc/locks): no sleep decides."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile

from tests.helpers.races import settle, start_and_settle
from tests.helpers.trees import make_tree
from veloverlay.errors import VeloError
from veloverlay.ingest import ingest
from veloverlay.verbs.gc import gc as gc_verb
from veloverlay.verbs.repo import Repo

BIG = bytes(range(256)) * 4096  # 1 MiB: more than a pipe holds, so cat blocks writing it


def _store(shm_tmp: str) -> str:
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"big.bin": BIG, "small.txt": b"small\n"})
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    return store


def _cat_held_open(store: str) -> subprocess.Popen[bytes]:
    """`veloverlay cat t big.bin` whose output nobody reads yet (as into `less`): it holds the
    store lock, shared, from its first byte until its output is read."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "cat", "t", "big.bin"],
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)  # it streams: the lock is held now
    assert first == BIG[:1], proc.communicate()
    return proc


def test_a_reader_that_comes_while_gc_waits_queues_behind_gc(shm_tmp: str) -> None:
    store = _store(shm_tmp)
    lock, gate = os.path.join(store, "lock"), os.path.join(store, "lock.gate")
    holder = _cat_held_open(store)
    later: subprocess.Popen[str] | None = None
    try:
        gc = start_and_settle(store, ["gc", "--grace", "0"])
        assert gc.poll() is None, gc.communicate()  # it waits for the cat
        later = settle(
            subprocess.Popen(
                [sys.executable, "-m", "veloverlay", "--json", "cat", "t", "small.txt"],
                env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            lock,
            gate,
            own=True,
        )
        # The later reader waits behind the waiting gc (it ran past gc before)
        assert later.poll() is None, later.communicate()
        out, err = holder.communicate(timeout=120)  # the first reader ends: gc runs, then it
        assert holder.returncode == 0, err
        assert BIG[:1] + out == BIG
        _o, gerr = gc.communicate(timeout=120)
        assert gc.returncode == 0, gerr
        # and it said what it waited for, and for whom
        assert f"waiting for the store lock of {store}, held by pid {holder.pid} (" in gerr, gerr
        assert "cat t big.bin" in gerr, gerr
        lout, lerr = later.communicate(timeout=120)
        assert later.returncode == 0, lerr
        assert lout == "small\n"
        # and the later reader said whom it waited behind
        assert f"waiting for the store lock of {store} behind pid {gc.pid} (" in lerr, lerr
        assert f"which waits for pid {holder.pid} (" in lerr, lerr
    finally:
        for p in (holder, later):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


def test_a_holder_takes_the_lock_again_while_gc_waits(shm_tmp: str) -> None:
    """A process that holds the store lock (a verb nested in another: a pull that commits, a
    session that stages) takes it again without waiting at the gate: gc, at the gate, waits for
    this very process, so waiting there would never end."""
    import threading

    store = _store(shm_tmp)
    repo = Repo.open(store)
    try:
        with repo.store.lock():
            gc = start_and_settle(store, ["gc", "--grace", "0"])
            assert gc.poll() is None, gc.communicate()  # it waits for this process
            again: list[str] = []

            def nested() -> None:
                buf = io.BytesIO()
                repo.cat("t", "small.txt", buf)
                again.append(buf.getvalue().decode())

            t = threading.Thread(target=nested, daemon=True)
            t.start()
            t.join(timeout=120)
            assert again == ["small\n"], "the nested reader waited behind gc"
            assert gc.poll() is None  # and gc still waits for this process
        _o, err = gc.communicate(timeout=120)
        assert gc.returncode == 0, err
    finally:
        repo.close()


def _open_to_write(store: str) -> str:
    """As another user: what opening `store` for a writing verb (ingest, init) says."""
    try:
        Repo.open(store, create=True).close()
    except VeloError as exc:
        return f"{exc.reason.value}: {exc.message}"
    return "opened"


def _open_to_read(store: str) -> str:
    """As another user: what opening `store` and reading it (the store lock taken) says."""
    try:
        repo = Repo.open(store)
        try:
            with repo.reading():
                return f"opened: {[r.name for r, _c in repo.refs()]}"
        finally:
            repo.close()
    except VeloError as exc:
        return f"{exc.reason.value}: {exc.message}"


def test_another_user_opens_a_shared_store_without_a_gate_as_before(shm_tmp: str) -> None:
    """A store made by a version without `lock.gate`: its owner's next init or gc makes one;
    another user of the shared store, who cannot, reads it without (opening it to write, which
    `init` and `ingest` do first, said "cannot create the store: Permission denied"; only its
    owner writes a store now, and that is said first: store-permission)."""
    from tests.helpers.unpriv import run_unprivileged

    base = tempfile.mkdtemp(dir="/dev/shm", prefix="velo-gate-")
    try:
        os.chmod(base, 0o755)
        store = os.path.join(base, "store")
        Repo.open(store, create=True, shared=True).close()
        os.unlink(os.path.join(store, "lock.gate"))  # as an older version made it
        assert run_unprivileged(_open_to_read, store) == "opened: []"
        said = run_unprivileged(_open_to_write, store)
        assert said.startswith("store-permission: ") and "only its owner" in said, said
        assert not os.path.exists(os.path.join(store, "lock.gate"))
        Repo.open(store, create=True).close()  # its owner's init makes it
        assert os.path.isfile(os.path.join(store, "lock.gate"))
    finally:
        shutil.rmtree(base)


def test_gc_gives_up_after_its_timeout_and_the_verbs_behind_it_go_on(shm_tmp: str) -> None:
    """A `cat` left open on a pager held the store lock shared; gc, waiting for it at the gate,
    held every later verb behind it for as long as the pager stayed open (found by leaving a
    `cat t big.bin` unread and running gc, then `cat t small.txt`: both waited until the first
    cat ended). gc now gives up after `--timeout` seconds (`locked`, nothing deleted), and the
    verb queued behind it then runs, while the pager is still open."""
    import json

    store = _store(shm_tmp)
    src2 = os.path.join(shm_tmp, "src2")
    make_tree(src2, {"gone.txt": b"only in the deleted ref\n"})
    repo = Repo.open(store)
    try:
        ingest(repo.store, repo.m, src2, "u", jobs=1)
        repo.delete_ref("u", grace=0)
    finally:
        repo.close()
    objects_before = sorted(os.listdir(store))
    lock, gate = os.path.join(store, "lock"), os.path.join(store, "lock.gate")
    holder = _cat_held_open(store)
    later: subprocess.Popen[str] | None = None
    try:
        gc = start_and_settle(store, ["gc", "--grace", "0", "--timeout", "3"])
        later = settle(
            subprocess.Popen(
                [sys.executable, "-m", "veloverlay", "--json", "cat", "t", "small.txt"],
                env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            lock,
            gate,
            own=True,
        )
        gout, gerr = gc.communicate(timeout=120)
        assert gc.returncode == 1, (gout, gerr)
        err = json.loads(gout)
        assert "error: gave up waiting for the store lock" in gerr, gerr
        assert err["reason"] == "locked", err
        assert f"held by pid {holder.pid} (" in err["error"], err
        assert "cat t big.bin" in err["error"], err
        assert err["hint"], err
        lout, lerr = later.communicate(timeout=120)  # the verb behind gc runs ...
        assert later.returncode == 0, lerr
        assert lout == "small\n"
        assert holder.poll() is None  # ... while the first cat still holds the lock
        assert sorted(os.listdir(store)) == objects_before
        repo = Repo.open(store)
        try:  # nothing was deleted: the deleted ref's objects are still there for a later gc
            rep = gc_verb(repo.store, repo.m, grace=0, timeout=0)
        except VeloError as exc:
            assert exc.reason.value == "locked", exc
        else:
            raise AssertionError(f"gc ran while the cat held the lock: {rep}")
        finally:
            repo.close()
        out, herr = holder.communicate(timeout=120)
        assert holder.returncode == 0, herr
        assert BIG[:1] + out == BIG
        repo = Repo.open(store)
        try:
            rep = gc_verb(repo.store, repo.m, grace=0, timeout=0)  # and the next gc frees it
        finally:
            repo.close()
        assert rep.objects_deleted == 1, rep
    finally:
        for p in (holder, later):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


def test_gc_called_from_a_thread_gives_up_after_its_timeout_too(shm_tmp: str) -> None:
    """Off the main thread (no SIGALRM to end the wait), gc's bounded wait asks again and
    again instead, and ends the same way: `locked`, the holder named."""
    import threading

    store = _store(shm_tmp)
    holder = _cat_held_open(store)
    got: list[BaseException | object] = []
    try:
        repo = Repo.open(store)
        try:

            def run() -> None:
                try:
                    got.append(gc_verb(repo.store, repo.m, grace=0, timeout=0.5))
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    got.append(exc)

            t = threading.Thread(target=run)
            t.start()
            t.join(timeout=120)
        finally:
            repo.close()
        assert len(got) == 1 and isinstance(got[0], VeloError), got
        assert got[0].reason.value == "locked", got[0]
        assert f"held by pid {holder.pid} (" in got[0].message, got[0]
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.communicate()


def test_gc_s_bounded_wait_leaves_the_callers_alarm_armed(shm_tmp: str) -> None:
    """The SIGALRM that ended gc's bounded wait cancelled the timer its caller had armed (a
    test's timeout, a program's own): the caller's alarm never came."""
    import signal

    store = _store(shm_tmp)
    holder = _cat_held_open(store)
    rang: list[int] = []
    before = signal.signal(signal.SIGALRM, lambda signum, _frame: rang.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 600)
        repo = Repo.open(store)
        try:
            gc_verb(repo.store, repo.m, grace=0, timeout=0.3)
        except VeloError as exc:
            assert exc.reason.value == "locked", exc
        else:
            raise AssertionError("gc ran while the cat held the lock")
        finally:
            repo.close()
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 500  # still armed, as the caller set it
        assert rang == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        holder.kill()
        holder.communicate()
