"""The memory plan (`python -m sapo_ray.plan`): placement and per-GPU estimates of the paper's run from the
shipped Qwen2.5-VL configs (no weights), checked against numbers computed by hand."""

from __future__ import annotations

import json

import pytest

from sapo_ray import plan as plan_mod

EXPERIMENT = ["+experiment=mathvista", "model.path=bundled:configs/qwen2_5_vl_3b", "cluster.simulate_gpus=8"]
P_3B = 3_754_622_976  # Qwen2.5-VL-3B-Instruct's parameters (vision tower included, embedding tied)
GiB = 2**30


def run_plan(capsys, *overrides: str) -> tuple[int, dict]:
    code = plan_mod.main([*EXPERIMENT, *overrides, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_shapes_of_the_shipped_configs():
    s3 = plan_mod.model_shape("bundled:configs/qwen2_5_vl_3b")
    assert (s3.params, s3.hidden, s3.layers, s3.vocab, s3.kv_dim, s3.lm_head_params) == (P_3B, 2048, 36, 151936, 256, 0)
    s7 = plan_mod.model_shape("bundled:configs/qwen2_5_vl_7b")
    assert s7.params == 8_292_166_656 and s7.lm_head_params == 152064 * 3584  # 7B: untied lm_head
    q4, q8 = plan_mod.model_shape("bundled:configs/qwen3_vl_4b"), plan_mod.model_shape("bundled:configs/qwen3_vl_8b")
    assert (q4.params, q4.hidden, q4.layers, q4.kv_dim, q4.lm_head_params) == (4_437_815_808, 2560, 36, 1024, 0)
    assert (q4.vision_layers, q4.vision_hidden, q4.patch_size) == (24, 1024, 16)
    assert (q8.params, q8.hidden, q8.lm_head_params, q8.vision_layers, q8.vision_hidden) == (
        8_767_123_696, 4096, 151936 * 4096, 27, 1152)


def test_the_qwen3_vl_8b_plan_fits_with_headroom(capsys):
    """Qwen3-VL-8B on the 7B experiment's placement (engines at 0.3 of 80 GiB): at least 10% headroom."""
    code = plan_mod.main(["+experiment=mathvista_7b", "model=qwen3_vl_8b", "model.path=bundled:configs/qwen3_vl_8b",
                          "cluster.simulate_gpus=8", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert code == 0 and p["fits"] and all(g["memory_gb"]["total"] <= 0.9 * 80 for g in p["gpus"])


def test_experiment_plan_one_of_each_role_per_gpu_and_fits(capsys):
    code, p = run_plan(capsys)
    assert code == 0 and p["fits"] and p["gradient_checkpointing"]
    assert [(g["node"], g["gpu"]) for g in p["gpus"]] == [("node0", i) for i in range(8)]
    for i, g in enumerate(p["gpus"]):
        assert sorted((a["role"], a["rank"], a["share"]) for a in g["actors"]) == [
            ("actor", i, 0.35), ("critic", i, 0.35), ("rollout", i, 0.3)]
    mem = p["gpus"][0]["memory_gb"]
    # By hand: float32 master weights sharded over 8 ranks; AdamW's two float32 moments; the reference in
    # bf16; vLLM reserves 0.25 of 80 GiB; the actor's bf16 logits and their gradient for 4 rows x 2049
    # positions x 151,936 ids, and four float32 [128, 151,936] temporaries of one scoring piece.
    assert mem["actor/weights"] == pytest.approx(4 * P_3B / 8 / GiB, abs=0.01)
    assert mem["actor/optimizer"] == pytest.approx(8 * P_3B / 8 / GiB, abs=0.01)
    assert mem["actor/reference"] == pytest.approx(2 * P_3B / 8 / GiB, abs=0.01)
    assert mem["rollout/reserved"] == 20.0
    assert mem["actor/logits"] == pytest.approx((2 * 2 * 4 * 2049 + 16 * 128) * 151936 / GiB, abs=0.01)
    # Checkpointing: 4 x 3072 tokens keep 36 block inputs (2 x 2048 B) plus one block's activations.
    per_block = 2 * (6 * 2048 + 2 * 256 + 4 * 11008)
    assert mem["actor/activations"] == pytest.approx(4 * 3072 * (36 * 2 * 2048 + per_block) / GiB, abs=0.01)
    # The root unit (embedding 151,936 x 2048, final norm, vision patch embedding 1176 x 1280 and merger
    # 5120 x 5120 + 5120 x 2048 with biases and its norm) gradient: bf16 unsharded + its float32 copy.
    root = 151936 * 2048 + 2048 + 1176 * 1280 + 1280 + 5120 * 5120 + 5120 + 5120 * 2048 + 2048
    assert mem["actor/root_grad"] == pytest.approx(6 * root / GiB, abs=0.01)
    assert mem["actor/forward_activations"] == pytest.approx(4 * 3072 * per_block / GiB, abs=0.01)
    assert mem["actor/forward_logits"] == pytest.approx((2 * 4 * 2049 + 16 * 128) * 151936 / GiB, abs=0.01)
    assert mem["actor/context"] == mem["critic/context"] == mem["rollout/context"] == 0.5
    # Sleep mode: the engine asleep (its context only) while the learners compute; awake to generate and
    # to take the weights, after the learners freed their update's memory.
    state = {r: sum(mem[f"{r}/{k}"] for k in ("context", "weights", "gradients", "optimizer", "reference")
                    if f"{r}/{k}" in mem) for r in ("actor", "critic")}
    phases = p["gpus"][0]["phases"]
    assert phases["generate"] == pytest.approx(20.5 + state["actor"] + state["critic"], abs=0.05)
    assert phases["update"] == pytest.approx(
        0.5 + state["actor"] + state["critic"] + 2 * mem["actor/gathered"] + mem["actor/activations"]
        + mem["critic/activations"] + mem["actor/vision_activations"] + mem["critic/vision_activations"]
        + mem["actor/logits"] + mem["actor/root_grad"] + mem["critic/root_grad"], abs=0.05)
    assert phases["sync"] == pytest.approx(20.5 + state["actor"] + state["critic"] + mem["actor/gathered"] + 0.25, abs=0.05)
    assert mem["total"] == pytest.approx(max(phases.values()), abs=0.01)
    assert p["gpus"][0]["peak_phase"] == max(phases, key=phases.get)


def test_without_checkpointing_or_sleep_it_does_not_fit(capsys):
    code, p = run_plan(capsys, "model.gradient_checkpointing=false", "rollout.enable_sleep_mode=false")
    assert code == 2 and not p["fits"]
    assert p["gpus"][0]["memory_gb"]["actor/activations"] > 40  # every block's activations kept
    code, p = run_plan(capsys, "cluster.gpu_memory_gb=24")
    assert code == 2 and not any(g["fits"] for g in p["gpus"])


def test_plan_needs_a_gpu_placement(capsys):
    assert plan_mod.main(["model.path=bundled:configs/qwen2_5_vl_3b"]) == 2
    assert "cluster.placement=colocate or split" in capsys.readouterr().err


def test_trainer_refuses_an_over_budget_plan_before_creating_actors(ray_cluster, tmp_path):
    from helpers import tiny_cfg
    from sapo_ray.main import run

    cfg = tiny_cfg(tmp_path, "bundled:tiny-vlm", "cluster.simulate_gpus=2", "cluster.placement=colocate",
                   "rollout.num_gpus=0.3", "actor.num_gpus=0.3", "critic.num_gpus=0.3", "cluster.gpu_memory_gb=0.001")
    with pytest.raises(RuntimeError, match=r"memory plan exceeds cluster\.gpu_memory_gb=0\.001"):
        run(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_phase_totals_follow_the_step():
    """A hand-written step on one GPU: engine awake only to generate and to sync under sleep mode, learners'
    state on the GPU outside `generate` only when offloaded, each phase's own terms on top."""
    parts = {"rollout": {"context": 0.5, "reserved": 20.0},
             "actor": {"context": 0.5, "weights": 1.0, "gradients": 1.0, "optimizer": 2.0, "reference": 0.5,
                       "gathered": 0.25, "activations": 3.0, "logits": 4.0, "root_grad": 2.0,
                       "forward_activations": 1.0, "forward_logits": 1.5, "sync_gathered": 0.5},
             "critic": {"context": 0.5, "weights": 1.0, "gradients": 1.0, "optimizer": 2.0, "gathered": 0.25,
                        "activations": 3.0, "root_grad": 1.0, "forward_activations": 1.0}}
    actor_state, critic_state = 4.5, 4.0
    assert plan_mod.phase_totals(parts, sleep=True, offload={}) == pytest.approx({
        "generate": 20.5 + 0.5 + actor_state + 0.5 + critic_state,
        "forward": 0.5 + 0.5 + actor_state + 0.25 + 1.0 + 1.5 + 0.5 + critic_state + 0.25 + 1.0,
        "update": 0.5 + 0.5 + actor_state + 0.25 + 3.0 + 4.0 + 2.0 + 0.5 + critic_state + 0.25 + 3.0 + 1.0,
        "sync": 20.5 + 0.5 + actor_state + 0.5 + 0.5 + critic_state})
    awake = plan_mod.phase_totals(parts, sleep=False, offload={"actor": True, "critic": True})
    assert awake["generate"] == pytest.approx(20.5 + 0.5 + 0.5)  # learners' state in CPU memory
    assert awake["update"] == pytest.approx(20.0 + plan_mod.phase_totals(parts, sleep=True, offload={})["update"])


def test_the_7b_experiment_fits_with_headroom(capsys):
    """Qwen2.5-VL-7B (untied lm_head) on 8 x 80 GiB with the shipped experiment: at least 10% headroom."""
    code = plan_mod.main(["+experiment=mathvista_7b", "model.path=bundled:configs/qwen2_5_vl_7b",
                          "cluster.simulate_gpus=8", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert code == 0 and p["fits"] and p["params_b"] == pytest.approx(8.292, abs=1e-3)
    assert all(g["memory_gb"]["total"] <= 0.9 * 80 for g in p["gpus"])
    assert p["gpus"][0]["memory_gb"]["rollout/reserved"] == pytest.approx(0.3 * 80)


def test_vision_tower_activations_by_hand():
    """3B's tower: 32 blocks of width 1280 (MLP 3420), 14 px patches merged 2 x 2 into an image token. The
    experiment's 4-row micro-batch of one 768-token image each (602112 px) is 4 x 3072 patches. With
    checkpointing the tower keeps each block's input (2 x 1280 bytes a patch) and one block's
    2 x (8 x 1280 + 4 x 3420) bytes a patch; without, every block's; frozen, one block's at a time.
    Unset `data.max_pixels` leaves the prompt's length as the bound (1024 tokens: 4096 patches a row)."""
    from sapo_ray.config import compose_config

    shape = plan_mod.model_shape("bundled:configs/qwen2_5_vl_3b")
    assert (shape.vision_layers, shape.vision_hidden, shape.vision_intermediate, shape.patch_size,
            shape.merge_size) == (32, 1280, 3420, 14, 2)
    cfg = compose_config(*EXPERIMENT)
    assert plan_mod.vision_patches(shape, cfg, 4) == 12288
    block = 12288 * 2 * (8 * 1280 + 4 * 3420)
    assert plan_mod.vision_activation_bytes(shape, 12288, checkpointing=True, trained=True) == 12288 * 32 * 2 * 1280 + block
    assert plan_mod.vision_activation_bytes(shape, 12288, checkpointing=False, trained=True) == 32 * block
    assert plan_mod.vision_activation_bytes(shape, 12288, checkpointing=True, trained=False) == block
    assert plan_mod.vision_patches(shape, compose_config(*EXPERIMENT, "data.max_pixels=null"), 4) == 4 * 4096
    terms = plan_mod.learner_memory(shape, cfg, "critic", with_ref=False)
    assert terms["vision_activations"] * GiB == pytest.approx(12288 * 32 * 2 * 1280 + block)
    assert terms["forward_vision"] * GiB == pytest.approx(block)


def test_video_patches_by_hand():
    """A video of `data.max_frames` 16 frames is 8 temporal patches; at `data.video_max_pixels` 100352 px a
    frame pair is 100352 / 14^2 = 512 patches, so 4096 a video (1024 tokens); the experiment's image adds its
    3072; a row never holds more than `data.max_prompt_length` 1024 tokens (4096 patches): 2048 tokens of
    prompt hold both. Without a frame budget, the image budget (602112 px: 3072 patches a frame pair)."""
    from sapo_ray.config import compose_config

    shape = plan_mod.model_shape("bundled:configs/qwen2_5_vl_3b")
    video = ["rollout.videos_per_prompt=1", "data.max_frames=16", "data.video_max_pixels=100352"]
    assert plan_mod.vision_patches(shape, compose_config(*EXPERIMENT, *video, "data.max_prompt_length=2048"), 2) \
        == 2 * (3072 + 4096)
    assert plan_mod.vision_patches(shape, compose_config(*EXPERIMENT, *video), 2) == 2 * 4096
    assert plan_mod.vision_patches(shape, compose_config(*EXPERIMENT, *video[:2], "data.max_prompt_length=65536"), 1) \
        == 3072 + 8 * 3072


def test_the_packed_layout_adds_one_copy_of_the_logits():
    """`layout=packed` gathers the rows' logits out of the packed sequence: micro-batch 4 x 2049 positions
    x 151936 entries in bf16 more, in the update and in the no-grad forward."""
    from sapo_ray.config import compose_config

    shape = plan_mod.model_shape("bundled:configs/qwen2_5_vl_3b")
    padded = plan_mod.learner_memory(shape, compose_config(*EXPERIMENT), "actor", with_ref=False)
    packed = plan_mod.learner_memory(shape, compose_config(*EXPERIMENT, "actor.layout=packed"), "actor", with_ref=False)
    copy = 2 * 4 * 2049 * 151936 / GiB
    assert packed["logits"] - padded["logits"] == pytest.approx(copy)
    assert packed["forward_logits"] - padded["forward_logits"] == pytest.approx(copy)


def test_lora_adapters_and_what_they_save_by_hand(capsys):
    """Rank-64 adapters on the language model's 7 projections: per layer 64 x (in + out) summed over q (2048 ->
    2048), k and v (2048 -> 256), o (2048 -> 2048), gate and up (2048 -> 11008), down (11008 -> 2048), i.e.
    64 x (9 x 2048 + 2 x 256 + 3 x 11008), times 36 layers. The actor then holds gradients and AdamW moments for
    those alone, the frozen base in bf16 (`model.dtype`), float32 adapters, and no reference copy."""
    from sapo_ray.config import LoraConfig, compose_config

    adapters = plan_mod.adapter_params("bundled:configs/qwen2_5_vl_3b", LoraConfig(rank=64))
    assert adapters == 64 * 36 * (9 * 2048 + 2 * 256 + 3 * 11008) == 119_734_272
    shape = plan_mod.model_shape("bundled:configs/qwen2_5_vl_3b")
    cfg = compose_config(*EXPERIMENT, "actor.lora.rank=64")
    full = plan_mod.learner_memory(shape, cfg, "actor", with_ref=True)
    lora = plan_mod.learner_memory(shape, cfg, "actor", with_ref=True, adapters=adapters)
    world = cfg.actor.world_size
    assert lora["gradients"] * GiB == pytest.approx(4 * adapters / world)
    assert lora["optimizer"] * GiB == pytest.approx(8 * adapters / world)
    assert cfg.model.dtype == "bfloat16"
    assert lora["weights"] * GiB == pytest.approx((2 * P_3B + 4 * adapters) / world)
    assert "reference" in full and "reference" not in lora
    code, p = run_plan(capsys, "actor.lora.rank=64")
    assert code == 0 and p["lora_params_m"] == 119.73
