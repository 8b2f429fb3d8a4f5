"""The vLLM rollout engine against the hf engine on the bundled tiny text model (run in .venv-vllm).

`make test` runs this module a second time in `.venv-vllm` (the CPU build of vLLM); in `.venv` only the
missing-package and TIS tests run and the rest skip. Tolerance measured on this CPU in float32 (16
prompts, 64 tokens): vllm's log-probs differ from the hf engine's / the learner's by at most 4.7e-6
greedy, 8.3e-6 at T=1 and 9.3e-6 at T=0.7 (means 3-5e-7). With top_p < 1 they differ by up to 0.1
(vLLM returns the renormalised nucleus's log-probs; see sapo_ray/rollout/vllm_engine.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_OVERRIDES, rollout_cfg
from sapo_ray.config import ConfigError, compose_config, resolve_model_path
from sapo_ray.config_checks import validate
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.batch import Prompt, SamplingParams
from sapo_ray.rollout.engine import HFEngine, build_engine, encode_prompt
from sapo_ray.utils import bucket_tensors

pytestmark = pytest.mark.vllm
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed here (it runs in .venv-vllm: make .venv-vllm)")

PATH = resolve_model_path("bundled:tiny-lm")
ENGINE_CFG = rollout_cfg(PATH, max_batch_size=64, enforce_eager=True)
VLLM_CFG = rollout_cfg(PATH, engine="vllm", max_batch_size=64, enforce_eager=True)
LOGP_ATOL = 5e-5  # ~5x the largest hf/vllm difference measured here (9.3e-6)


def text_prompts(n: int = 8, seed: int = 0) -> list[Prompt]:
    from sapo_ray.models import load_processor

    processor = load_processor(PATH)
    examples = load_dataset_split("synthvista", None, "train", n=n, seed=seed, text_only=True)
    return [encode_prompt(processor, e) for e in examples]


def tiny_cfg(run_dir: Path, *overrides: str):
    return compose_config(
        "model=tiny_lm", "rollout.engine=vllm", "rollout.enforce_eager=true", "actor.recompute_old_logp=true",
        f"trainer.run_dir={run_dir}", "trainer.steps=2", "trainer.export_hf=false", *TINY_OVERRIDES,
        "rollout.max_new_tokens=16",
        # float32 learners (the log-prob checks compare with the engine's float32 weights) and the
        # hinted queries tiny-lm was trained on.
        "actor.autocast_bf16=false", "critic.autocast_bf16=false", "data.hint=true",
        *overrides)


def test_missing_vllm_names_the_extra(monkeypatch, tmp_path):
    """Without the package, both config validation and engine construction say what to install."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, find_spec is None
    monkeypatch.delitem(sys.modules, "sapo_ray.rollout.vllm_engine", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'sapo-ray\[vllm\]'.*make \.venv-vllm"):
        build_engine(VLLM_CFG)
    from sapo_ray.main import check_environment

    validate(tiny_cfg(tmp_path))  # the config itself is fine; the machine lacks the package
    with pytest.raises(ConfigError, match=r"sapo-ray\[vllm\]"):
        check_environment(tiny_cfg(tmp_path))


@needs_vllm
def test_config_requires_learner_entropies(tmp_path):
    validate(tiny_cfg(tmp_path))
    with pytest.raises(ConfigError, match="actor.recompute_old_logp=true"):
        validate(tiny_cfg(tmp_path, "actor.recompute_old_logp=false"))


@pytest.fixture(scope="module")
def engines():
    """The hf engine, and a rollout worker holding the module's one vLLM engine (one `LLM` per process)."""
    from sapo_ray.rollout.worker import RolloutWorker

    if not HAS_VLLM:
        pytest.skip("vllm is not installed")
    worker = RolloutWorker(VLLM_CFG)  # the actor's class, in this process
    return HFEngine.from_config(ENGINE_CFG), worker


def _compare(hf_samples, vllm_samples) -> float:
    """Assert identical responses; return the largest per-token log-prob difference."""
    assert len(hf_samples) == len(vllm_samples)
    worst = 0.0
    for a, b in zip(hf_samples, vllm_samples):
        assert a.response_ids == b.response_ids, (a.text, b.text)
        assert (a.finished, a.prompt_index, a.text) == (b.finished, b.prompt_index, b.text)
        worst = max(worst, max(abs(x - y) for x, y in zip(a.rollout_logp, b.rollout_logp)))
    return worst


@needs_vllm
def test_greedy_parity_with_hf_engine(engines):
    hf, vllm = engines[0], engines[1].engine
    prompts = text_prompts(8)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=64)
    a, b = hf.generate(prompts, params), vllm.generate(prompts, params)
    assert sum(len(s.response_ids) for s in a) > 8 * 20  # real responses, not one token each
    assert any(s.finished for s in b)
    assert _compare(a, b) < LOGP_ATOL
    assert all(math.isnan(e) for s in b for e in s.rollout_entropy)  # vLLM returns no entropies


@needs_vllm
def test_episodes_continue_from_their_own_ids_on_both_engines(engines):
    """Greedy episodes of three turns with observations between: vLLM takes each continuation as token ids
    (nothing re-tokenized), so its episodes are the hf engine's, token for token, and each holds exactly the
    ids the engine sampled or was given."""
    from sapo_ray.rollout.episodes import EpisodeLimits, run_episodes
    from tests.rollout.test_episodes import OBSERVATION, Scripted

    hf, vllm = engines[0], engines[1].engine
    prompts = text_prompts(4)
    examples = load_dataset_split("synthvista", None, "train", n=4, seed=0, text_only=True)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=64)
    limits = EpisodeLimits(max_turns=3, max_tokens=400)
    given = []

    def recorded(prompts, params):
        given.append([list(p.ids) for p in prompts])
        return vllm.generate(prompts, params)

    a = run_episodes(hf.generate, hf.tokenizer, prompts, examples, params, Scripted, limits)
    b = run_episodes(recorded, vllm.tokenizer, prompts, examples, params, Scripted, limits)
    assert max(s.episode.turns for s in b) > 1
    observation = vllm.tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    for x, y in zip(a, b):
        assert (x.response_ids, x.observation_mask) == (y.response_ids, y.observation_mask)
        assert max(abs(p - q) for p, q in zip(x.rollout_logp, y.rollout_logp)) < LOGP_ATOL
        # every later turn started from the prompt and the episode's ids so far, observation included
        ends = [t + 1 for t in range(len(y.observation_mask) - 1)
                if y.observation_mask[t] and not y.observation_mask[t + 1]]
        for end in ends:
            prefix = y.prompt_ids + y.response_ids[:end]
            assert any(prefix == ids for call in given[1:] for ids in call)
            assert y.response_ids[end - len(observation):end] == observation


@needs_vllm
def test_sampled_logp_is_the_learner_distribution(engines):
    """At T != 1 the returned log-probs are log softmax(logits / T) with banned ids masked, as the learner's.

    64 seeded requests whose prompts (> 4096 tokens together) take more than one engine step to prefill:
    the case that crashed vLLM's CPU build with chunked prefill on.
    """
    from sapo_ray.batch import Batch
    from sapo_ray.learner.forward import policy_forward

    hf, vllm = engines[0], engines[1].engine
    prompts = text_prompts(16, seed=1)
    assert 4 * sum(len(p.ids) for p in prompts) > 4096
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=24, seed=5)
    samples = vllm.generate(prompts, params)
    assert len(samples) == 64 and [s.prompt_index for s in samples[:8]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({tuple(s.response_ids) for s in samples[:4]}) > 1  # n responses per prompt, each its own seed
    assert [s.response_ids for s in vllm.generate(prompts, params)] == [s.response_ids for s in samples]  # seeded
    banned = set(hf.banned.tolist())
    assert not any(t in banned for s in samples for t in s.response_ids)
    batch = Batch.from_samples(samples, hf.pad_id)
    with torch.no_grad():
        logp, _ = policy_forward(hf.model, batch, 0.7, hf.banned, None, with_entropy=False)
    mask = batch.response_mask.bool()
    assert float((logp - batch.rollout_logp).abs()[mask].max()) < LOGP_ATOL



@needs_vllm
def test_weight_sync_changes_outputs_like_hf(engines, ray_cluster):
    """Perturbed weights through the rollout worker's sync path: vllm then decodes exactly as hf with them."""
    import ray

    hf, worker = engines
    vllm = worker.engine
    # Three chats per prompt: longer than one KV block (128 tokens), so the prefix cache holds the old
    # weights' blocks for them and must be dropped by the sync.
    short = text_prompts(24, seed=2)
    prompts = [Prompt(a.ids + b.ids + c.ids) for a, b, c in zip(short[0::3], short[1::3], short[2::3])]
    assert min(len(p.ids) for p in prompts) > 128
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=32)
    before = vllm.generate(prompts, params)

    gen = torch.Generator().manual_seed(0)
    unperturbed = {k: v.clone() for k, v in hf.model.state_dict().items()}
    perturbed = {}  # by storage: tied tensors (the embedding and the LM head) stay tied, as a learner sends them
    state = {k: perturbed.setdefault(v.data_ptr(), v + 0.1 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=gen))
             for k, v in hf.model.state_dict().items()}
    buckets = bucket_tensors(state, 256 * 1024)
    assert len(buckets) > 3
    nbytes, seconds = worker.update_weights([ray.put(b) for b in buckets])
    assert nbytes == sum(t.numel() * t.element_size() for t in state.values())
    hf.update_weights([item for b in buckets for item in b])

    after_hf, after = hf.generate(prompts, params), vllm.generate(prompts, params)
    assert _compare(after_hf, after) < LOGP_ATOL
    changed = sum(x.response_ids != y.response_ids for x, y in zip(before, after))
    assert changed >= 4, f"the update changed only {changed}/{len(prompts)} greedy responses"

    # The sync's check (`sapo_ray.sync.check_fingerprints`): both engines hold what was sent; a load that
    # leaves a tensor out, loads a stale one, or loads one under another tensor's name is caught by name.
    from sapo_ray.errors import StopRun
    from sapo_ray.sync import check_fingerprints, fingerprints

    sent = fingerprints(state.items())
    check_fingerprints(sent, worker.weight_fingerprints(), "vllm")
    check_fingerprints(sent, hf.weight_fingerprints(), "hf")
    names = list(state)
    skipped = names[0]
    worker.update_weights([ray.put([(n, t) for n, t in b if n != skipped]) for b in buckets])
    with pytest.raises(StopRun, match=f"vllm does not hold '{skipped}'"):
        check_fingerprints(sent, worker.weight_fingerprints(), "vllm")
    # Stale: one projection as it was before the perturbation.
    stale = next(n for n in names if n.endswith("q_proj.weight"))
    old = unperturbed[stale]
    worker.update_weights([ray.put([(n, old if n == stale else t) for n, t in b]) for b in buckets])
    with pytest.raises(StopRun, match=f"vllm holds another '{stale}'"):
        check_fingerprints(sent, worker.weight_fingerprints(), "vllm")
    # Misnamed: two layers' projections of one shape swapped.
    first = next(n for n in names if n.endswith("o_proj.weight"))
    second = next(n for n in names if n.endswith("o_proj.weight") and n != first)
    swap = {first: second, second: first}
    worker.update_weights([ray.put([(swap.get(n, n), t) for n, t in b]) for b in buckets])
    with pytest.raises(StopRun, match="vllm holds another '.*o_proj.weight'"):
        check_fingerprints(sent, worker.weight_fingerprints(), "vllm")


@needs_vllm
def test_weight_payload_survives_vllms_msgpack_path():
    """What a worker receives when vLLM's engine runs in a process of its own: `collective_rpc`'s arguments
    through vLLM's encoder and the engine core's untyped decoder (vllm/v1/serial_utils.py, `generic_decoder` in
    vllm/v1/engine/core.py). A bare tensor arrives as a list; the payload arrives bit for bit."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from sapo_ray.sync import decode_bucket, encode_bucket

    def through(obj):
        return MsgpackDecoder().decode(MsgpackEncoder().encode(obj))

    gen = torch.Generator().manual_seed(0)
    bucket = [("w", torch.randn(64, 32, generator=gen)), ("w_t", torch.randn(16, 8, generator=gen).t()),
              ("b", torch.randn(300, generator=gen).to(torch.bfloat16)), ("step", torch.tensor(3))]
    (name, arrived), = through([bucket[0]])
    assert name == "w" and isinstance(arrived, list) and arrived[:2] == ["float32", [64, 32]]
    decoded = decode_bucket(through(encode_bucket(bucket)))
    for (n, a), (m, b) in zip(bucket, decoded, strict=True):
        assert (m, b.dtype, b.shape) == (n, a.dtype, a.shape)
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@needs_vllm
def test_multimodal_args_carry_the_learners_pixel_budget():
    """A vision-language model's engine gets the image limit and the pixel budget the learner's processor resolved
    (both bounds, the checkpoint's min filled in); a text model gets neither."""
    from sapo_ray.models import load_processor
    from sapo_ray.rollout.vllm_engine import multimodal_args

    vlm = load_processor(resolve_model_path("bundled:tiny-vlm"), max_pixels=6272)
    assert multimodal_args(vlm, 2) == {"limit_mm_per_prompt": {"image": 2, "video": 0},
                                       "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 6272}}
    assert multimodal_args(load_processor(PATH), 1) == {}


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_weight_sync_through_the_multiprocessing_engine(engines, ray_cluster):
    """vLLM's default (and what it runs on GPUs): its engine in a process of its own, VLLM_ENABLE_V1_MULTIPROCESSING=1,
    where `collective_rpc`'s arguments cross msgpack. A rollout actor with such an engine takes the same buckets as
    this module's in-process engine and then generates exactly what it does."""
    import ray

    from sapo_ray.models import load_policy
    from sapo_ray.rollout.worker import RolloutWorker

    local = engines[1]
    remote = ray.remote(RolloutWorker).options(
        num_cpus=0.5, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}).remote(VLLM_CFG)
    try:
        short = text_prompts(24, seed=3)
        prompts = [Prompt(a.ids + b.ids + c.ids) for a, b, c in zip(short[0::3], short[1::3], short[2::3])]
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=32)
        before = ray.get(remote.generate.remote(prompts, params))

        gen = torch.Generator().manual_seed(1)
        state = {k: v + 0.1 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=gen)
                 for k, v in load_policy(PATH).state_dict().items()}
        refs = [ray.put(b) for b in bucket_tensors(state, 256 * 1024)]
        (remote_bytes, _), (local_bytes, _) = ray.get(remote.update_weights.remote(refs)), local.update_weights(refs)
        assert remote_bytes == local_bytes == sum(t.numel() * t.element_size() for t in state.values())

        after, expected = ray.get(remote.generate.remote(prompts, params)), local.generate(prompts, params)
        assert [s.response_ids for s in after] == [s.response_ids for s in expected]
        assert max(abs(x - y) for a, b in zip(after, expected) for x, y in zip(a.rollout_logp, b.rollout_logp)) < 1e-6
        changed = sum(x.response_ids != y.response_ids for x, y in zip(before, after))
        assert changed >= 4, f"the update changed only {changed}/{len(prompts)} greedy responses"
    finally:
        ray.kill(remote)


@needs_vllm
@pytest.mark.gpu
@pytest.mark.parametrize("max_pixels", [None, 6272], ids=["checkpoint-budget", "max_pixels-6272"])
def test_vllm_image_processor_matches_the_learners(max_pixels):
    """vLLM runs Qwen2.5-VL's image processor itself (the engine hands it raw images); given the same pixel budget it
    must give the learner's pixel values, grid and image-token count. GPU only: vLLM's Qwen2-VL module imports
    transformers' torchvision image processor, and torchvision does not run beside the CPU build here."""
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    from sapo_ray.models import load_processor
    from sapo_ray.rollout.vllm_engine import multimodal_args

    path = resolve_model_path("bundled:tiny-vlm")
    learner = load_processor(path, max_pixels=max_pixels)
    args = multimodal_args(learner, 1)
    vllm_processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=path, dtype="float32", **args))
    example = load_dataset_split("synthvista", None, "test", n=1, seed=0)[0]
    gen = torch.Generator().manual_seed(0)
    noise = Image.fromarray((torch.rand(300, 500, 3, generator=gen) * 255).to(torch.uint8).numpy())
    image_id = learner.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for image in (example["images"][0], noise):  # 112x112 (no resize at either budget) and resized
        prompt = encode_prompt(learner, {**example, "images": [image]})
        collapsed = [t for i, t in enumerate(prompt.ids) if t != image_id or prompt.ids[i - 1] != image_id]
        out = vllm_processor.apply(ProcessorInputs(collapsed, vllm_processor.info.parse_mm_data({"image": [image]})),
                                   TimingContext(enabled=False))
        item = out["mm_kwargs"]["image"][0]
        assert item["image_grid_thw"].data.tolist() == prompt.vision.image_grid_thw[0].tolist()
        assert out["prompt_token_ids"] == prompt.ids
        torch.testing.assert_close(item["pixel_values"].data.float(), prompt.vision.pixel_values.float(), atol=1e-5, rtol=0)


def test_tis_weights_are_truncated_ratios():
    """rollout.tis_cap: w = min(exp(old_logp - rollout_logp), cap) on valid tokens, 0 on padding."""
    from sapo_ray.batch import Batch, Sample
    from sapo_ray.bookkeeping import tis_weights

    samples = [Sample([1], [5, 6, 7], [-1.0, -2.0, -0.5], [0.0] * 3, "", True, 0),
               Sample([1], [5], [-3.0], [0.0], "", True, 0)]
    batch = Batch.from_samples(samples, pad_id=0)
    batch = batch.with_fields(old_logp=torch.tensor([[-1.5, -1.0, -0.5], [-2.5, 0.0, 0.0]]))
    out, metrics = tis_weights(batch, cap=2.0)
    expected = torch.tensor([[math.exp(-0.5), 2.0, 1.0], [math.exp(0.5), 0.0, 0.0]])
    assert torch.allclose(out.is_weights, expected)
    assert metrics["rollout/tis_clipfrac"] == pytest.approx(0.25)


@needs_vllm
@pytest.mark.parametrize("algorithm,extra", [("sapo", ["rollout.tis_cap=2"]), ("grpo", []),
                                             ("grpo", ["rollout.weight_sync=broadcast"]),
                                             ("grpo", ["actor.lora.rank=4", "actor.optim.lr=1e-2"])],
                         ids=["sapo-tis", "grpo", "grpo-broadcast", "grpo-lora"])
def test_training_steps_with_vllm_engine(algorithm, extra, ray_cluster, tmp_path):
    import json

    from sapo_ray.main import run

    # Long enough to answer (rewards differ within groups) and a learning rate that moves the policy, so
    # a sync that failed would show in step 2's rollout/learner log-prob difference.
    run(tiny_cfg(tmp_path, f"algorithm={algorithm}", "trainer.steps=3", "rollout.max_new_tokens=96",
                 "actor.optim.lr=1e-3", *extra))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    last = rows[-1]
    expected = {"actor/pg_loss", "actor/grad_norm", "rollout/logp_gap_mean", "rollout/logp_gap_max",
                "timing_s/gen", "timing_s/update_weights", "sync/bytes", "val/accuracy"}
    assert expected <= set(last), sorted(expected - set(last))
    assert all(v is not None and math.isfinite(v) for v in last.values()), last
    assert any(r["actor/grad_norm"] > 1e-3 for r in rows[1:3]), "no update before the last rollout"
    # Engine and learner hold the same float32 weights after each sync: log-probs agree closely.
    assert all(r["rollout/logp_gap_max"] < LOGP_ATOL for r in rows[1:]), [r["rollout/logp_gap_max"] for r in rows[1:]]
    assert all(r["sync/verified"] == 1.0 for r in rows[1:])
    if "actor.lora.rank=4" in extra:  # vLLM takes the merged model: the base's bytes, every sync
        assert all(r["sync/bytes"] == rows[1]["sync/bytes"] > 1e6 for r in rows[1:])
    if "rollout.tis_cap=2" in extra:  # truncated importance sampling on: weights ~1 since engine and learner agree
        assert all(r["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) for r in rows[1:])
