"""Batch reward scoring in worker processes, with a per-sample timeout that kills only the hung worker.

sympy can spend minutes (in C, deaf to signals) on an answer like `9^{9^{9^{9^{9}}}}`, and math_verify's
`signal.alarm` timeout does not work outside a main thread (Ray actors, threads). So every sample runs
in a worker process that can be killed. The pool keeps `num_workers` processes, each with its own pipe,
and hands one sample at a time to each idle worker; the calling thread waits on all the pipes at once
(`multiprocessing.connection.wait`) until the earliest deadline. A sample that runs past `timeout_s` is
scored 0, and its worker alone is killed and replaced: the samples on the other workers run on, so each
pathological answer costs one worker `timeout_s` and nothing else. A sample whose worker dies
under it (a crash, `os._exit`) is retried once on another worker, then scored 0 as an error.
A replacement starts in the background and takes samples once it reports ready, so its start-up is on
no sample's clock.

Workers come from a `forkserver` (`spawn` where there is none) that has already imported this package, so
a replacement is cheap and the pool is safe to create from threads and Ray actors. They are killed by
`close()`, when the pool is garbage-collected, at interpreter exit, and on Linux when the process that
owns the pool is killed outright (SIGKILL), by the kernel's parent-death signal.
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
from multiprocessing.connection import wait
from multiprocessing.util import Finalize
from typing import Callable, NoReturn

import sapo_ray.reward as reward

FAILED = {"score": 0.0, "acc": 0.0, "format": 0.0}
# Generous bound on starting the workers (importing sympy on a busy machine); never per sample.
STARTUP_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _die_with_owner() -> None:
    """On Linux, have the kernel SIGKILL this worker when the process that owns the pool dies, even in the
    middle of a sample stuck in C: a process killed outright (SIGKILL) runs no exit handler.

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


def _worker_main(conn, reward_fn: Callable | str | None, acc_weight: float | None, format_weight: float) -> None:
    """Load the reward function, report (True, pid), then answer each sample with (True, scores) or
    (False, error message) until the pool closes its end of the pipe."""
    _die_with_owner()
    # Ctrl-C reaches the whole process group; the pool's owner handles it and kills the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            if isinstance(reward_fn, str):
                reward_fn = reward.load_reward_fn(reward_fn)
        except BaseException as error:
            conn.send((False, _describe(error)))
            return
        conn.send((True, os.getpid()))
        while True:
            payload = conn.recv_bytes()
            try:
                response, example = pickle.loads(payload)
                answer = (True, reward.compute_score(response, example, acc_weight, format_weight, reward_fn))
            except BaseException as error:  # a hook's sys.exit() is the hook's error, not the worker's end
                answer = (False, _describe(error))
            conn.send(answer)
    except (EOFError, OSError):  # the pool closed the pipe: there is no one left to answer
        return


class _Worker:
    """One worker process, the pool's end of its pipe, and the sample it is scoring."""

    def __init__(self, context, initargs: tuple) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, *initargs), name="RewardWorker")
        self.process.start()
        child_conn.close()  # the worker then holds the only copy, so its death reads as end-of-file here
        self.ready = False
        self.sample: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, sample: int, payload: bytes, timeout_s: float) -> None:
        self.conn.send_bytes(payload)
        self.sample, self.deadline = sample, time.monotonic() + timeout_s

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


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    # Process-wide setting; it only takes effect if the forkserver is not running yet.
    context.set_forkserver_preload(["sapo_ray.reward", "sapo_ray.reward.mathvista"])
    return context


class RewardPool:
    """Scores (response, example) pairs with `compute_score` in `num_workers` processes.

    `reward_fn`: None (the function registered for each example's `data_source`), a module-level
    function, or a `"file.py:function"` spec; it returns the accuracy (a float, or a dict with `score`
    and extra numbers). A sample that raises, returns something else or a non-finite number, or runs
    longer than `timeout_s` seconds is scored 0 (score, acc and format) and counted; `last_error` keeps
    the first error message of the last `score` call. `batch=True`: `reward_fn(responses, examples)`
    scores the whole batch at once in the caller (no per-sample timeout: such functions usually call a
    service with its own) and returns one value per sample.
    `num_workers=0` scores inline in the caller, without timeout (for debugging).
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        reward_fn: Callable | str | None = None,
        acc_weight: float | None = None,
        format_weight: float = 0.1,
        batch: bool = False,
    ) -> None:
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"RewardPool needs num_workers >= 0 and timeout_s > 0, got {num_workers}, {timeout_s}")
        if batch and reward_fn is None:
            raise ValueError("reward.batch=true needs a batch reward function (reward.custom=file.py:function)")
        self.num_workers, self.timeout_s, self.batch = (0 if batch else num_workers), timeout_s, batch
        self.last_error: str | None = None
        # Loading the hook here fails early, with the hook's own error, instead of inside a worker.
        local_fn = reward.load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self._inline_args = (acc_weight, format_weight, local_fn)
        self._initargs = (reward_fn, acc_weight, format_weight)
        self._workers: list[_Worker] = []
        self._finalizer = None
        if self.num_workers > 0:
            try:
                pickle.dumps(reward_fn)
            except Exception as error:
                raise TypeError(f"reward_fn {reward_fn!r} cannot be sent to workers; use a module-level "
                                "function or a 'file.py:function' spec") from error
            self._context = _context()
            # Runs on close(), on garbage collection, and at exit before multiprocessing joins its child
            # processes (exitpriority >= 0), a join that would otherwise wait for ever on an idle worker.
            self._finalizer = Finalize(self, _kill_all, args=(self._workers,), exitpriority=10)
            self._workers.extend(_Worker(self._context, self._initargs) for _ in range(self.num_workers))
            while not all(worker.ready for worker in self._workers):
                answered, late = self._wait()
                for worker, answer in answered:
                    self._on_startup(worker, answer)
                for worker in late:
                    self._fail_to_start(f"not ready after {STARTUP_TIMEOUT_S} s")

    def score(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        """Score a batch: (one {"score", "acc", "format"} per sample, n_errors, n_timeouts).

        Examples are sent without their `images` and `videos`. Each sample holds one worker for at most `timeout_s`
        (twice if its worker crashes), so wall time is at most about
        `timeout_s * len(responses) / num_workers`, plus the start-up of a worker per timeout or crash.
        """
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        examples = [{k: v for k, v in example.items() if k not in ("images", "videos")} for example in examples]
        self.last_error = None
        if self.batch:
            return self._score_batch(responses, examples)
        if self.num_workers == 0:
            return self._score_inline(responses, examples)
        if not self._finalizer.still_active():
            raise RuntimeError("RewardPool.score called after close()")
        return self._score_in_workers(responses, examples)

    def _score_in_workers(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        results: list[dict | None] = [None] * len(responses)
        n_errors = n_timeouts = 0
        todo = deque(range(len(responses)))
        crashed: set[int] = set()  # samples whose worker died under them once
        try:
            while todo or any(worker.sample is not None for worker in self._workers):
                n_errors += self._hand_out(todo, responses, examples, results)
                answered, late = self._wait()
                for worker, answer in answered:
                    i = worker.sample
                    if i is None:
                        self._on_startup(worker, answer)
                    elif answer is None:  # the worker died under the sample
                        code = worker.exit_code()
                        self._replace(worker)
                        if i in crashed:
                            results[i], n_errors = dict(FAILED), n_errors + 1
                            self._note(f"the reward worker exited with code {code} while scoring a sample, twice")
                        else:
                            crashed.add(i)
                            todo.appendleft(i)
                    else:
                        worker.sample = None
                        ok, value = answer
                        if ok:
                            results[i] = value
                        else:
                            results[i], n_errors = dict(FAILED), n_errors + 1
                            self._note(value)
                for worker in late:
                    if worker.sample is None:
                        self._fail_to_start(f"not ready after {STARTUP_TIMEOUT_S} s")
                    results[worker.sample], n_timeouts = dict(FAILED), n_timeouts + 1
                    self._replace(worker)
        finally:
            # Cut short (an exception, Ctrl-C), the samples still running would answer into the next call.
            for worker in [w for w in self._workers if w.sample is not None]:
                self._replace(worker)
        return results, n_errors, n_timeouts

    def _hand_out(self, todo: deque, responses: list[str], examples: list[dict], results: list) -> int:
        """Send the next samples to the idle workers; returns how many could not be pickled (errors)."""
        n_errors = 0
        idle = [worker for worker in self._workers if worker.ready and worker.sample is None]
        while todo and idle:
            i = todo.popleft()
            try:
                payload = pickle.dumps((responses[i], examples[i]))
            except Exception as error:
                results[i], n_errors = dict(FAILED), n_errors + 1
                self._note(error)
                continue
            worker = idle.pop()
            try:
                worker.send(i, payload, self.timeout_s)
            except OSError:  # the worker died while idle, which is not this sample's doing
                self._replace(worker)
                todo.appendleft(i)
        return n_errors

    def _wait(self) -> tuple[list[tuple[_Worker, tuple | None]], list[_Worker]]:
        """Wait on the busy and starting workers until one answers or dies, or the earliest deadline.

        Returns (the workers that answered, with their answer, None for those that died), (the workers
        past their deadline without an answer).
        """
        waiting = [worker for worker in self._workers if worker.sample is not None or not worker.ready]
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
        raise RuntimeError(f"RewardPool: a reward worker failed to start ({why}); the pool is closed")

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context, self._initargs)

    def _score_inline(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        results, n_errors = [], 0
        for response, example in zip(responses, examples):
            try:
                results.append(reward.compute_score(response, example, *self._inline_args))
            except Exception as error:
                results.append(dict(FAILED))
                n_errors += 1
                self._note(error)
        return results, n_errors, 0

    def _score_batch(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        acc_weight, format_weight, fn = self._inline_args
        try:
            values = list(fn(responses, examples))
            if len(values) != len(responses):
                raise ValueError(f"batch reward function returned {len(values)} values for {len(responses)} samples")
        except Exception as error:
            self._note(error)
            return [dict(FAILED) for _ in responses], len(responses), 0
        results, n_errors = [], 0
        for value, response in zip(values, responses):
            try:
                results.append(reward.combine(value, response, acc_weight, format_weight, fn))
            except Exception as error:
                results.append(dict(FAILED))
                n_errors += 1
                self._note(error)
        return results, n_errors, 0

    def _note(self, error: BaseException | str) -> None:
        if self.last_error is None:
            self.last_error = error if isinstance(error, str) else _describe(error)

    def close(self) -> None:
        """Kill the worker processes (idle between batches, so nothing is lost)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
