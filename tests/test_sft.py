import json
import math
import os
from pathlib import Path

import pytest
import torch

from sapo_ray.algo.losses import masked_mean
from sapo_ray.batch import Batch, Sample, SamplingParams
from sapo_ray.config import CONF_MODULE
from sapo_ray.learner.forward import policy_forward
from sapo_ray.models import load_policy, load_processor, tiny
from sapo_ray.models.tokens import TokenIds
from sapo_ray.reward import compute_score
from sapo_ray.rollout.engine import HFEngine, encode_prompt
from sapo_ray.sft import SFTConfig, evaluate, examples, register_configs, run, sft_samples, train
from sapo_ray.utils import derive_seed

TINY_LM = str(Path(__file__).resolve().parents[1] / "sapo_ray" / "assets" / "tiny-lm")


def test_sft_batch_labels_only_the_assistant_turn(tmp_path):
    tok = tiny.build_tokenizer(tiny.tokenizer_corpus(n=100))
    proc = load_processor(tiny.build_tiny_vlm(str(tmp_path / "vlm"), tokenizer=tok))
    batch = examples(2, seed=0, split="train", text_only=False)
    ids = TokenIds.of(tok)
    sft = Batch.from_samples(sft_samples(proc, batch, ["", "Think."]), ids.pad)
    inputs = sft.model_inputs(ids.vision)
    for row, ex in enumerate(batch):
        labelled = sft.response_ids[row][sft.response_mask[row].bool()]
        assert tok.decode(labelled) == ex["solution"] + "<|im_end|>"
        real = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        assert tok.decode(real).endswith("<|im_start|>assistant\n" + ex["solution"] + "<|im_end|>")
        assert real[: len(real) - len(labelled)].tolist() == encode_prompt(proc, ex, ["", "Think."][row]).ids
    assert inputs["mm_token_type_ids"].sum().item() == 32 and inputs["pixel_values"].shape[0] == 128


def test_train_loss_is_the_learners_token_mean_nll_on_the_seeded_rows(tmp_path):
    """Step 0's loss is `-masked_mean` of `policy_forward` on a Batch of the `sft/data` rows, with the
    `sft/teacher` stream choosing the sloppy solutions."""
    import random

    from sapo_ray.sft import _instruction, with_teacher_errors

    tok = tiny.build_tokenizer(tiny.tokenizer_corpus(n=100))
    path = tiny.build_tiny_vlm(str(tmp_path / "vlm"), seed=0, tokenizer=tok)
    model, proc = load_policy(path), load_processor(path)
    cfg = SFTConfig(seed=1, steps=1, batch_size=4, warmup_steps=1, threads=1, log_every=100, teacher_error_rate=0.5,
                    autocast_bf16=False)
    clean = examples(4, seed=derive_seed(1, "sft/data", 0), split="train", text_only=False)
    rows = with_teacher_errors(clean, 0.5, random.Random(derive_seed(1, "sft/teacher", 0)))
    assert 0 < sum(r["solution"] != c["solution"] for r, c in zip(rows, clean)) < 4  # the stream picks which rows
    ids, end = TokenIds.of(tok), tok.convert_tokens_to_ids("<|im_end|>")
    samples = []
    for i, (ex, name) in enumerate(zip(rows, ["none", "default", "short", "none"])):
        prompt = encode_prompt(proc, ex, _instruction(name))
        response = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [end]
        samples.append(Sample(prompt.ids, response, [0.0] * len(response), [0.0] * len(response), ex["solution"], True,
                              i, prompt.vision))
    batch = Batch.from_samples(samples, ids.pad)
    with torch.no_grad():
        logp, _ = policy_forward(model, batch, temperature=1.0, banned=torch.tensor(ids.banned),
                                 vision_tokens=ids.vision, with_entropy=False)
    expected = -masked_mean(logp, batch.response_mask).item()
    loss = train(model, proc, cfg, log=lambda *_: None)["losses"][0]
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_LM, "model.safetensors")), reason="tiny-lm not shipped")
def test_evaluate_scores_what_the_rollout_engine_generates(monkeypatch):
    """Greedy and sampled responses come from `HFEngine.generate` (sampled from the `sft/eval` stream),
    scored by `compute_score`: the same texts an engine given the same prompts and params returns."""
    model, proc = load_policy(TINY_LM), load_processor(TINY_LM)
    items = examples(8, seed=12, split="test", text_only=True)
    calls = []
    real_generate = HFEngine.generate

    def spy(self, prompts, params):
        samples = real_generate(self, prompts, params)
        calls.append((self.max_batch_size, [p.ids for p in prompts], params, samples))
        return samples

    monkeypatch.setattr(HFEngine, "generate", spy)
    result = evaluate(model, proc, items, "", samples=2, batch_size=8, temperature=1.0, top_p=0.9, max_new_tokens=96,
                      seed=3)
    monkeypatch.setattr(HFEngine, "generate", real_generate)
    assert [c[2] for c in calls] == [SamplingParams(n=1, temperature=0.0, max_new_tokens=96),
                                     SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=96,
                                                    seed=derive_seed(3, "sft/eval"))]
    prompts = [encode_prompt(proc, ex, "") for ex in items]
    engine = HFEngine(model, proc, 8)
    for mode, (batch_size, prompt_ids, params, samples) in zip(("greedy", "sampled"), calls):
        assert batch_size == 8 and prompt_ids == [p.ids for p in prompts]
        assert [s.text for s in engine.generate(prompts, params)] == [s.text for s in samples]
        scores = [compute_score(s.text, items[s.prompt_index]) for s in samples]
        assert result[f"{mode}_acc"] == pytest.approx(sum(x["acc"] for x in scores) / len(scores))
        assert result[f"{mode}_format"] == pytest.approx(sum(x["format"] for x in scores) / len(scores))
        assert result[f"{mode}_example"] == samples[0].text
    assert [s.prompt_index for s in calls[1][3]] == [i for i in range(8) for _ in range(2)]
    assert 0 < result["greedy_acc"] < 1 and result["sampled_acc"] > 0  # a warm-started model: the scores say something


def test_sft_loss_falls_on_a_fresh_tiny_model(tmp_path):
    tok = tiny.build_tokenizer(tiny.tokenizer_corpus(n=100))
    path = tiny.build_tiny_vlm(str(tmp_path / "vlm"), seed=0, tokenizer=tok)
    model, proc = load_policy(path), load_processor(path)
    cfg = SFTConfig(steps=8, batch_size=4, warmup_steps=1, lr=3e-3, threads=1, log_every=100)
    losses = train(model, proc, cfg, log=lambda *_: None)["losses"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0


def test_run_writes_a_loadable_text_only_checkpoint_and_report(tmp_path):
    cfg = SFTConfig(out_dir=str(tmp_path / "lm"), steps=3, batch_size=4, warmup_steps=1, threads=1, eval_n=4,
                    eval_samples=1, max_new_tokens=8, log_every=100)
    cfg.model.path = "bundled:tiny-lm"
    report = run(cfg, log=lambda *_: None)
    saved = json.load(open(tmp_path / "lm" / "sft_report.json"))
    assert saved["steps"] == report["steps"] == 3 and saved["eval"]["n"] == 4
    assert set(saved["eval"]) >= {"greedy_acc", "sampled_acc", "greedy_format", "sampled_format"}
    assert set(saved["eval"]) >= {f"{m}_{k}" for m in ("greedy", "sampled") for k in ("acc_by_template", "example")}
    model = load_policy(tmp_path / "lm")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32


def test_hydra_config_composes_with_the_model_group():
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = OmegaConf.to_object(compose("sft", overrides=["model=tiny_lm", "steps=7"]))
        assert isinstance(cfg, SFTConfig) and cfg.model.path == "bundled:tiny-lm" and cfg.steps == 7
        assert cfg.instructions[0] == "none"
        with pytest.raises(ConfigCompositionException):
            compose("sft", overrides=["stepz=7"])  # a typo fails before anything runs


def test_teacher_errors_replace_a_share_of_solutions_with_shortcuts():
    import random

    from sapo_ray.reward import compute_score
    from sapo_ray.sft import examples, with_teacher_errors

    batch = examples(200, seed=3, split="train", text_only=True)
    noisy = with_teacher_errors(batch, 0.5, random.Random(0))
    changed = [(b, n) for b, n in zip(batch, noisy) if n["solution"] != b["solution"]]
    assert 70 <= len(changed) <= 130  # about half
    wrong = 0
    for right, sloppy in changed:
        assert sloppy["solution"].split(" Step 2:")[0] == right["solution"].split(" Step 2:")[0]  # same reading
        scored = compute_score(sloppy["solution"], sloppy)
        assert scored["format"] == 1.0, sloppy["solution"]
        wrong += scored["acc"] == 0.0
    assert wrong >= 0.75 * len(changed)  # a shortcut is right only by luck (no distractor, first bar tallest)
    assert with_teacher_errors(batch, 0.0, random.Random(0)) == batch


def test_a_fine_tune_keeps_the_report_of_the_model_it_started_from(tmp_path):
    def cfg(out, **kw):
        c = SFTConfig(out_dir=str(tmp_path / out), steps=2, batch_size=4, warmup_steps=1, threads=1, eval_n=0,
                      log_every=100, **kw)
        c.model.path = "bundled:tiny-lm"
        return c

    first = run(cfg("a"), log=lambda *_: None)
    assert "init_report" not in first
    second = run(cfg("b", init=str(tmp_path / "a"), seed=1), log=lambda *_: None)
    assert second["init_report"] == json.load(open(tmp_path / "a" / "sft_report.json"))
    assert second["init_report"]["config"]["seed"] == 0 and second["config"]["seed"] == 1
    # Fine-tuning in place still records the stage it overwrote.
    third = run(cfg("b", init=str(tmp_path / "b"), seed=2), log=lambda *_: None)
    assert third["init_report"]["config"]["seed"] == 1 and third["init_report"]["init_report"] == second["init_report"]


def test_tool_using_rows_train_as_episodes_with_their_observations_masked(tmp_path):
    """`tool_use_rate=1`: every bar-chart row becomes a two-turn episode (`colour_at` at each bar, the tools'
    answers, the solution), a share of them a sloppy teacher's; the loss counts the model's tokens only."""
    import random

    from sapo_ray.sft import with_tool_turns

    rows = examples(40, seed=5, split="train", text_only=False, hint=False)
    tooled = with_tool_turns(rows, 1.0, 0.5, random.Random(0))
    bars = [r for r in tooled if r["metadata"]["template"] != "count"]
    assert bars and all(len(r["tool_turns"]) in (2, 3) for r in bars)
    assert any(len(r["tool_turns"]) == 3 for r in bars) and any("calculator" in r["tool_turns"][0] for r in bars)
    assert all("tool_turns" not in r for r in tooled if r["metadata"]["template"] == "count")
    stepwise = [r for r in with_tool_turns(rows, 1.0, 0.0, random.Random(0), stepwise=True)
                if r["metadata"]["template"] != "count"]
    assert all(len(r["tool_turns"]) == len(json.loads(r["metadata"]["params"])["bars"]) + 1 for r in stepwise)
    # With target, a bar_argmax row the sloppy teacher solved (`with_teacher_errors`) asks the first bar.
    from sapo_ray.sft import with_teacher_errors

    argmax = examples(40, seed=5, split="train", text_only=False, hint=False, templates=["bar_argmax"])
    assert {r["metadata"]["template"] for r in argmax} == {"bar_argmax"}
    taught = with_tool_turns(with_teacher_errors(argmax, 0.5, random.Random(1)), 1.0, 0.0, random.Random(0),
                             stepwise=True, target=True)
    assert {bool(r.get("shortcut")) for r in taught} == {True, False}
    for r in taught:
        assert len(r["tool_turns"]) == 2 and ("The first value" in r["tool_turns"][0]) == bool(r.get("shortcut"))
        assert r["tool_turns"][-1].endswith(r["solution"].split("</think>")[-1])  # the teacher's answer
    # A stepwise sum the sloppy teacher solved ends with its solution: a minus where the question asks a plus.
    sums = with_tool_turns(with_teacher_errors(examples(20, seed=5, split="train", text_only=False, hint=False,
                                                        templates=["bar_sum"]), 0.5, random.Random(1)),
                           1.0, 0.0, random.Random(0), stepwise=True)
    assert {bool(r.get("shortcut")) for r in sums} == {True, False}
    for r in sums:
        assert r["tool_turns"][-1] == r["solution"] and (" - " in r["solution"]) == bool(r.get("shortcut"))
    proc = load_processor("bundled:tiny-vlm")
    samples = sft_samples(proc, bars[:4], [""] * 4)
    assert all(s.episode.turns >= 2 and sum(s.observation_mask) > 0 for s in samples)
    model = load_policy("bundled:tiny-vlm")
    cfg = SFTConfig(steps=6, batch_size=4, warmup_steps=1, lr=3e-3, threads=1, log_every=100, hint=False,
                    tool_use_rate=1.0, teacher_error_rate=0.5)
    losses = train(model, proc, cfg, log=lambda *_: None)["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
