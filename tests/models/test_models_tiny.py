import json
import os

import pytest
import torch

from sapo_ray.models import TINY_LM, TINY_VLM, load_policy, load_processor, load_tokenizer


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_models_have_the_intended_shape(vlm_dir, lm_dir):
    vlm, lm = load_policy(vlm_dir), load_policy(lm_dir)
    assert type(vlm).__name__ == "Qwen2_5_VLForConditionalGeneration" and type(lm).__name__ == "Qwen2ForCausalLM"
    assert 5e6 < _params(vlm) < 10e6 and 2e6 < _params(lm) < _params(vlm)
    tok = load_tokenizer(vlm_dir)
    assert vlm.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert vlm.config.get_text_config().vocab_size == len(tok) == lm.config.vocab_size
    assert load_tokenizer(lm_dir).get_vocab() == tok.get_vocab()  # the twin shares the tokenizer


def test_bundled_path_scheme_resolves():
    if not os.path.isdir(TINY_VLM):
        pytest.skip("tiny-vlm not shipped")
    assert load_tokenizer("bundled:tiny-vlm").get_vocab() == load_tokenizer(TINY_VLM).get_vocab()
    assert load_tokenizer("bundled:tiny-lm").get_vocab() == load_tokenizer(TINY_VLM).get_vocab()  # twins


@pytest.mark.parametrize("path", [TINY_VLM, TINY_LM], ids=["tiny-vlm", "tiny-lm"])
def test_shipped_checkpoint_answers_in_format(path):
    from sapo_ray.sft import evaluate, examples

    assert os.path.isfile(os.path.join(path, "model.safetensors")), f"{path} is not shipped"
    report = json.load(open(os.path.join(path, "sft_report.json")))
    assert report["steps"] > 0 and "greedy_acc" in report["eval"]
    model, proc = load_policy(path), load_processor(path)
    text_only = not hasattr(proc, "image_processor")
    items = examples(32, seed=4242, split="test", text_only=text_only, hint=report["config"].get("hint", True))
    torch.manual_seed(0)
    result = evaluate(model, proc, items, instruction="", samples=0, batch_size=32, max_new_tokens=96)
    assert result["greedy_format"] > 0.5 and result["greedy_acc"] > 0
