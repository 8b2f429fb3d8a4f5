import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sapo_ray.reward.pool import RewardPool

MISBEHAVE = f"{Path(__file__).with_name('hooks.py')}:misbehave"
TIMEOUT_S = 1.5
ZERO = {"score": 0.0, "acc": 0.0, "format": 0.0}
RIGHT = {"score": 1.0, "acc": 1.0, "format": 1.0}
GOOD = r"<think>Count.</think> \boxed{3}"


def example(**fields):
    base = {"pid": "1", "data_source": "geometry3k", "answer": "3", "question_type": "free_form",
            "answer_type": "integer", "precision": None, "choices": None}
    return {**base, **fields}


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT_S, reward_fn=MISBEHAVE) as pool:
        yield pool


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def all_dead(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while any(map(is_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(is_alive, pids))


def test_scores_a_batch_in_order(pool):
    responses = [GOOD, r"\boxed{3}", r"<think>x</think>\boxed{4}", r"\boxed{\frac{6}{2}}"]
    results, n_errors, n_timeouts = pool.score(responses, [example()] * 4)
    assert [r["acc"] for r in results] == [1.0, 1.0, 0.0, 1.0]
    assert [r["format"] for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert (n_errors, n_timeouts) == (0, 0)


def test_images_are_not_sent_to_workers(pool):
    image = Image.new("RGB", (4, 4))
    results, n_errors, _ = pool.score([GOOD], [example(mode="has_images", images=[image])])
    assert results[0]["acc"] == 0.0 and n_errors == 0


def test_adversarial_responses_come_back_scored(pool):
    responses = [
        "",
        "x" * 3_000_000 + r"\boxed{3}",  # huge, still right
        r"<think>}{</think>\boxed{3",  # unbalanced
        r"\boxed{1}\boxed{2}\fbox{3}",  # several boxes: the last counts
        "\udcff\ud800\x00 \\boxed{\udcff}",  # lone surrogates, NUL
        r"<think>hm</think> \boxed{9^{9^{9^{9^{9}}}}}",  # sympy would compute this for ever
        GOOD,
    ]
    start = time.monotonic()
    results, n_errors, n_timeouts = pool.score(responses, [example() for _ in responses])
    assert time.monotonic() - start < 6 * TIMEOUT_S
    assert [r["acc"] for r in results] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert results[5] == ZERO and results[6] == RIGHT
    assert (n_errors, n_timeouts) == (0, 1)


def test_hung_worker_is_killed_and_pool_keeps_working(pool, tmp_path):
    pid_file = tmp_path / "hung.pid"
    examples = [example(), example(mode="hang", pid_file=str(pid_file)), example(), example()]
    start = time.monotonic()
    results, n_errors, n_timeouts = pool.score([GOOD] * 4, examples)
    assert time.monotonic() - start < 4 * TIMEOUT_S
    assert results == [RIGHT, ZERO, RIGHT, RIGHT] and (n_errors, n_timeouts) == (0, 1)
    hung_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while is_alive(hung_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(hung_pid)
    assert pool.score([GOOD], [example()]) == ([RIGHT], 0, 0)


def test_raising_and_crashing_reward_fns_are_counted_errors(pool):
    examples = [example(mode="raise"), example(), example(mode="crash"), example(), example(mode="raise")]
    results, n_errors, n_timeouts = pool.score([GOOD] * 5, examples)
    assert results == [ZERO, RIGHT, ZERO, RIGHT, ZERO]
    assert (n_errors, n_timeouts) == (3, 0)


def test_inline_mode_counts_errors_without_timeout():
    pool = RewardPool(num_workers=0, timeout_s=TIMEOUT_S, reward_fn=MISBEHAVE)
    results, n_errors, n_timeouts = pool.score([GOOD, GOOD, ""], [example(), example(mode="raise"), example()])
    assert results == [RIGHT, ZERO, ZERO] and (n_errors, n_timeouts) == (1, 0)
    assert pool.score([], []) == ([], 0, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        RewardPool(0, 1.0).score(["a", "b"], [example()])
    with pytest.raises(TypeError, match="cannot be sent to workers"):
        RewardPool(1, 1.0, reward_fn=lambda response, example: 1.0)
    with pytest.raises(ValueError, match="timeout_s > 0"):
        RewardPool(1, 0)


def run_in_thread(fn):
    """Run fn() in a non-main thread (as Ray actors and trainer threads do) and return its result."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(fn).result(timeout=60)


def test_math_verify_works_outside_the_main_thread():
    # With math_verify's signal-based timeouts left on, this raises in a thread and counts an error.
    pool = RewardPool(num_workers=0, timeout_s=TIMEOUT_S)
    half = example(answer="0.5")
    assert run_in_thread(lambda: pool.score([r"<think>x</think>\boxed{\frac{1}{2}}"], [half])) == ([RIGHT], 0, 0)


def test_pool_created_and_used_in_a_thread():
    def create_and_score():
        with RewardPool(num_workers=1, timeout_s=TIMEOUT_S) as pool:
            return pool.score([r"\boxed{9^{9^{9^{9^{9}}}}}", GOOD], [example(), example()])

    assert run_in_thread(create_and_score) == ([ZERO, RIGHT], 0, 1)


def test_errors_keep_their_first_message_and_batch_functions_score_in_one_call():
    hooks = Path(__file__).with_name("hooks.py")
    with RewardPool(num_workers=0, timeout_s=1.0, reward_fn=f"{hooks}:not_finite") as inline:
        assert inline.score([GOOD, GOOD], [example(), example()]) == ([ZERO, ZERO], 2, 0)
        assert inline.last_error.startswith("ValueError: reward function 'not_finite' returned a non-finite score")
        inline.score([], [])
        assert inline.last_error is None  # per call
    batch = RewardPool(num_workers=2, timeout_s=1.0, reward_fn=f"{hooks}:batch_lengths", format_weight=0.0, batch=True)
    results, n_errors, _ = batch.score(["12345", "1"], [example(answer="333"), example(answer="333")])
    assert n_errors == 0 and [(r["score"], r["chars"]) for r in results] == [(1.0, 5.0), (0.0, 1.0)]
    short = RewardPool(0, 1.0, reward_fn=lambda rs, es: [1.0], batch=True)
    assert short.score(["a", "b"], [example(), example()]) == ([ZERO, ZERO], 2, 0)
    assert "returned 1 values for 2 samples" in short.last_error


def test_a_timeout_leaves_the_samples_in_flight_on_other_workers_alone(pool, tmp_path):
    # Worker A hangs from t=0 (deadline 1.5 s); worker B scores the first slow sample over 0-1 s and the
    # second over 1-2 s, so the second is running when A is killed and must not be started again.
    hang = example(mode="hang", pid_file=str(tmp_path / "hung.pid"))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    slow = [example(mode="slow", sleep_s=1.0, log_file=str(log)) for log in logs]
    results, n_errors, n_timeouts = pool.score([GOOD] * 3, [hang, *slow])
    assert results == [ZERO, RIGHT, RIGHT] and (n_errors, n_timeouts) == (0, 1)
    runs = [log.read_text().split() for log in logs]
    assert [len(pids) for pids in runs] == [1, 1]
    assert runs[0] == runs[1]  # the same worker scored both: it was not restarted


def test_a_storm_of_hung_samples_costs_each_one_worker_one_timeout(tmp_path):
    timeout_s, num_workers = 1.0, 4
    hung_log = tmp_path / "hung.pids"
    hang = example(mode="hang", pid_file=str(hung_log))
    # Answers checked as plain strings: a first sympy check in a fresh worker can take a second of a busy CPU.
    right = (GOOD, example(), RIGHT)
    unformatted = (r"\boxed{3}", example(), {"score": 0.9, "acc": 1.0, "format": 0.0})
    # 50 samples that never finish, spread through the batch
    batch = [(GOOD, hang, ZERO) if i % 5 == 2 and i < 250 else right if i % 2 else unformatted for i in range(256)]
    responses, examples, expected = map(list, zip(*batch))
    assert expected.count(ZERO) == 50
    with RewardPool(num_workers=num_workers, timeout_s=timeout_s, reward_fn=MISBEHAVE) as storm:
        start = time.monotonic()
        results, n_errors, n_timeouts = storm.score(responses, examples)
        elapsed = time.monotonic() - start
    assert results == expected and (n_errors, n_timeouts) == (0, 50)
    # Each hung sample was started once, on a worker of its own that was then killed; restarting the
    # whole pool at each timeout starts again the hung samples that were running on the other workers.
    pids = [int(pid) for pid in hung_log.read_text().split()]
    assert len(pids) == len(set(pids)) == 50 and not any(map(is_alive, pids))
    # Each hung sample holds one worker for timeout_s: 50 / 4 * 1 s = 12.5 s, plus a worker start-up per
    # timeout and the good samples. Killing the whole pool at each timeout (a ProcessPoolExecutor cannot
    # kill one worker) and starting again what ran on the other workers takes about twice that.
    # The pids above tell the one-worker kill from a pool restart; the time only bounds the storm to its timeouts
    # with room for a loaded CI machine (22.8 s measured once against the 22.5 s this bound had).
    assert elapsed < 50 / num_workers * timeout_s * 2 + 10


def test_close_and_garbage_collection_kill_the_workers(tmp_path):
    def worker_pids(pool, name):
        log = tmp_path / name
        slow = example(mode="slow", sleep_s=0.3, log_file=str(log))
        assert pool.score([GOOD, GOOD], [slow, slow]) == ([RIGHT, RIGHT], 0, 0)
        return [int(pid) for pid in log.read_text().split()]

    closed = RewardPool(num_workers=2, timeout_s=TIMEOUT_S, reward_fn=MISBEHAVE)
    pids = worker_pids(closed, "closed.log")
    assert len(set(pids)) == 2 and all(map(is_alive, pids))
    closed.close()
    assert all_dead(pids, within_s=5)
    with pytest.raises(RuntimeError, match="after close"):
        closed.score([GOOD], [example()])

    dropped = RewardPool(num_workers=2, timeout_s=TIMEOUT_S, reward_fn=MISBEHAVE)
    pids = worker_pids(dropped, "dropped.log")
    del dropped
    gc.collect()
    assert all_dead(pids, within_s=5)


OWNER = """
import sys
from sapo_ray.reward.pool import RewardPool

hooks, tmp, how = sys.argv[1:]
base = {"data_source": "geometry3k", "answer": "3"}
slow = {**base, "mode": "slow", "sleep_s": 0.0, "log_file": tmp + "/idle.log"}
hang = {**base, "mode": "hang", "pid_file": tmp + "/hung.pid"}
pool = RewardPool(2, 120.0, reward_fn=hooks + ":misbehave")
if how == "exit":  # leave without close(), the workers idle
    pool.score(["x", "x"], [slow, slow])
else:  # hangs here until killed
    pool.score(["x", "x"], [hang, slow])
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_workers_end_with_the_process_that_owns_the_pool(tmp_path, how):
    hooks = Path(__file__).with_name("hooks.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(hooks), str(tmp_path), how], env=env)
    pids = []
    try:
        if how == "exit":
            assert owner.wait(timeout=60) == 0
            pids = [int(pid) for pid in (tmp_path / "idle.log").read_text().split()]
        else:
            files = [tmp_path / "hung.pid", tmp_path / "idle.log"]
            deadline = time.monotonic() + 60
            while not all(f.exists() and f.read_text() for f in files) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = [int(f.read_text().split()[0]) for f in files]
            owner.kill()  # no exit handlers run
            owner.wait(timeout=10)
        assert pids and all_dead(pids, within_s=10)
    finally:
        owner.kill()
        for pid in filter(is_alive, pids):
            os.kill(pid, signal.SIGKILL)


def test_each_failed_tool_call_of_an_episode_is_taken_off_its_score():
    """`reward.tool_error_penalty`: 0.25 per failed call off the score (0.9 x acc + 0.1 x format), the accuracy
    left as the reward gave it; a one-turn sample and an episode without failures keep their scores."""
    from sapo_ray.batch import EpisodeStats, Sample
    from sapo_ray.reward.scorer import Scorer

    right = "<think>x</think> The answer is \\boxed{4}."
    example = {"data_source": "synthvista", "question_type": "free_form", "answer_type": "integer", "answer": "4",
               "choices": None, "precision": None, "unit": None}
    episodes = [None, EpisodeStats(turns=2, tool_calls=1), EpisodeStats(turns=3, tool_calls=3,
                                                                          tool_errors={"malformed_call": 2, "timeout": 1})]
    samples = [Sample([1], [2], [0.0], [0.0], right, True, 0, episode=e) for e in episodes]
    scorer = Scorer(RewardPool(0, 5.0), max_error_rate=0.5, tool_error_penalty=0.25)
    scores, counts, _ = scorer.score(samples, [example])
    assert [x["acc"] for x in scores] == [1.0, 1.0, 1.0]
    assert [x["score"] for x in scores] == pytest.approx([1.0, 1.0, 1.0 - 3 * 0.25])
    assert counts["reward/errors"] == 0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_exact_choice_scores_an_answer_outside_the_choices_zero_where_mathvista_takes_the_nearest(num_workers):
    """`reward.exact_choice`: `greem` is one edit from `green`, so MathVista's rule counts it as the answer;
    exact matching scores it 0. A letter, a choice in other case, a wrong choice and a free-form question
    score alike under both rules; a batch reward function is gated the same way."""
    question = {"data_source": "synthvista", "question_type": "multi_choice", "answer_type": "text",
                "answer": "green", "choices": ["red", "green"], "precision": None, "unit": None}
    number = {"data_source": "synthvista", "question_type": "free_form", "answer_type": "integer", "answer": "4",
              "choices": None, "precision": None, "unit": None}
    responses = ["\\boxed{greem}", "\\boxed{B}", "\\boxed{ Green }", "\\boxed{red}", "\\boxed{yellow}", "\\boxed{4}"]
    examples = [question] * 5 + [number]
    with RewardPool(num_workers, 10.0, format_weight=0.0) as nearest:
        assert [x["acc"] for x in nearest.score(responses, examples)[0]] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with RewardPool(num_workers, 10.0, format_weight=0.0, exact_choice=True) as exact:
        assert [x["acc"] for x in exact.score(responses, examples)[0]] == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    always = RewardPool(0, 10.0, lambda rs, es: [1.0] * len(rs), format_weight=0.0, batch=True, exact_choice=True)
    assert [x["acc"] for x in always.score(responses, examples)[0]] == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
