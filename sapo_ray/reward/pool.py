"""Batch reward scoring in worker processes, with a per-sample timeout that kills hung workers.

sympy can spend minutes (in C, deaf to signals) on an answer like `9^{9^{9^{9^{9}}}}`, and math_verify's
`signal.alarm` timeout does not work outside a main thread (Ray actors, threads). So every sample runs
in a worker process; a sample that runs past `timeout_s` is scored 0 and the whole pool is killed and
replaced, because a ProcessPoolExecutor cannot kill one worker. Workers come from a `forkserver`
(`spawn` where there is none) that has already imported this package, so a replacement is cheap and
the pool is safe to create from threads and Ray actors.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import sapo_ray.reward as reward

FAILED = {"score": 0.0, "acc": 0.0, "format": 0.0}
# Generous bound on starting all workers (importing sympy on a busy machine); never per sample.
STARTUP_TIMEOUT_S = 120.0

_worker_args: tuple = ()


def _init_worker(reward_fn: Callable | str | None, acc_weight: float, format_weight: float) -> None:
    global _worker_args
    if isinstance(reward_fn, str):
        reward_fn = reward.load_reward_fn(reward_fn)
    _worker_args = (acc_weight, format_weight, reward_fn)


def _score_in_worker(response: str, example: dict) -> dict:
    return reward.compute_score(response, example, *_worker_args)


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
        self._executor: ProcessPoolExecutor | None = None
        if self.num_workers > 0:
            try:
                pickle.dumps(reward_fn)
            except Exception as error:
                raise TypeError(f"reward_fn {reward_fn!r} cannot be sent to workers; use a module-level "
                                "function or a 'file.py:function' spec") from error
            self._start()

    def score(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        """Score a batch: (one {"score", "acc", "format"} per sample, n_errors, n_timeouts).

        Examples are sent without their `images`. Wall time is bounded by about
        `timeout_s * (len(responses) / num_workers + number of hung samples)` plus worker restarts.
        """
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        examples = [{k: v for k, v in example.items() if k != "images"} for example in examples]
        self.last_error = None
        if self.batch:
            return self._score_batch(responses, examples)
        if self.num_workers == 0:
            return self._score_inline(responses, examples)

        results: list[dict | None] = [None] * len(responses)
        n_errors = n_timeouts = 0
        queue = deque(range(len(responses)))
        crashed: set[int] = set()  # samples that were running when a worker died; retried alone
        running: dict[Future, tuple[int, float]] = {}  # at most num_workers, so submitted = started
        while queue or running:
            while queue and len(running) < self.num_workers and not (queue[0] in crashed and running):
                i = queue.popleft()
                running[self._executor.submit(_score_in_worker, responses[i], examples[i])] = (i, time.monotonic())
                if i in crashed:
                    break
            first_deadline = min(start for _, start in running.values()) + self.timeout_s
            done, _ = wait(running, timeout=max(0.0, first_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                i, _ = running.pop(future)
                try:
                    results[i] = dict(future.result())
                except BrokenProcessPool:
                    broken = True
                    if i in crashed:
                        results[i], n_errors = dict(FAILED), n_errors + 1
                    else:
                        crashed.add(i)
                        queue.appendleft(i)
                except Exception as error:
                    results[i], n_errors = dict(FAILED), n_errors + 1
                    self._note(error)
            now = time.monotonic()
            for future in [f for f, (_, start) in running.items() if now - start >= self.timeout_s]:
                i, _ = running.pop(future)
                results[i], n_timeouts = dict(FAILED), n_timeouts + 1
                broken = True
            if broken:  # the others still running are innocent: rerun them on the new pool
                for i, _ in running.values():
                    queue.appendleft(i)
                running.clear()
                self._restart()
        return results, n_errors, n_timeouts

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

    def _note(self, error: BaseException) -> None:
        if self.last_error is None:
            self.last_error = f"{type(error).__name__}: {error}"

    def _start(self) -> None:
        if "forkserver" in mp.get_all_start_methods():
            context = mp.get_context("forkserver")
            # Process-wide setting; it only takes effect if the forkserver is not running yet.
            context.set_forkserver_preload(["sapo_ray.reward", "sapo_ray.reward.mathvista"])
        else:
            context = mp.get_context("spawn")
        self._executor = ProcessPoolExecutor(
            self.num_workers, mp_context=context, initializer=_init_worker, initargs=self._initargs
        )
        # Start every worker now, so that no sample's clock includes a process start-up.
        warmup = [self._executor.submit(os.getpid) for _ in range(self.num_workers)]
        done, _ = wait(warmup, timeout=STARTUP_TIMEOUT_S)
        errors = [f.exception() for f in done if f.exception() is not None]
        if len(done) < len(warmup) or errors:
            self._kill()
            why = repr(errors[0]) if errors else f"not ready after {STARTUP_TIMEOUT_S} s"
            raise RuntimeError(f"RewardPool: the {self.num_workers} reward workers failed to start: {why}")

    def _kill(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # ProcessPoolExecutor cannot kill its workers before Python 3.14 (`kill_workers`).
        for process in list((executor._processes or {}).values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def _restart(self) -> None:
        self._kill()
        self._start()

    def close(self) -> None:
        """Kill the worker processes (idle between batches, so nothing is lost)."""
        self._kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
