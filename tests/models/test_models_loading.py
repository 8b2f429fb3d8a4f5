import pytest
import torch

from sapo_ray.models import ValueModel, banned_token_ids, freeze_vision_tower, load_policy, load_processor
from tests.models.conftest import vlm_batch


def test_policy_and_value_forward_on_a_collated_batch(vlm_dir):
    proc, policy = load_processor(vlm_dir), load_policy(vlm_dir).eval()
    batch = vlm_batch(proc)
    B, S = batch["input_ids"].shape
    assert batch["attention_mask"][:, 0].tolist() != [1, 1]  # one row is left-padded
    with torch.no_grad():
        logits = policy(**batch).logits
        values = ValueModel.from_pretrained(vlm_dir).eval()(**batch)
    assert logits.shape == (B, S, len(proc.tokenizer)) and torch.isfinite(logits).all()
    assert values.shape == (B, S) and values.dtype == torch.float32 and torch.isfinite(values).all()
    assert 0 < values.abs().max() < 1  # small-init head: near zero but not degenerate


def test_value_of_a_padded_row_matches_the_row_alone(vlm_dir):
    proc, critic = load_processor(vlm_dir), ValueModel.from_pretrained(vlm_dir).eval()
    batch = vlm_batch(proc)
    short = int(batch["attention_mask"].sum(1).argmin())
    with torch.no_grad():
        both = critic(**batch)
        keep = batch["attention_mask"][short].bool()
        alone = critic(input_ids=batch["input_ids"][short:short + 1, keep], attention_mask=batch["attention_mask"][short:short + 1, keep],
                       pixel_values=batch["pixel_values"][64 * short:64 * (short + 1)],
                       image_grid_thw=batch["image_grid_thw"][short:short + 1],
                       mm_token_type_ids=batch["mm_token_type_ids"][short:short + 1, keep])
    torch.testing.assert_close(both[short, keep], alone[0], atol=1e-4, rtol=1e-4)


def test_save_load_round_trips_are_exact(vlm_dir, lm_dir, tmp_path):
    proc = load_processor(vlm_dir)
    batch = vlm_batch(proc)
    policy = load_policy(vlm_dir).eval()
    policy.save_pretrained(tmp_path / "policy")
    critic = ValueModel.from_pretrained(vlm_dir).eval()
    with torch.no_grad():
        critic.value_head.bias.fill_(0.5)
        critic.save_pretrained(tmp_path / "critic")
        assert torch.equal(policy(**batch).logits, load_policy(tmp_path / "policy").eval()(**batch).logits)
        assert torch.equal(critic(**batch), ValueModel.from_pretrained(tmp_path / "critic").eval()(**batch))
    # the critic's backbone keys are the policy's; only the head is new
    assert set(critic.state_dict()) - set(policy.state_dict()) == {"value_head.weight", "value_head.bias"}
    # text-only twin: same round trip
    lm, tok = ValueModel.from_pretrained(lm_dir).eval(), load_processor(lm_dir)
    ids = tok(["<think>Step 1: 3 + 4 = 7.</think>", "x"], return_tensors="pt", padding=True, padding_side="left")
    lm.save_pretrained(tmp_path / "lm-critic")
    with torch.no_grad():
        assert torch.equal(lm(**ids), ValueModel.from_pretrained(tmp_path / "lm-critic").eval()(**ids))


def test_text_only_critic_rejects_images(lm_dir):
    critic = ValueModel.from_pretrained(lm_dir)
    with pytest.raises(ValueError, match="vision inputs"):
        critic(input_ids=torch.ones(1, 3, dtype=torch.long), pixel_values=torch.zeros(4, 1176))


def test_generation_with_banned_ids_never_emits_them(vlm_dir):
    proc, policy = load_processor(vlm_dir), load_policy(vlm_dir).eval()
    batch = vlm_batch(proc)
    banned = banned_token_ids(proc.tokenizer)
    def sample(**kw):
        torch.manual_seed(0)
        with torch.no_grad():
            out = policy.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=64, min_new_tokens=64,
                                  pad_token_id=proc.tokenizer.pad_token_id, **kw)
        return out[:, batch["input_ids"].shape[1]:]
    free = sample()
    assert torch.isin(free, torch.tensor(banned)).any()  # control: a random model does sample specials
    gen = sample(suppress_tokens=banned)
    assert gen.shape == (2, 64) and not torch.isin(gen, torch.tensor(banned)).any()


@pytest.mark.gpu
def test_bf16_policy_and_critic_on_cuda(vlm_dir):
    proc = load_processor(vlm_dir)
    batch = {k: v.cuda() for k, v in vlm_batch(proc).items()}
    policy = load_policy(vlm_dir, dtype=torch.bfloat16).cuda().eval()
    critic = ValueModel.from_pretrained(vlm_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        assert torch.isfinite(policy(**batch).logits.float()).all()
        values = critic(**batch)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()


def test_freeze_vision_tower(vlm_dir, lm_dir):
    model = load_policy(vlm_dir)
    vision = {n for n, _ in model.named_parameters() if ".visual." in f".{n}"}
    n_vision = sum(p.numel() for n, p in model.named_parameters() if n in vision)
    assert vision and freeze_vision_tower(model) == n_vision
    assert all(p.requires_grad == (n not in vision) for n, p in model.named_parameters())
    critic = ValueModel.from_pretrained(vlm_dir)
    assert freeze_vision_tower(critic) == n_vision  # the critic's backbone has the same tower
    with pytest.raises(ValueError, match="no vision tower"):
        freeze_vision_tower(load_policy(lm_dir))
