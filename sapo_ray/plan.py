"""`python -m sapo_ray.plan [overrides] [--json]`: where every actor goes and what each GPU must hold.

Builds the policy's architecture on the meta device from `model.path`'s `config.json` (no weights are
read, so `model.path=bundled:configs/qwen2_5_vl_3b` works anywhere), places the actors as
`cluster.placement` does (`sapo_ray.placement`), and estimates per GPU and role, in GiB:

- learners (FSDP over `world_size` ranks): weights, gradients and AdamW's two moments, each sharded
  and stored in float32 (the master copy); the parameters gathered for compute (bf16: the unsharded root and two
  blocks, the one running and the one prefetched); the frozen reference's shard in `model.dtype` (KL); activations of
  one micro-batch of `micro_batch_size x (data.max_prompt_length + rollout.max_new_tokens)` tokens
  (with gradient checkpointing each block keeps only its input and one block is recomputed at a
  time); the actor's logits over the response tokens and their gradient in `model.dtype`, plus one
  128-position scoring piece in float32;
- the engine: vllm reserves `rollout.gpu_memory_utilization` of the GPU (weights, KV cache and its own
  activations); hf holds its weights, a KV cache for `rollout.max_batch_size` rows and one decoding
  step's float32 scores and log-probs.

Besides, every process holds a CUDA context (~0.5 GiB), and an update holds the root unit's unsharded
gradient in the compute dtype and its float32 copy for the reduce-scatter.

A step runs in phases (`PHASES`, `sapo_ray.trainer`), and what coexists on a GPU differs in each:
`generate` (validation alike): the engine awake, the learners' resident state (none with
`learner.offload`); `forward`: the actor's old and reference log-probs beside the critic's values (a
no-grad pass: one block's activations and the logits without their gradient); `update`: the actor's
and the critic's updates side by side; `sync`: the engine wakes (`rollout.enable_sleep_mode`) to take the
weights, after the learners handed their update's cache back, one bucket gathered on the actor. An
engine asleep holds its context only. A GPU's total is the largest of its phases. It is an estimate
from the shapes, not a measurement: allocator fragmentation and NCCL buffers come on top. The vision
tower's activations are counted for `rollout.images_per_prompt` images of at most `data.max_pixels` and
`rollout.videos_per_prompt` videos of `data.max_frames` frames per row. Exit status 2 when a GPU is over `cluster.gpu_memory_gb`; the trainer runs the
same check before it creates actors.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass

import torch

from sapo_ray.config import response_tokens

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The phases of a step, in order: what each process holds in each is `phase_totals`.
PHASES = ("generate", "forward", "update", "sync")
# A process's CUDA context and loaded kernels, GiB (NVIDIA: a few hundred MiB to ~0.5 GiB with cuBLAS and NCCL).
CONTEXT_GB = 0.5
# A learner's terms held whenever its state is on the GPU, and those of each phase on top.
LEARNER_STATE = ("weights", "gradients", "optimizer", "reference")
LEARNER_PHASE = {"generate": (), "forward": ("gathered", "forward_vision", "forward_activations", "forward_logits"),
                 "update": ("gathered", "vision_activations", "activations", "logits", "root_grad"),
                 "sync": ("sync_gathered",)}


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of an architecture (counts of parameters, sizes of tensors)."""

    params: int
    vision_params: int
    lm_head_params: int  # 0 when tied to the embedding
    root_params: int  # outside every transformer block: embeddings, lm_head, norms, vision patch/merger
    block_params: int  # the largest transformer block (an FSDP unit)
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dimension
    layers: int
    vocab: int
    # The vision tower (0 layers for a text-only model): its blocks' widths, and how pixels become patches
    # (`patch_size` px square) and patches become the language model's image tokens (`merge_size`^2 each).
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0
    patch_size: int = 14
    merge_size: int = 2


@functools.lru_cache(maxsize=4)
def _meta_model(path: str) -> torch.nn.Module:
    """The architecture at `path` on the meta device (no weights read, no memory; built once per path for the
    shape and the adapter count, which only read it)."""
    from transformers import AutoConfig

    from sapo_ray.models.loading import build_from_config
    from sapo_ray.models.processor import _check_dir

    with torch.device("meta"):
        return build_from_config(AutoConfig.from_pretrained(_check_dir(path)), torch.bfloat16, "sdpa")


def adapter_params(path: str, lora_cfg) -> int:
    """The parameters of the LoRA adapters `lora_cfg` (`actor.lora`) gives the model at `path`:
    `rank * (in + out)` for each targeted linear layer (`sapo_ray.models.lora.target_pattern`)."""
    import re

    from sapo_ray.models.lora import target_pattern

    pattern = target_pattern(lora_cfg)
    return sum(lora_cfg.rank * (m.in_features + m.out_features) for name, m in _meta_model(path).named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, name))


def model_shape(path: str) -> ModelShape:
    """The shape of the model at `path`, built on the meta device (no weights read)."""
    from transformers import AutoConfig

    from sapo_ray.models.processor import _check_dir

    config = AutoConfig.from_pretrained(_check_dir(path))
    model = _meta_model(path)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    in_units = {id(p) for m in units for p in m.parameters()}
    count = lambda params: sum(p.numel() for p in params)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is None or lm_head.weight is model.get_input_embeddings().weight
    return ModelShape(
        params=count(model.parameters()),
        vision_params=count(p for n, p in model.named_parameters() if ".visual." in f".{n}"),
        lm_head_params=0 if tied else lm_head.weight.numel(),
        root_params=count(p for p in model.parameters() if id(p) not in in_units),
        block_params=max((count(m.parameters()) for m in units), default=0),
        hidden=text.hidden_size, intermediate=text.intermediate_size, kv_dim=text.num_key_value_heads * head_dim,
        layers=text.num_hidden_layers, vocab=text.vocab_size,
        **({"vision_hidden": vision.hidden_size, "vision_intermediate": vision.intermediate_size,
            "vision_layers": vision.depth, "patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size}
           if (vision := getattr(config, "vision_config", None)) is not None else {}),
    )


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    """Activations kept for the backward pass of `tokens` tokens through the decoder, in bf16.

    One block keeps about `2 * (6 h + 2 kv + 4 I)` bytes per token: its input, the norms' outputs,
    queries, keys and values, the attention output, and the MLP's gate, up, activation and product
    (sdpa keeps no attention matrix). Checkpointing keeps each block's input (`2 h` bytes per token)
    and recomputes one block at a time."""
    if checkpointing:
        return tokens * shape.layers * 2 * shape.hidden + block_activation_bytes(shape, tokens)
    return shape.layers * block_activation_bytes(shape, tokens)


def block_activation_bytes(shape: ModelShape, tokens: int) -> float:
    """What one decoder block keeps of `tokens` tokens for its backward pass, in bf16 (`activation_bytes`)."""
    return tokens * 2 * (6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate)


def vision_patches(shape: ModelShape, cfg, rows: int) -> int:
    """The most patches the vision tower embeds for `rows` prompts: `rollout.images_per_prompt` images each
    of at most `data.max_pixels` (the whole prompt when unset), `rollout.videos_per_prompt` videos each of
    `data.max_frames` frames paired into `max_frames / 2` temporal patches of at most `data.video_max_pixels`
    (else `data.max_pixels`), and never more vision tokens than `data.max_prompt_length` holds (each is
    `merge_size`^2 patches)."""
    d = cfg.data
    per_row = d.max_prompt_length * shape.merge_size**2
    per_image = d.max_pixels // shape.patch_size**2 if d.max_pixels else per_row
    frame_pixels = d.video_max_pixels or d.max_pixels
    per_video = math.ceil(d.max_frames / 2) * frame_pixels // shape.patch_size**2 if frame_pixels else per_row
    return rows * min(cfg.rollout.images_per_prompt * per_image + cfg.rollout.videos_per_prompt * per_video, per_row)


def vision_activation_bytes(shape: ModelShape, patches: int, checkpointing: bool, trained: bool) -> float:
    """What the vision tower keeps of `patches` patches for the backward pass, in bf16: as the decoder's
    blocks (`activation_bytes`), with keys and values as wide as the hidden size (no grouped heads). A frozen
    tower (`trained=False`) keeps nothing for a backward pass: one block's at a time."""
    block = patches * 2 * (8 * shape.vision_hidden + 4 * shape.vision_intermediate)
    if not trained:
        return block
    if checkpointing:
        return patches * shape.vision_layers * 2 * shape.vision_hidden + block
    return shape.vision_layers * block


def learner_memory(shape: ModelShape, cfg, role: str, with_ref: bool, adapters: int = 0) -> dict[str, float]:
    """One rank of `role` (actor or critic): resident state and the activation peak, in GiB. `adapters`: the
    LoRA adapters' parameters (`adapter_params`) when the role trains those alone (`actor.lora.rank`); its
    reference is then itself with the adapters off (no copy)."""
    g, m = cfg[role], cfg.model
    master = 4  # float32 weights, gradients and moments (sapo_ray.learner.worker.MASTER_DTYPE)
    params = shape.params - (shape.lm_head_params if role == "critic" else 0)
    trainable = adapters or params - (shape.vision_params if g.freeze_vision_tower else 0)
    world = g.world_size
    # With LoRA the frozen base is held in `model.dtype` and the adapters are the float32 masters.
    weights = DTYPE_BYTES[m.dtype] * params + master * adapters if adapters else master * params
    out = {"weights": weights / world, "gradients": master * trainable / world,
           "optimizer": 2 * master * trainable / world,
           "gathered": 2 * (shape.root_params + 2 * shape.block_params)}
    if with_ref and not adapters:
        out["reference"] = DTYPE_BYTES[m.dtype] * shape.params / world
    tokens = g.micro_batch_size * (cfg.data.max_prompt_length + response_tokens(cfg))
    out["activations"] = activation_bytes(shape, tokens, m.gradient_checkpointing)
    # A no-grad forward keeps no block's activations: one block's at a time.
    out["forward_activations"] = block_activation_bytes(shape, tokens)
    if shape.vision_layers:
        patches = vision_patches(shape, cfg, g.micro_batch_size)
        vision_trained = not g.freeze_vision_tower and (not adapters or g.lora.vision)
        out["vision_activations"] = vision_activation_bytes(shape, patches, m.gradient_checkpointing,
                                                            trained=vision_trained)
        out["forward_vision"] = vision_activation_bytes(shape, patches, m.gradient_checkpointing, trained=False)
    # The root unit (embeddings, lm_head, norms, vision patch embedding and merger) gathers whole and its
    # gradient is reduced whole: unsharded in the compute dtype, plus the float32 copy the reduce-scatter
    # takes under mixed precision.
    root = shape.root_params - (shape.lm_head_params if role == "critic" else 0)
    compute = DTYPE_BYTES[m.dtype]
    out["root_grad"] = (compute + (4 if compute != 4 else 0)) * root
    if role == "actor":
        # The logits and their gradient in the compute dtype, and one scoring piece's float32 temporaries
        # (log-softmax, its exp, the gradient piece and a product: sapo_ray.learner.forward._Score); the
        # no-grad forward's logits have no gradient.
        from sapo_ray.learner.forward import CHUNK_TOKENS

        positions = g.micro_batch_size * (response_tokens(cfg) + 1)
        out["logits"] = (2 * compute * positions + 4 * 4 * CHUNK_TOKENS) * shape.vocab
        out["forward_logits"] = (compute * positions + 4 * 4 * CHUNK_TOKENS) * shape.vocab
        if g.layout == "packed":  # the rows' logits gathered out of the packed sequence: one more copy
            out["logits"] += compute * positions * shape.vocab
            out["forward_logits"] += compute * positions * shape.vocab
        # The sync gathers the full weights a bucket at a time on the actor ranks (the critic waits).
        out["sync_gathered"] = out["gathered"] + cfg.rollout.sync_bucket_mb * 2**20
    return {"context": CONTEXT_GB, **{k: v / GiB for k, v in out.items()}}


def engine_memory(shape: ModelShape, cfg) -> dict[str, float]:
    """One rollout engine on its GPU(s), per GPU, in GiB."""
    r = cfg.rollout
    from sapo_ray.rollout.engine import engine_traits

    if engine_traits(r.engine).memory_pool:
        return {"context": CONTEXT_GB, "reserved": r.gpu_memory_utilization * cfg.cluster.gpu_memory_gb}
    size = DTYPE_BYTES[cfg.model.dtype]
    seq = cfg.data.max_prompt_length + response_tokens(cfg)
    gpus = max(1, math.ceil(r.num_gpus))
    return {"context": CONTEXT_GB, "weights": size * shape.params / GiB / gpus,
            "kv_cache": 2 * size * shape.layers * shape.kv_dim * r.max_batch_size * seq / GiB / gpus,
            # One decoding step's float32 scores, the log-probs kept for the next step, and two temporaries
            # (sapo_ray.rollout.engine.ScoreRecorder): never all steps' logits.
            "logits": 4 * 4 * r.max_batch_size * shape.vocab / GiB / gpus}


def phase_totals(parts: dict[str, dict[str, float]], sleep: bool, offload: dict[str, bool]) -> dict[str, float]:
    """GiB one GPU holds in each phase of a step: the sum over its processes (`parts`: role -> terms).

    The engine holds all its terms, except its context alone while asleep (`sleep`: between a rollout and
    the next sync); a learner holds its context, its state unless offloaded outside the learner phases
    (`offload[role]`, during `generate`), and the phase's own terms (`LEARNER_PHASE`)."""
    totals = {}
    for phase in PHASES:
        total = 0.0
        for role, p in parts.items():
            if role == "rollout":
                awake = not sleep or phase in ("generate", "sync")
                total += sum(p.values()) if awake else p["context"]
                continue
            state_here = phase != "generate" or not offload.get(role, False)
            total += p["context"] + (sum(p.get(k, 0.0) for k in LEARNER_STATE) if state_here else 0.0)
            total += sum(p.get(k, 0.0) for k in LEARNER_PHASE[phase])
        totals[phase] = total
    return totals


def memory_plan(cfg) -> dict:
    """Every GPU of the placement with its actors and memory estimate; `fits` if all are within budget."""
    from sapo_ray.config import algorithm_spec
    from sapo_ray.placement import plan

    spec = algorithm_spec(cfg)
    placement = plan(cfg, spec.needs_critic)
    if placement is None or not any(b.get("GPU") for b in placement.bundles):
        raise ValueError("the memory plan is for GPU placements: set cluster.placement=colocate or split and "
                         "GPU shares (rollout/actor/critic.num_gpus)")
    shape = model_shape(cfg.model.path)
    adapters = adapter_params(cfg.model.path, cfg.actor.lora) if cfg.actor.lora.rank else 0
    budget = cfg.cluster.gpu_memory_gb
    per_node = cfg.cluster.gpus_per_node
    gpus, index = [], 0
    for b, bundle in enumerate(placement.bundles):
        for _ in range(int(bundle.get("GPU", 0))):
            slots = placement.on_bundle(b)
            parts = {}
            for s in slots:
                if s.role == "rollout":
                    parts["rollout"] = engine_memory(shape, cfg)
                else:
                    parts[s.role] = learner_memory(shape, cfg, s.role, s.role == "actor" and spec.needs_ref,
                                                   adapters if s.role == "actor" else 0)
            phases = phase_totals(parts, cfg.rollout.enable_sleep_mode,
                                  {role: cfg[role].offload for role in parts if role != "rollout"})
            total = max(phases.values())
            gpus.append({"node": f"node{index // per_node}", "gpu": index % per_node, "bundle": b,
                         "actors": [{"role": s.role, "rank": s.rank, "share": s.num_gpus} for s in slots],
                         "memory_gb": {"total": round(total, 2),
                                       **{f"{role}/{k}": round(v, 2) for role, p in parts.items() for k, v in p.items()}},
                         "phases": {k: round(v, 2) for k, v in phases.items()},
                         "peak_phase": max(phases, key=phases.get), "fits": total <= budget})
            index += 1
    return {"fits": all(g["fits"] for g in gpus), "gpu_memory_gb": budget, "model": cfg.model.path,
            "params_b": round(shape.params / 1e9, 3), "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "lora_params_m": round(adapters / 1e6, 2), "gpus": gpus}


def format_plan(p: dict) -> str:
    lora = f", LoRA adapters {p['lora_params_m']:g}M parameters" if p["lora_params_m"] else ""
    lines = [f"{p['model']}: {p['params_b']}B parameters{lora}, gradient checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}, budget {p['gpu_memory_gb']:g} GiB per GPU"]
    for g in p["gpus"]:
        actors = ", ".join(f"{a['role']} {a['rank']} ({a['share']:g})" for a in g["actors"])
        mem = g["memory_gb"]
        detail = ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")
        phases = ", ".join(f"{k} {v:.1f}" for k, v in g["phases"].items())
        lines.append(f"{g['node']} GPU {g['gpu']}: {actors} | {mem['total']:.1f} GiB at {g['peak_phase']} "
                     f"{'fits' if g['fits'] else 'OVER BUDGET'} (phases: {phases}; terms: {detail})")
    lines.append("fits" if p["fits"] else "does not fit")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sapo_ray.config import ConfigError, compose_config
    from sapo_ray.config_checks import validate

    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    cfg = compose_config(*overrides)
    try:
        validate(cfg)
        p = memory_plan(cfg)
    except (ConfigError, ValueError) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if as_json else format_plan(p))
    return 0 if p["fits"] else 2


if __name__ == "__main__":
    sys.exit(main())
