"""User reward hooks for the tests, loaded by path ('tests/reward/hooks.py:name'), also inside workers."""

import os
import time

from sapo_ray.reward import get_reward_fn


def always_half(response, example):
    return 0.5


def not_a_number(response, example):
    return "1"


def misbehave(response, example):
    """Behaviour chosen by `example["mode"]`: hang, raise, crash the process, report; else the built-in.

    "hang": append this process's id to `example["pid_file"]` (one line per start), then sleep for ever.
    "slow": append this process's id to `example["log_file"]` (one line per start), sleep
    `example["sleep_s"]`, then score with the built-in.
    """
    mode = example.get("mode")
    if mode == "hang":
        with open(example["pid_file"], "a") as f:
            f.write(f"{os.getpid()}\n")
        while True:
            time.sleep(1)
    if mode == "raise":
        raise RuntimeError("reward function failed")
    if mode == "crash":
        os._exit(3)
    if mode == "slow":
        with open(example["log_file"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(example["sleep_s"])
    if mode == "has_images":
        return float("images" in example)
    return get_reward_fn(example["data_source"])(response, example)


def with_extras(response, example):
    """The built-in accuracy as `score`, and the response's length in characters as an extra number."""
    return {"score": get_reward_fn(example["data_source"])(response, example), "chars": len(response)}


def not_finite(response, example):
    return float("nan")


def batch_lengths(responses, examples):
    """Batch form: 1.0 for responses longer than the example's answer, with the length as an extra."""
    return [{"score": float(len(r) > len(e["answer"])), "chars": len(r)} for r, e in zip(responses, examples)]
