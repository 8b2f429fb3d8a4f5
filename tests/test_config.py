"""Configuration: algorithm YAMLs agree with the registry; user mistakes fail fast, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sapo_ray.algo.registry import ALGORITHMS, SEGMENTERS, make_segments, missing_segment_options
from sapo_ray.config import ConfigError, algorithm_spec, compose_config as compose_cfg, register_configs
from sapo_ray.config_checks import validate

ROOT = Path(__file__).resolve().parents[1]


# What the root config sets for every algorithm (the demo's critic warm-up).
ROOT_ALGORITHM = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["algorithm"]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_option_equals_registered_spec(name):
    cfg = compose_cfg(f"algorithm={name}")
    assert algorithm_spec(cfg) == ALGORITHMS[name].replace(**ROOT_ALGORITHM)
    assert ROOT_ALGORITHM == {"critic_warmup": 5}


def test_every_registered_algorithm_is_an_option_and_nothing_restates_them():
    from hydra.core.config_store import ConfigStore

    register_configs()
    options = {name.removesuffix(".yaml") for name in ConfigStore.instance().list("algorithm")}
    assert options == set(ALGORITHMS) | {"base_algorithm"}
    assert not (ROOT / "conf" / "algorithm").exists()  # the presets are the one source of every value


def test_default_config_is_valid_and_overrides_apply():
    cfg = compose_cfg("algorithm=grpo", "algorithm.clip_high=0.3", "rollout.n=4")
    validate(cfg)
    spec = algorithm_spec(cfg)
    assert (spec.name, spec.clip_high, spec.ratio_level) == ("grpo", 0.3, "token")


@pytest.mark.parametrize("overrides, key", [
    (["algorithm=grpo", "rollout.n=1"], "rollout.n"),
    (["algorithm.ratio_level=segmnt"], "algorithm.ratio_level"),
    (["algorithm.frac=0"], "algorithm.frac"),
    (["actor.world_size=3"], "actor.world_size"),
    (["rollout.num_workers=99"], "rollout.num_workers"),
    (["algorithm=dapo", "algorithm.overlong_buffer_len=512"], "algorithm.overlong_buffer_len"),
    (["algorithm.critic_warmup=-1"], "algorithm.critic_warmup"),
    (["rollout.weight_sync=nccl"], "rollout.weight_sync"),
    (["rollout.weight_sync=broadcast", "actor.num_gpus=1"], "rollout.weight_sync=broadcast"),
    (["rollout.weight_sync=broadcast", "actor.num_gpus=1", "rollout.num_gpus=0.5"], "whole GPUs"),
    (["rollout.enable_sleep_mode=true"], "rollout.enable_sleep_mode"),
    (["+experiment=mathvista", "rollout.gpu_memory_utilization=0.5"], "rollout.gpu_memory_utilization=0.5"),
    (["+experiment=mathvista", "rollout.num_gpus=0.5"], "GPU 0 would hold"),
    (["cluster.placement=spread"], "cluster.placement"),
    (["data.max_pixels=0"], "data.max_pixels"),
    (["data.min_pixels=50000", "data.max_pixels=40000"], "data.min_pixels=50000 must be <= data.max_pixels=40000"),
    (["rollout.engine=vllm", "actor.recompute_old_logp=true", "rollout.images_per_prompt=0"], "rollout.images_per_prompt"),
    (["rollout.engine=vllm", "actor.recompute_old_logp=true", "data=synthvista_clip"],
     r"rollout.videos_per_prompt=1: rollout.engine=vllm does not take videos \(hf do\)"),
    (["rollout.videos_per_prompt=-1"], "rollout.videos_per_prompt"),
    (["data.video_fps=0"], "data.video_fps"),
    (["data.max_frames=0"], "data.max_frames"),
    (["data.video_max_pixels=0"], "data.video_max_pixels"),
    (["data=custom"], "data.train=custom needs data.train_path"),
    (["data=custom", "data.train_path=x.jsonl"], "data.val=custom needs data.val_path"),
    (["data.val=mine"], "data.val='mine' is not a known dataset"),
    (["reward.batch=true"], "reward.batch=true needs reward.custom"),
    (["reward.max_error_rate=2"], "reward.max_error_rate"),
    (["reward.tool_error_penalty=-0.1", "env.name=tools"], "reward.tool_error_penalty=-0.1 must be >= 0"),
    (["reward.tool_error_penalty=0.1"], "reward.tool_error_penalty needs episodes with tools"),
    (["trainer.max_ckpt_to_keep=-1"], "trainer.max_ckpt_to_keep"),
    (["critic.layout=unpadded"], "critic.layout='unpadded' is not one of"),
    (["algorithm.segmenter=low_prob"], "algorithm.segment_options.rho=..."),
    (["algorithm.segmenter=fixed"], "algorithm.segment_options.n=..."),
])
def test_invalid_combinations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(*overrides))


def _main(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    # Hydra's output dir goes to a temporary place, not the repository's outputs/.
    args = ("hydra.run.dir=${oc.env:TMPDIR,/tmp}/sapo_ray_test_outputs/${now:%H-%M-%S-%f}", *args)
    return subprocess.run([sys.executable, "-m", "sapo_ray.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_typo_in_a_key_fails_before_ray_starts():
    out = _main("algorithm.clip_hgh=0.3")
    assert out.returncode != 0
    assert "clip_hgh" in out.stderr and "Ray" not in out.stdout


def test_mathvista_experiment_prints_config_and_fails_fast_without_model(tmp_path):
    shown = _main("+experiment=mathvista", "--cfg", "job")
    assert shown.returncode == 0
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["data"]["train"] == "geometry3k" and cfg["data"]["val"] == "mathvista"
    assert cfg["algorithm"]["name"] == "sapo" and cfg["actor"]["world_size"] == 8
    missing = _main("+experiment=mathvista", f"model.path={tmp_path / 'nope'}")
    assert missing.returncode == 2
    assert "model.path" in missing.stderr + missing.stdout


def test_mathvista_experiment_names_missing_data_then_gpus(random_tiny_models, tmp_path):
    model = random_tiny_models["vlm"]
    no_data = _main("+experiment=mathvista", f"model.path={model}", f"data.train_path={tmp_path / 'geo'}")
    assert no_data.returncode == 2 and "data.train_path" in no_data.stderr + no_data.stdout
    (tmp_path / "geo").mkdir()
    (tmp_path / "mv").mkdir()
    no_gpu = _main("+experiment=mathvista", f"model.path={model}", f"data.train_path={tmp_path / 'geo'}",
                   f"data.val_path={tmp_path / 'mv'}")
    assert no_gpu.returncode == 2 and "GPU" in no_gpu.stderr + no_gpu.stdout


def test_mathvista_is_refused_as_training_data():
    with pytest.raises(ConfigError, match="data.train.*training is prohibited"):
        validate(compose_cfg("data.train=mathvista"))


def test_freezing_the_vision_tower_of_a_text_model_fails_before_ray_starts():
    from sapo_ray.main import check_environment

    check_environment(compose_cfg("actor.freeze_vision_tower=true"))  # the bundled VLM has one
    with pytest.raises(ConfigError, match=r"actor\.freeze_vision_tower=true.*text-only"):
        check_environment(compose_cfg("model=tiny_lm", "actor.freeze_vision_tower=true"))


def test_each_role_schedules_over_its_own_optimizer_steps():
    """The demo's critic takes two optimizer steps per training step (mini-batch 32 of 64 rows), the actor
    one, after the critic's warm-up: with `optim.schedule=cosine` both learning rates follow one cosine over
    the run's updating steps, instead of the critic's reaching 0 halfway (a schedule sized for the actor)."""
    from sapo_ray.config import optimizer_steps
    from sapo_ray.learner.worker import lr_lambda

    cfg = compose_cfg("actor.optim.schedule=cosine", "critic.optim.schedule=cosine", "algorithm.critic_warmup=0",
                      "trainer.steps=40")
    assert (cfg.trainer.steps, cfg.data.prompts_per_step * cfg.rollout.n) == (40, 64)
    assert (cfg.actor.mini_batch_size, cfg.critic.mini_batch_size) == (64, 32)
    assert optimizer_steps(cfg, "actor") == 40 and optimizer_steps(cfg, "critic") == 80
    actor, critic = lr_lambda(0, 40, "cosine"), lr_lambda(0, 80, "cosine")
    for step in range(40):  # after training step `step`: the actor took step + 1 steps, the critic 2 (step + 1)
        assert critic(2 * (step + 1)) == pytest.approx(actor(step + 1), abs=1e-12)
    assert actor(20) == pytest.approx(0.5) and critic(40) == pytest.approx(0.5)  # halfway: half the lr, not 0
    # With a warm-up the actor updates only after it: 35 steps; the critic still updates at every step.
    cfg = compose_cfg("algorithm.critic_warmup=5", "trainer.steps=40")
    assert optimizer_steps(cfg, "actor") == 35 and optimizer_steps(cfg, "critic") == 80
    assert optimizer_steps(compose_cfg("algorithm=grpo", "algorithm.critic_warmup=5", "trainer.steps=40"),
                           "actor") == 40  # no critic


def test_validation_reads_the_registries():
    """A newly registered engine, policy loss or estimator is a valid config value at once; unknown ones
    fail naming the key and listing the registered names."""
    from sapo_ray.algo import losses
    from sapo_ray.rollout.engine import ENGINES

    with pytest.raises(ConfigError, match=r"rollout\.engine='mine'.*hf"):
        validate(compose_cfg("rollout.engine=mine"))
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss='mine'.*clipped"):
        validate(compose_cfg("algorithm.policy_loss=mine"))
    ENGINES["mine"] = ENGINES["hf"]
    losses.POLICY_LOSSES["mine"] = losses.POLICY_LOSSES["clipped"]
    try:
        validate(compose_cfg("rollout.engine=mine", "algorithm.policy_loss=mine"))
    finally:
        del ENGINES["mine"], losses.POLICY_LOSSES["mine"]


def test_validation_asks_the_engines_traits_not_their_names():
    """An engine registered without entropies needs the recomputed old log-probs; one that does not compute
    with the learner's kernels brings the precision warning to GSPO's tight clip, as vLLM does."""
    from sapo_ray.config_checks import precision_warnings
    from sapo_ray.rollout.engine import ENGINES, EngineTraits, RegisteredEngine

    ENGINES["mine"] = RegisteredEngine(ENGINES["hf"].build, EngineTraits(entropies=False))
    try:
        with pytest.raises(ConfigError, match="rollout.engine=mine returns no per-token entropies"):
            validate(compose_cfg("rollout.engine=mine"))
        validate(compose_cfg("rollout.engine=mine", "actor.recompute_old_logp=true"))
        gspo = ("algorithm=gspo", "actor.autocast_bf16=false")
        assert precision_warnings(compose_cfg(*gspo)) == []
        assert "actor.recompute_old_logp=true" in precision_warnings(compose_cfg(*gspo, "rollout.engine=mine"))[0]
        # An engine of another name that computes with the learner's kernels, as hf does: no warning.
        ENGINES["twin"] = RegisteredEngine(ENGINES["hf"].build, EngineTraits(learner_kernels=True))
        assert precision_warnings(compose_cfg(*gspo, "rollout.engine=twin")) == []
    finally:
        del ENGINES["mine"]
        ENGINES.pop("twin", None)


def test_dapo_overlong_buffer_adapts_to_the_length_limit():
    """DAPO's preset leaves the buffer to the length limit (a fifth of it); an explicit one is checked."""
    cfg = compose_cfg("algorithm=dapo", "rollout.max_new_tokens=96")
    validate(cfg)
    assert algorithm_spec(cfg).overlong_buffer(96) == 19
    validate(compose_cfg("algorithm=dapo", "algorithm.overlong_buffer_len=96", "rollout.max_new_tokens=96"))


@pytest.mark.parametrize("segmenter", sorted(SEGMENTERS))
def test_segmenter_options_are_checked_before_the_first_step(segmenter):
    """Validation refuses a segmenter exactly when segmenting a batch with its options would fail for a
    missing argument, and names what to add."""
    spec = algorithm_spec(compose_cfg("algorithm=sapo", f"algorithm.segmenter={segmenter}"))
    T = 6
    inputs = dict(entropy=torch.rand(2, T), logprobs=-torch.rand(2, T), token_texts=[["Step 1", "\n"] * 3] * 2)
    try:
        make_segments(spec, torch.ones(2, T), **inputs)
        fails = None
    except TypeError as e:
        fails = str(e)
    missing = missing_segment_options(spec)
    assert bool(missing) == bool(fails), (missing, fails)
    for name in missing:
        assert repr(name) in fails
    given = {"n": 2, "rho": 0.5}
    spec.segment_options = {name: given[name] for name in missing}
    assert missing_segment_options(spec) == []
    make_segments(spec, torch.ones(2, T), **inputs)


def test_a_clip_range_inside_the_precision_gap_is_warned(caplog):
    """GSPO's 3e-4 / 4e-4 clip against the engine's float32 log-probs while the learner computes in bf16
    (the demo's speed settings) is warned; with the learner's own old log-probs, or token-level clip
    ranges, it is not."""
    with caplog.at_level("WARNING", logger="sapo_ray.config"):
        validate(compose_cfg("algorithm=gspo", "actor.autocast_bf16=true"))
    assert "actor.recompute_old_logp=true" in caplog.text and "'gspo'" in caplog.text
    for overrides in (["algorithm=gspo", "actor.autocast_bf16=true", "actor.recompute_old_logp=true"],
                      ["algorithm=gspo", "actor.autocast_bf16=false"], ["algorithm=sapo"], ["algorithm=grpo"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="sapo_ray.config"):
            validate(compose_cfg(*overrides))
        assert caplog.text == "", overrides


def test_packed_rows_without_variable_length_kernels_are_warned(caplog):
    with caplog.at_level("WARNING", logger="sapo_ray.config"):
        validate(compose_cfg("actor.layout=packed"))
    assert "actor.layout=packed with model.attn_implementation=sdpa_gqa" in caplog.text and "critic" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sapo_ray.config"):
        validate(compose_cfg("actor.layout=packed", "model.attn_implementation=flash_attention_2"))
    assert "layout=packed" not in caplog.text


def test_flash_attention_without_its_package_fails_before_ray():
    import importlib.util

    from sapo_ray.main import check_environment

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="needs the flash-attn package.*pip install flash-attn"):
        check_environment(compose_cfg("model.attn_implementation=flash_attention_2"))
