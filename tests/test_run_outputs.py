"""What a run leaves beside its metrics: generation dumps, MathVista result files, checkpoint retention,
and the stop on a reward function that keeps failing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sapo_ray.batch import Sample
from sapo_ray.data import synthvista
from sapo_ray.reward import compute_score
from sapo_ray.reward.mathvista import result_file, score_results
from sapo_ray.tracking import generation_records
from sapo_ray.checkpoints import Checkpoints, check_shards, stale_checkpoints
from sapo_ray.errors import StopRun
from sapo_ray.reward.scorer import Scorer
from sapo_ray.bookkeeping import check_skipped_steps


def _sample(text: str, index: int) -> Sample:
    return Sample(prompt_ids=[1], response_ids=[5, 6, 7], rollout_logp=[0.0] * 3, rollout_entropy=[0.0] * 3,
                  text=text, finished=True, prompt_index=index)


def test_generation_records_carry_the_row_scores_and_own_columns():
    examples = [{"pid": "a", "query": "Q?", "answer": "3", "uid": "row-7", "columns": ["uid"]}]
    records = generation_records([_sample("r", 0)], examples, [{"score": 0.5, "acc": 1.0, "format": 0.0, "chars": 1.0}],
                                 step=4, sampling="greedy")
    assert records == [{"uid": "row-7", "step": 4, "sampling": "greedy", "pid": "a", "prompt": "Q?", "response": "r",
                        "answer": "3", "finished": True, "response_length": 3, "score": 0.5, "acc": 1.0,
                        "format": 0.0, "chars": 1.0}]


def test_the_mathvista_result_file_scores_as_the_reward_does():
    """MathVista's own scorer, run on the written result file, agrees problem by problem with the reward."""
    examples = [synthvista.to_example(r) for r in synthvista.generate(12, 0, "val")]
    responses = [rf"<think>x</think> \boxed{{{ex['answer'] if i % 3 else 'zz'}}}" for i, ex in enumerate(examples)]
    responses[1] = "no box at all"
    results = result_file(list(zip(examples, responses)))
    rewarded = [compute_score(r, ex)["acc"] for r, ex in zip(responses, examples)]
    scored = score_results(results)["average"]
    assert scored["correct"] == sum(rewarded) == 7 and scored["total"] == 12
    assert set(results) == {ex["pid"] for ex in examples} and results[examples[1]["pid"]]["extraction"] == ""


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "step_000010.tmp").mkdir()  # an interrupted save is never counted as one
    assert [p.name for p in stale_checkpoints(tmp_path, 2)] == ["step_000002", "step_000004"]
    assert stale_checkpoints(tmp_path, 0) == []
    assert stale_checkpoints(tmp_path, 5) == []


def test_a_reward_that_keeps_failing_stops_the_run_on_the_third_step():
    scorer = Scorer(SimpleNamespace(last_error="KeyError: 'solution'"), max_error_rate=0.5)
    for errors, timeouts in ((6, 0), (3, 3), (5, 0)):  # 5 of 10 is not more than half: the count starts over
        rate = scorer.check(errors, timeouts, 10.0)
    assert rate == 0.5 and scorer.failing_steps == 0
    scorer.check(10, 0, 10.0)
    scorer.check(9, 0, 10.0)
    with pytest.raises(StopRun, match="last 3 steps.*KeyError: 'solution'"):
        scorer.check(6, 0, 10.0)


def test_a_save_cut_short_never_breaks_resume(tmp_path):
    """`latest` emptied by a kill, a temporary left by another: the newest complete checkpoint is taken
    and the temporary removed; a step directory without its trainer state is not a checkpoint."""
    from sapo_ray.utils import write_atomic

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
        (ckpt / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
    (ckpt / "step_000006").mkdir()  # no trainer_state.json
    (ckpt / "step_000008.tmp" / "actor").mkdir(parents=True)
    (ckpt / "latest").write_text("")
    assert Checkpoints(ckpt, 2).latest() == ckpt / "step_000004"
    assert not (ckpt / "step_000008.tmp").exists()
    write_atomic(ckpt / "latest", "step_000002")
    assert Checkpoints(ckpt, 2).latest() == ckpt / "step_000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000002", "step_000004", "step_000006"]
    assert Checkpoints(tmp_path / "fresh", 2).latest() is None


def test_shards_the_driver_cannot_see_stop_the_first_save(tmp_path):
    (tmp_path / "actor").mkdir()
    (tmp_path / "actor" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(StopRun, match=r"actor shards of ranks \[1\].*shares"):
        check_shards(tmp_path, {"actor": 2})
    (tmp_path / "actor" / "__1_0.distcp").write_bytes(b"")
    check_shards(tmp_path, {"actor": 2})


def test_optimizer_steps_skipped_in_a_row_stop_the_run():
    check_skipped_steps({"actor/skipped_in_a_row": 5.0, "critic/skipped_in_a_row": 0.0}, limit=5)
    with pytest.raises(StopRun, match="critic: the last 6 optimizer steps"):
        check_skipped_steps({"actor/skipped_in_a_row": 0.0, "critic/skipped_in_a_row": 6.0}, limit=5)
    check_skipped_steps({"actor/skipped_in_a_row": 60.0}, limit=0)  # never


