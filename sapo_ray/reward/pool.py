"""Batch reward scoring in worker processes, with a per-sample timeout that kills only the hung worker.

sympy can spend minutes (in C, deaf to signals) on an answer like `9^{9^{9^{9^{9}}}}`, and math_verify's
`signal.alarm` timeout does not work outside a main thread (Ray actors, threads). So every sample is
scored in a `sapo_ray.workers.WorkerPool` process that can be killed: a sample past `timeout_s`
scores 0 and costs one worker that long and nothing else; a sample whose worker dies under it is retried
once on another worker, then scored 0 as an error.
"""

from __future__ import annotations

from typing import Callable

import sapo_ray.reward as reward
from sapo_ray.workers import WorkerPool, describe

FAILED = {"score": 0.0, "acc": 0.0, "format": 0.0}


def _scorer(reward_fn: Callable | str | None, acc_weight: float | None, format_weight: float,
            exact_choice: bool) -> Callable:
    """In a worker: the function scoring one `(response, example)` payload."""
    if isinstance(reward_fn, str):
        reward_fn = reward.load_reward_fn(reward_fn)
    return lambda payload: reward.compute_score(payload[0], payload[1], acc_weight, format_weight, reward_fn,
                                                exact_choice)


class RewardPool:
    """Scores (response, example) pairs with `compute_score` in `num_workers` processes.

    `reward_fn`: None (the function registered for each example's `data_source`), a module-level
    function, or a `"file.py:function"` spec; it returns the accuracy (a float, or a dict with `score`
    and extra numbers). A sample that raises, returns something else or a non-finite number, or runs
    longer than `timeout_s` seconds is scored 0 (score, acc and format) and counted; `last_error` keeps
    the first error message of the last `score` call. `batch=True`: `reward_fn(responses, examples)`
    scores the whole batch at once in the caller (no per-sample timeout: such functions usually call a
    service with its own) and returns one value per sample.
    `num_workers=0` scores inline in the caller, without timeout (for debugging). `exact_choice`: as
    `compute_score`'s.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        reward_fn: Callable | str | None = None,
        acc_weight: float | None = None,
        format_weight: float = 0.1,
        batch: bool = False,
        exact_choice: bool = False,
    ) -> None:
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"RewardPool needs num_workers >= 0 and timeout_s > 0, got {num_workers}, {timeout_s}")
        if batch and reward_fn is None:
            raise ValueError("reward.batch=true needs a batch reward function (reward.custom=file.py:function)")
        self.num_workers, self.timeout_s, self.batch = (0 if batch else num_workers), timeout_s, batch
        self.last_error: str | None = None
        # Loading the hook here fails early, with the hook's own error, instead of inside a worker.
        local_fn = reward.load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self._inline_args = (acc_weight, format_weight, local_fn, exact_choice)
        self._workers: WorkerPool | None = None
        if self.num_workers > 0:
            self._workers = WorkerPool(self.num_workers, timeout_s, _scorer,
                                       (reward_fn, acc_weight, format_weight, exact_choice),
                                       preload=("sapo_ray.reward", "sapo_ray.reward.mathvista"), name="RewardWorker")

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
        return self._score_in_workers(responses, examples)

    def _score_in_workers(self, responses: list[str], examples: list[dict]) -> tuple[list[dict], int, int]:
        outcomes = self._workers.map(list(zip(responses, examples)))
        for outcome in outcomes:
            if outcome.error is not None:
                self._note(outcome.error)
        n_errors = sum(o.error is not None for o in outcomes)
        n_timeouts = sum(o.timed_out for o in outcomes)
        return [o.value if o.ok else dict(FAILED) for o in outcomes], n_errors, n_timeouts

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
        acc_weight, format_weight, fn, exact_choice = self._inline_args
        try:
            values = list(fn(responses, examples))
            if len(values) != len(responses):
                raise ValueError(f"batch reward function returned {len(values)} values for {len(responses)} samples")
        except Exception as error:
            self._note(error)
            return [dict(FAILED) for _ in responses], len(responses), 0
        results, n_errors = [], 0
        for value, response, example in zip(values, responses, examples):
            try:
                results.append(reward.combine(value, response, acc_weight, format_weight, fn,
                                              exact_choice and reward.outside_choices(response, example)))
            except Exception as error:
                results.append(dict(FAILED))
                n_errors += 1
                self._note(error)
        return results, n_errors, 0

    def _note(self, error: BaseException | str) -> None:
        if self.last_error is None:
            self.last_error = error if isinstance(error, str) else describe(error)

    def close(self) -> None:
        """Kill the worker processes (idle between batches, so nothing is lost)."""
        if self._workers is not None:
            self._workers.close()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
