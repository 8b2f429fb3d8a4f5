"""Scoring a step's samples with the reward pool, and the run's watch over reward failures."""

from __future__ import annotations

import logging

import numpy as np

from sapo_ray.batch import Sample
from sapo_ray.errors import StopRun
from sapo_ray.reward.pool import RewardPool

log = logging.getLogger(__name__)
# The numbers every reward returns; any other key of a score is the reward function's own, logged as a mean.
REQUIRED = ("score", "acc", "format")
# Steps in a row whose samples mostly failed to score before the run stops.
FAILING_STEPS = 3


class Scorer:
    """`pool`'s scores for samples, with the failures counted; `check` stops a run whose reward fails for
    more than `max_error_rate` of the samples in each of `FAILING_STEPS` steps running."""

    def __init__(self, pool: RewardPool, max_error_rate: float, tool_error_penalty: float = 0.0):
        self.pool, self.max_error_rate, self.tool_error_penalty = pool, max_error_rate, tool_error_penalty
        self.failing_steps = 0
        self.errors_seen: set[str] = set()  # error messages already logged

    @classmethod
    def from_config(cls, reward) -> "Scorer":
        """The scorer of config section `reward` (`sapo_ray.config.RewardConfig`)."""
        return cls(RewardPool(reward.num_workers, reward.timeout_s, reward.custom, reward.acc_weight,
                              reward.format_weight, reward.batch, reward.exact_choice), reward.max_error_rate,
                   reward.tool_error_penalty)

    def score(self, samples: list[Sample], examples: list[dict], prefix: str = "") -> tuple[list[dict], dict, dict]:
        """Each sample's scores (`examples[sample.prompt_index]` its example; an episode's score less
        `tool_error_penalty` per failed tool call, its `acc` as the reward gave it); the counts
        `{prefix}reward/errors|timeouts|samples`, and the mean of each of the reward function's own numbers
        (`{prefix}reward/<name>`)."""
        scores, errors, timeouts = self.pool.score([s.text for s in samples], [examples[s.prompt_index] for s in samples])
        if self.tool_error_penalty:
            for sample, x in zip(samples, scores):
                if sample.episode is not None:
                    x["score"] -= self.tool_error_penalty * sum(sample.episode.tool_errors.values())
        counts = {f"{prefix}reward/errors": float(errors), f"{prefix}reward/timeouts": float(timeouts),
                  f"{prefix}reward/samples": float(len(samples))}
        if self.pool.last_error and self.pool.last_error not in self.errors_seen:
            self.errors_seen.add(self.pool.last_error)
            log.warning("reward: %d of %d samples failed to score; the first error: %s", errors, len(samples),
                        self.pool.last_error)
        extras = sorted({k for x in scores for k in x} - set(REQUIRED))
        means = {f"{prefix}reward/{k}": float(np.mean([x[k] for x in scores if k in x])) for k in extras}
        return scores, counts, means

    def close(self) -> None:
        self.pool.close()

    def check(self, errors: float, timeouts: float, samples: float) -> float:
        """The step's error rate; raises `StopRun` when it is the `FAILING_STEPS`-th step running over
        `reward.max_error_rate`: training on zeros would teach nothing, silently."""
        rate = (errors + timeouts) / samples if samples else 0.0
        self.failing_steps = self.failing_steps + 1 if rate > self.max_error_rate else 0
        if self.failing_steps >= FAILING_STEPS:
            raise StopRun(f"reward: {rate:.0%} of the samples failed to score in each of the last {FAILING_STEPS} steps "
                          f"(reward.max_error_rate={self.max_error_rate}); stopping instead of training on zeros. "
                          f"The last error: {self.pool.last_error or 'a timeout'}")
        return rate
