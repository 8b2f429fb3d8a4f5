"""The start-up block says what a run will do, on what, in which precision, from where."""

from __future__ import annotations

from sapo_ray import startup
from sapo_ray.config import compose_config
from sapo_ray.precision import Decision


def block(cfg, **kw) -> str:
    args = dict(model="bundled:tiny-vlm", params=7_012_345, architecture="Qwen2_5_VLForConditionalGeneration",
                data={"train": "synthvista: 4096 of 4096 rows used; skipped: none",
                      "val": "custom: 120 of 128 rows used; skipped: 8 missing image"},
                machine="CPU: Some CPU, 2 cores (AVX2 kernels); torch 2.13.0", precision="p", placement="here",
                run_dir="/runs/x", resumed_from=None, step=0)
    return startup.summary(cfg, **{**args, **kw})


def test_the_block_names_what_will_happen():
    cfg = compose_config("algorithm=grpo", "trainer.steps=40", "trainer.val_every=10", "trainer.save_every=0")
    text = block(cfg)
    assert "bundled:tiny-vlm (Qwen2_5_VLForConditionalGeneration, 7.0M parameters)" in text
    assert "grpo: group advantages" in text and "skipped: 8 missing image" in text
    assert "AVX2 kernels" in text and "/runs/x" in text and "starting a fresh run (trainer.resume=auto)" in text
    assert "40 steps of 16 prompts x 4 samples; validation every 10 steps, a checkpoint at the end" in text
    again = block(cfg, resumed_from="/runs/x/checkpoints/step_000020", step=20)
    assert "continuing from checkpoint /runs/x/checkpoints/step_000020 (step 20 of 40)" in again


def test_the_precision_line_gives_each_role_and_the_reason():
    cfg = compose_config("actor.autocast_bf16=false", "critic.autocast_bf16=false")
    why = Decision(False, "auto: bf16 matmuls 35.5x slower than float32 on this CPU, 118.71 vs 3.34 ms")
    line = startup.precision_line(cfg, {"actor": why, "critic": why}, needs_critic=True)
    assert line == f"actor and critic: float32 ({why.reason}); engines: float32"
    cfg = compose_config("actor.autocast_bf16=true", "critic.autocast_bf16=false", "actor.num_gpus=1",
                         "model.dtype=bfloat16")
    line = startup.precision_line(cfg, None, needs_critic=True)
    assert line.startswith("actor: bfloat16 compute over float32 masters (FSDP2 mixed precision); critic: bfloat16")
    assert line.endswith("engines: bfloat16")


def test_the_placement_line_names_each_role_or_each_bundle():
    from sapo_ray import placement

    cfg = compose_config()
    assert startup.placement_line(cfg, None, needs_critic=True) == (
        "Ray places each actor by its request: rollout 1 x (0.5 CPU, 0 GPU), actor 1 x (0.5 CPU, 0 GPU), "
        "critic 1 x (0.5 CPU, 0 GPU)")
    cfg = compose_config("cluster.simulate_gpus=2", "cluster.placement=colocate", "rollout.num_workers=2",
                         "rollout.num_gpus=0.3", "actor.world_size=2", "actor.num_gpus=0.3", "critic.world_size=2",
                         "critic.num_gpus=0.3")
    line = startup.placement_line(cfg, placement.plan(cfg, True), needs_critic=True)
    assert line.startswith("cluster.placement=colocate: bundle 0 ") and "; bundle 1 " in line
    assert line.count("actor ") == 2 and line.count("rollout ") == 2 and line.count("critic ") == 2
