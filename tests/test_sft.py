import json
from pathlib import Path

import pytest
import torch

from sapo_ray.models import load_policy, load_processor, tiny
from sapo_ray.sft import SFTConfig, examples, register_configs, run, sft_batch, train


def test_sft_batch_labels_only_the_assistant_turn(tmp_path):
    tok = tiny.build_tokenizer(tiny.tokenizer_corpus(n=100))
    proc = load_processor(tiny.build_tiny_vlm(str(tmp_path / "vlm"), tokenizer=tok))
    batch = examples(2, seed=0, split="train", text_only=False)
    inputs = sft_batch(proc, batch, ["", "Think."])
    for row, ex in enumerate(batch):
        labelled = inputs["labels"][row][inputs["labels"][row] != -100]
        assert tok.decode(labelled) == ex["solution"] + "<|im_end|>"
        n = int(inputs["attention_mask"][row].sum())
        assert tok.decode(inputs["input_ids"][row, :n]).endswith("<|im_start|>assistant\n" + ex["solution"] + "<|im_end|>")
    assert inputs["mm_token_type_ids"].sum().item() == 32 and inputs["pixel_values"].shape[0] == 128


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
    model = load_policy(tmp_path / "lm")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32


def test_hydra_config_composes_with_the_model_group():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
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
