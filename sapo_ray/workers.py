"""Calls in worker processes, each bounded by a timeout that kills only its own worker.

Code that can hang in C, deaf to signals (sympy on `9^{9^{9^{9}}}`), or that must not share the caller's
process (a tool running what a model wrote) runs here. The pool keeps `num_workers` processes, each with its
own pipe, and hands one call at a time to each idle worker; the calling thread waits on all the pipes at
once (`multiprocessing.connection.wait`) until the earliest deadline. A call that runs past `timeout_s` is a
timeout, and its worker alone is killed and replaced: the calls on the other workers run on, so each
pathological call costs one worker `timeout_s` and nothing else. A call whose worker dies under it (a
crash, `os._exit`) is retried once on another worker, then is an error. A replacement starts in the
background and takes calls once it reports ready, so its start-up is on no call's clock.

Each worker runs `setup(*setup_args)` once (a module-level function, sent by pickle) and then answers each
call with the handler it returned. Workers come from a `forkserver` (`spawn` where there is none) that has
already imported the `preload` modules, so a replacement is cheap and the pool is safe to create from
threads and Ray actors. They are killed by `close()`, when the pool is garbage-collected, at interpreter
exit, and on Linux when the process that owns the pool is killed outright (SIGKILL), by the kernel's
parent-death signal.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.util import Finalize
from typing import Any, Callable, NoReturn

# Generous bound on starting a worker (imports on a busy machine); never on a call's clock.
STARTUP_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Outcome:
    """What became of one call: its value, or why there is none."""

    value: Any = None
    error: str | None = None  # the call raised (its message), or could not be sent or run
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def _die_with_owner() -> None:
    """On Linux, have the kernel SIGKILL this worker when the process that owns the pool dies, even in the
    middle of a call stuck in C: a process killed outright (SIGKILL) runs no exit handler.

    The worker's parent is the forkserver, which exits once every holder of its "alive" pipe has closed
    it: the owner and, by default, every process forked from it. So the worker gives its copy up; it only
    kept the server up, since a worker that starts processes of its own starts its own forkserver.
    """
    if sys.platform != "linux" or mp.get_start_method(allow_none=True) != "forkserver":
        return
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _worker_main(conn, setup: Callable[..., Callable], setup_args: tuple) -> None:
    """Build the handler, report (True, pid), then answer each call with (True, value) or (False, error
    message) until the pool closes its end of the pipe."""
    _die_with_owner()
    # Ctrl-C reaches the whole process group; the pool's owner handles it and kills the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            handler = setup(*setup_args)
        except BaseException as error:
            conn.send((False, describe(error)))
            return
        conn.send((True, os.getpid()))
        while True:
            payload = conn.recv_bytes()
            try:
                answer = (True, handler(pickle.loads(payload)))
            except BaseException as error:  # a handler's sys.exit() is the call's error, not the worker's end
                answer = (False, describe(error))
            conn.send(answer)
    except (EOFError, OSError):  # the pool closed the pipe: there is no one left to answer
        return


class _Worker:
    """One worker process, the pool's end of its pipe, and the call it is running."""

    def __init__(self, context, name: str, setup: Callable, setup_args: tuple) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, setup, setup_args), name=name)
        self.process.start()
        child_conn.close()  # the worker then holds the only copy, so its death reads as end-of-file here
        self.ready = False
        self.call: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, call: int, payload: bytes, timeout_s: float) -> None:
        self.conn.send_bytes(payload)
        self.call, self.deadline = call, time.monotonic() + timeout_s

    def receive(self) -> tuple[bool, object] | None:
        """The worker's answer, or None if it died without one."""
        try:
            return self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):
            return None

    def exit_code(self) -> int | None:
        """The exit code of a worker that is ending (None if it has not ended within a second)."""
        self.process.join(timeout=1.0)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        if self.exit_code() is not None:
            self.process.close()
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


def _context(preload: tuple[str, ...]):
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    # Process-wide setting; it only takes effect if the forkserver is not running yet. This module (the
    # workers' entry point) is light on purpose: a replacement worker imports nothing heavy.
    context.set_forkserver_preload([__name__, *preload])
    return context


class WorkerPool:
    """`num_workers` processes answering calls with the handler `setup(*setup_args)` built in each; every
    call bounded by `timeout_s` (see the module docstring). `name` names the processes and the errors."""

    def __init__(self, num_workers: int, timeout_s: float, setup: Callable[..., Callable], setup_args: tuple = (),
                 preload: tuple[str, ...] = (), name: str = "Worker") -> None:
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"{name} pool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        try:
            pickle.dumps((setup, setup_args))
        except Exception as error:
            raise TypeError(f"{name} pool: {setup!r} cannot be sent to workers; use a module-level function") from error
        self.timeout_s, self.name = timeout_s, name
        self._spec = (name, setup, setup_args)
        self._context = _context(preload)
        self._workers: list[_Worker] = []
        # Runs on close(), on garbage collection, and at exit before multiprocessing joins its child
        # processes (exitpriority >= 0), a join that would otherwise wait for ever on an idle worker.
        self._finalizer = Finalize(self, _kill_all, args=(self._workers,), exitpriority=10)
        self._workers.extend(_Worker(self._context, *self._spec) for _ in range(num_workers))
        while not all(worker.ready for worker in self._workers):
            answered, late = self._wait()
            for worker, answer in answered:
                self._on_startup(worker, answer)
            for worker in late:
                self._fail_to_start(f"not ready after {STARTUP_TIMEOUT_S} s")

    def map(self, payloads: list) -> list[Outcome]:
        """One `Outcome` per payload, in order. Each call holds one worker for at most `timeout_s` (twice if
        its worker crashes), so wall time is at most about `timeout_s * len(payloads) / num_workers`, plus
        the start-up of a worker per timeout or crash."""
        if not self._finalizer.still_active():
            raise RuntimeError(f"{self.name} pool used after close()")
        results: list[Outcome | None] = [None] * len(payloads)
        todo = deque(range(len(payloads)))
        crashed: set[int] = set()  # calls whose worker died under them once
        try:
            while todo or any(worker.call is not None for worker in self._workers):
                self._hand_out(todo, payloads, results)
                answered, late = self._wait()
                for worker, answer in answered:
                    i = worker.call
                    if i is None:
                        self._on_startup(worker, answer)
                    elif answer is None:  # the worker died under the call
                        code = worker.exit_code()
                        self._replace(worker)
                        if i in crashed:
                            results[i] = Outcome(error=f"the {self.name} process exited with code {code}, twice")
                        else:
                            crashed.add(i)
                            todo.appendleft(i)
                    else:
                        worker.call = None
                        ok, value = answer
                        results[i] = Outcome(value) if ok else Outcome(error=value)
                for worker in late:
                    if worker.call is None:
                        self._fail_to_start(f"not ready after {STARTUP_TIMEOUT_S} s")
                    results[worker.call] = Outcome(timed_out=True)
                    self._replace(worker)
        finally:
            # Cut short (an exception, Ctrl-C), the calls still running would answer into the next map.
            for worker in [w for w in self._workers if w.call is not None]:
                self._replace(worker)
        return results

    def _hand_out(self, todo: deque, payloads: list, results: list) -> None:
        """Send the next calls to the idle workers (a payload that cannot be pickled is its call's error)."""
        idle = [worker for worker in self._workers if worker.ready and worker.call is None]
        while todo and idle:
            i = todo.popleft()
            try:
                payload = pickle.dumps(payloads[i])
            except Exception as error:
                results[i] = Outcome(error=describe(error))
                continue
            worker = idle.pop()
            try:
                worker.send(i, payload, self.timeout_s)
            except OSError:  # the worker died while idle, which is not this call's doing
                self._replace(worker)
                todo.appendleft(i)

    def _wait(self) -> tuple[list[tuple[_Worker, tuple | None]], list[_Worker]]:
        """Wait on the busy and starting workers until one answers or dies, or the earliest deadline.

        Returns (the workers that answered, with their answer, None for those that died), (the workers
        past their deadline without an answer).
        """
        waiting = [worker for worker in self._workers if worker.call is not None or not worker.ready]
        if not waiting:
            return [], []
        timeout = max(0.0, min(worker.deadline for worker in waiting) - time.monotonic())
        # The exit sentinel too: a pipe reads end-of-file at the worker's death only if no process kept a copy.
        ready = set(wait([w.conn for w in waiting] + [w.process.sentinel for w in waiting], timeout))
        now = time.monotonic()
        answered = [(w, w.receive()) for w in waiting if w.conn in ready or w.process.sentinel in ready]
        heard = {w for w, _ in answered}
        return answered, [w for w in waiting if w not in heard and now >= w.deadline]

    def _on_startup(self, worker: _Worker, answer: tuple | None) -> None:
        if answer is not None and answer[0]:
            worker.ready = True
            return
        self._fail_to_start(answer[1] if answer is not None else f"a worker exited with code {worker.exit_code()}")

    def _fail_to_start(self, why: str) -> NoReturn:
        self.close()
        raise RuntimeError(f"{self.name} pool: a worker failed to start ({why}); the pool is closed")

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context, *self._spec)

    def close(self) -> None:
        """Kill the worker processes (idle between maps, so nothing is lost)."""
        self._finalizer()
