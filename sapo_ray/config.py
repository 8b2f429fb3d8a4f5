"""Typed configuration: Hydra structured configs registered in a ConfigStore.

Every YAML under `conf/` is validated against these dataclasses before Ray starts, so a misspelt key
or a wrong type fails at once with the key's name. `sapo_ray.config_checks.validate(cfg)` adds the
cross-field checks, reading the allowed values from the registries (estimators, losses, segmenters, engines).
This module is the schema every process imports: it imports nothing of the project above `sapo_ray.algo`.

The config group `algorithm` is `sapo_ray.algo.registry.AlgorithmSpec` itself: each registered preset
is an option (`algorithm=grpo`), so an algorithm's values live in one place, its registration.

What crosses into an actor is typed: `RolloutWorkerConfig` and `LearnerWorkerConfig` hold these
dataclasses (built by `rollout_worker_config` / `learner_worker_config`), never dicts of keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sapo_ray.algo.registry import ALGORITHMS, AlgorithmSpec, get_algorithm

ASSETS = Path(__file__).resolve().parent / "assets"
# The Hydra configs as a package (the repository's conf/, shipped in the wheel), so an installed copy
# composes the same config from any working directory.
CONF_MODULE = "sapo_ray.conf"
BUNDLED = "bundled:"


def resolve_model_path(path: str) -> str:
    """`bundled:NAME` -> the shipped checkpoint directory; anything else is a path, returned as is."""
    return str(ASSETS / path[len(BUNDLED):]) if path.startswith(BUNDLED) else path


@dataclass
class ModelConfig:
    # HF directory of the policy (a Qwen2-VL-family VLM or a causal LM); `bundled:NAME` = a checkpoint
    # shipped in sapo_ray/assets (tiny-vlm, tiny-lm).
    path: str = "bundled:tiny-vlm"
    # HF directory the critic's backbone starts from; empty = the policy's path.
    critic_path: str = ""
    # Weights dtype of every model copy: float32 on CPU, bfloat16 on GPU.
    dtype: str = "float32"
    # Attention kernel; sdpa needs no extra package (flash_attention_2 needs the `flash` extra); sdpa_gqa
    # (sapo_ray/models/attention.py) is sdpa without copying grouped key/value heads under a padding mask,
    # the fast choice on CPUs.
    attn_implementation: str = "sdpa"
    # Recompute activations in the backward pass (saves memory on long responses).
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # Training dataset: synthvista (generated), geometry3k (parquet path or hub), custom (your files, below).
    train: str = "synthvista"
    # Local file/dir for `train` (None: generated, or the hub when online). custom: a .jsonl, .json or
    # .parquet file, a directory of them, or a hub dataset `name@split` (sapo_ray/data/custom.py).
    train_path: Optional[str] = None
    # Validation dataset: synthvista, mathvista, geometry3k, custom.
    val: str = "synthvista"
    # Local file/dir for `val` (as train_path).
    val_path: Optional[str] = None
    # custom: the columns holding the question, the gold answer and the images (a list of paths relative
    # to the file, bytes, or {"bytes"|"path": ...} dicts; a row without it is text-only).
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    # custom: the column holding videos (a list per row, or one): each a video file (a path relative to the
    # file, bytes, or a {"bytes"|"path": ...} dict; decoded with PyAV) or a list of frames as images are
    # given. `<video>` in the question marks where each goes.
    video_key: str = "videos"
    # custom: a Jinja template (inline, or a file) rendering the query from `content` (the question) and
    # the row's columns, as EasyR1's format_prompt; null = the question as it is.
    prompt_template: Optional[str] = None
    # Split names passed to the loaders.
    train_split: str = "train"
    val_split: str = "test"
    # Rows generated for synthvista's train split (ignored by file datasets).
    train_size: int = 4096
    # Validation rows (a prefix of the val split; null = all).
    val_size: Optional[int] = 128
    # Prompts drawn per training step (each sampled rollout.n times).
    prompts_per_step: int = 16
    # Instruction appended to every question (empty for the tiny model; the paper's for Qwen2.5-VL).
    instruction: str = ""
    # Prompts longer than this many tokens (images included) are skipped and counted.
    max_prompt_length: int = 1024
    # Pixel budget of one image: the image processor resizes each image (keeping its aspect ratio, sides
    # multiples of 28) to at least min_pixels and at most max_pixels, so an image costs at most
    # max_pixels / 784 prompt tokens. null = the checkpoint's own (Qwen2.5-VL: 3136 and 12845056, i.e. up to
    # 16384 tokens). The driver's encoder and the vllm engine's processor use the same values.
    max_pixels: Optional[int] = None
    min_pixels: Optional[int] = None
    # Videos: frames kept per second of a clip, at most max_frames of them (spread over the whole clip
    # when it is longer; Qwen-VL embeds frames in pairs, so two frames cost one frame's tokens), and each
    # frame's pixel budget (null = the images' max_pixels). A frame pair costs video_max_pixels / 784
    # prompt tokens at most (Qwen2.5-VL; 1024 px per token for Qwen3-VL).
    video_fps: float = 2.0
    max_frames: int = 16
    video_max_pixels: Optional[int] = None
    # Generator knobs of synthvista (ignored by other datasets): image side in pixels, and whether the
    # query starts with MathVista's hint sentence (answer type and format; off = question and choices only).
    image_size: int = 112
    hint: bool = True
    # synthvista's templates (sapo_ray/data/synthvista.py); null = its image templates. [bar_grew] gives
    # clips of growing bars (the video rows of `data=synthvista_clip`).
    templates: Optional[list] = None


@dataclass
class RolloutConfig:
    # Engine: hf (Hugging Face generate, CPU or GPU) or vllm (vLLM, production on GPUs; text models on a
    # CPU with the `make .venv-vllm` build).
    engine: str = "hf"
    # Number of rollout worker actors; prompts are split evenly between them.
    num_workers: int = 1
    # Responses sampled per prompt (GRPO-family needs >= 2).
    n: int = 8
    # Sampling temperature for training rollouts (log-probs are computed at this temperature).
    temperature: float = 1.0
    top_p: float = 1.0
    # Response length limit in tokens.
    max_new_tokens: int = 64
    # Largest batch one generate call takes.
    max_batch_size: int = 256
    # Ray resources of each worker.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # torch threads per worker (its CPU share).
    num_threads: int = 2
    # Validation sampling (the paper's: T = 0.6, top-p 0.95); greedy accuracy is reported too.
    val_temperature: float = 0.6
    val_top_p: float = 0.95
    val_n: int = 1
    # Bound on the size of one weight-sync bucket in MB.
    sync_bucket_mb: int = 256
    # How the weights reach the engines after each update (sapo_ray.sync): object_store (learner rank 0
    # puts buckets into Ray's object store, each worker fetches them) or broadcast (a process group of
    # learner rank 0 and every engine process: NCCL when learners and rollout are on GPUs, each on whole
    # GPUs of their own, gloo on CPUs).
    weight_sync: str = "object_store"
    # Ray custom resources each worker requires (placement on nodes started with
    # `ray start --resources='{"rollout_node": 1}'`); add keys with `+`: '+rollout.resources={rollout_node: 0.01}'.
    resources: dict = field(default_factory=dict)
    # vllm engine only: GPUs one engine shards the model over (rollout.num_gpus must cover them).
    tensor_parallel_size: int = 1
    # vllm engine only: share of each GPU's memory for weights and KV cache (lower when sharing GPUs).
    gpu_memory_utilization: float = 0.5
    # vllm engine only: longest prompt + response in tokens (null = the model's limit).
    max_model_len: Optional[int] = None
    # vllm engine only: most images one prompt may carry (vLLM's limit_mm_per_prompt; videos 0). vLLM sizes
    # its multimodal memory profile by it. Vision-language models only.
    images_per_prompt: int = 1
    # Most videos one prompt carries (the memory plan counts their tokens: data.max_frames frames of at most
    # data.video_max_pixels each); a run whose rows hold more stops before it starts. hf engine only.
    videos_per_prompt: int = 0
    # vllm engine only: no CUDA graphs (faster start, slower decoding); always on with the CPU build.
    enforce_eager: bool = False
    # vllm engine on GPUs only: free the engine's weights and KV cache after each rollout while the
    # learners run (for rollout and learners sharing GPUs); the next weight sync or generate restores them.
    enable_sleep_mode: bool = False
    # 0: each step samples on the weights it then updates (synchronous). 1: one step off-policy (verl's
    # one-step-off-policy trainer, AReaL): the next step's first draw samples on the current weights while
    # the learners update them, so generation and training overlap; the loss's old log-probs are the
    # behaviour policy's (rollout_logp), or recomputed and corrected by rollout.tis_cap. Logged as
    # rollout/staleness; a checkpoint keeps the in-flight samples, so resuming is exact.
    max_staleness: int = 0
    # Truncated importance sampling for the rollout/learner mismatch: each token's policy-loss term is
    # weighted by min(exp(old_logp - rollout_logp), tis_cap); 0 = off (e.g. 2 with vllm in bfloat16).
    tis_cap: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # Optimizer steps of linear warm-up.
    warmup_steps: int = 0
    # After warm-up: constant or cosine (to 0 at the role's last optimizer step); the names are the keys of
    # sapo_ray.learner.worker.LR_SCHEDULES.
    schedule: str = "constant"
    max_grad_norm: float = 1.0


@dataclass
class LoraConfig:
    # Adapter rank: 0 trains every weight (full fine-tuning); r > 0 trains a rank-r adapter on each targeted
    # linear layer of the policy and freezes the rest (`sapo_ray.models.lora`; the policy only).
    rank: int = 0
    # The adapter's output is scaled by alpha / rank.
    alpha: float = 32.0
    dropout: float = 0.0
    # The language model's layers given adapters, by their last name (Qwen2.5-VL's and Qwen3-VL's attention and
    # MLP projections).
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    # Adapters in the vision tower's blocks too (`vision_target_modules`); else the tower stays frozen.
    vision: bool = False
    vision_target_modules: list = field(default_factory=lambda: ["qkv", "proj", "gate_proj", "up_proj", "down_proj",
                                                                 "linear_fc1", "linear_fc2"])


@dataclass
class LearnerConfig:
    # FSDP2 ranks (Ray actors) in this group.
    world_size: int = 1
    # Ray resources and torch threads per rank.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 2
    # Rows (sampled responses, not prompts) per optimizer step across all ranks, and per forward/backward
    # on one rank. A step has data.prompts_per_step x rollout.n rows: GRPO with 64 prompts x n = 8 has 512,
    # so mini_batch_size 128 gives 4 optimizer steps per PPO epoch (the paper's SAPO: 512 x 1, also 4).
    mini_batch_size: int = 64
    micro_batch_size: int = 32
    # Micro-batches by token budget instead (verl's use_dynamic_bsz / ppo_max_token_len_per_gpu): rows
    # sorted by length and packed so that rows x (longest prompt + longest response) <= this many tokens,
    # padding only between rows of similar length (`actor/padding_ratio`). 0 = micro_batch_size rows.
    max_tokens_per_micro_batch: int = 0
    # How a forward pass lays out a micro-batch (`sapo_ray.learner.forward.LAYOUTS`), each with the same
    # log-probs, values and gradients:
    # - shared_prompt: each distinct prompt (tokens, images) computed once and every sample's response
    #   over its cached keys and values; micro-batches keep a prompt's samples together. The update uses
    #   padded rows under model.gradient_checkpointing, whose recomputation would extend the cache twice.
    # - packed: the rows end to end in one sequence without padding (verl's use_remove_padding):
    #   variable-length attention with model.attn_implementation=flash_attention_2 on GPUs; with sdpa a
    #   block-diagonal mask, quadratic in the packed length (slow on long micro-batches).
    # - padded: whole [prompt | response] rows, prompts left- and responses right-padded.
    layout: str = "shared_prompt"
    ppo_epochs: int = 1
    # Shuffle rows before cutting mini-batches.
    shuffle: bool = True
    # Recompute old log-probs and entropies with the learner (verl's default). Off: use the engine's
    # rollout-time values, exact when engine and learner run the same weights in the same precision
    # (the hf engine in float32; `rollout/logp_gap_*` would show otherwise) and one forward cheaper.
    recompute_old_logp: bool = True
    # CPU only: run forward and backward matmuls in bfloat16 (torch.autocast) over float32 weights.
    # auto (default): only where this CPU's bf16 matmuls are clearly faster (a short probe, cached per
    # machine; sapo_ray/precision.py): ~1.5x faster learners with AVX512-BF16/AMX, while an AVX2-only CPU
    # emulates bf16 40-60x slower. true / false force it. Log-probs in bf16 differ from float32 ones by
    # ~2e-3 per token on average. On GPUs FSDP2's mixed precision computes in bfloat16 already.
    autocast_bf16: str = "auto"
    # Train the language model only: the vision encoder and its merger keep their weights (as EasyR1's
    # freeze_vision_tower). Vision-language models only.
    freeze_vision_tower: bool = False
    # GPUs shared with the engines (cluster.placement=colocate): outside the step's learner phases keep this
    # group's weights, gradients and optimizer state in CPU memory, so generation gets the GPU memory
    # (verl's param/optimizer offload); costs two host<->GPU copies of that state per step. A no-op on CPUs.
    offload: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    # LoRA instead of full fine-tuning (the policy only: `critic.lora.rank` must stay 0).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Ray custom resources each rank requires (placement on nodes started with
    # `ray start --resources='{"learner_node": 1}'`); add keys with `+`: '+actor.resources={learner_node: 0.01}'.
    resources: dict = field(default_factory=dict)


@dataclass
class EnvConfig:
    # Multi-turn episodes (sapo_ray/envs): null = one response per prompt. `tools`: the model's <tool_call>
    # blocks (Qwen's format) are run and answered in the next user turn, until a turn calls none; or a
    # class of your own, "path/to/file.py:ClassName" taking (example, tools) with step(text) -> Step.
    name: Optional[str] = None
    # The model's turns per episode, and the tokens of its whole response (turns and observations).
    max_turns: int = 4
    max_tokens: int = 512
    # The tools a turn may call (sapo_ray/envs/tools.py: calculator, colour_at), plus your own functions
    # "path/to/file.py:function" (fn(context, **arguments) -> str; the docstring describes it).
    tools: list = field(default_factory=lambda: ["calculator", "colour_at"])
    tool_files: list = field(default_factory=list)
    # Processes running tool calls on each rollout worker (no network, no files of the run), each call's
    # time limit, and the longest result a turn sees (longer ones are cut and counted).
    tool_workers: int = 2
    tool_timeout_s: float = 5.0
    max_tool_chars: int = 1000


@dataclass
class RewardConfig:
    # Weights of the paper's reward: acc_weight * accuracy + format_weight * format (acc_weight null =
    # 1 - format_weight: the paper's 0.9 / 0.1; format_weight=0 scores by the accuracy alone).
    acc_weight: Optional[float] = None
    format_weight: float = 0.1
    # Processes scoring answers, and the per-sample time limit (a hung check scores 0 and is counted).
    num_workers: int = 1
    timeout_s: float = 10.0
    # A user reward function `path/to/file.py:function(response, example) -> float | dict`: a dict holds
    # `score` (the accuracy) and any extra numbers, each logged as reward/<name> (val/reward/<name>).
    custom: Optional[str] = None
    # The custom function scores a whole batch: `function(responses, examples) -> list`, in the driver.
    batch: bool = False
    # A run stops (instead of training on zeros) when more than this share of a step's samples fail to
    # score (exceptions, non-finite values, timeouts) three steps running.
    max_error_rate: float = 0.5
    # Taken off an episode's score for each of its failed tool calls (malformed, unknown tool, raised, timed
    # out, cut; `env.name` episodes only). 0: a failed call costs only the answer it did not bring, so nothing
    # makes the call format worth keeping once updates start to wear it.
    tool_error_penalty: float = 0.0
    # An answer to a multiple-choice question that names none of its choices (text or letter) scores 0.
    # false: MathVista's rule, which counts it as the most similar choice (edit distance), so a wrong
    # answer can score by luck: `\boxed{yellow}` scores 1 when the choices are red and green and the answer
    # is green.
    exact_choice: bool = False


@dataclass
class TrainerConfig:
    # Training steps (one step = one prompt batch).
    steps: int = 20
    # Validate every this many steps (and before the first and after the last); 0 = only those.
    val_every: int = 5
    # Save a checkpoint every this many steps; 0 = only at the end.
    save_every: int = 10
    # auto: continue the latest checkpoint in run_dir; never: start fresh; or a checkpoint path.
    resume: str = "auto"
    # Where metrics, TensorBoard logs and checkpoints go (Hydra's job directory by default).
    run_dir: str = "${hydra:runtime.output_dir}"
    # Export the final policy as a Hugging Face directory.
    export_hf: bool = True
    # Loggers (sapo_ray.tracking.LOGGERS): console, jsonl, tensorboard, wandb (WANDB_MODE=offline works without a
    # network), mlflow (MLFLOW_TRACKING_URI, else sqlite in the run directory).
    loggers: list = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    project: str = "sapo-ray"
    experiment: str = "${algorithm.name}-seed${seed}"
    # Evaluate model.path (or the checkpoint trainer.resume names) on the validation set and exit: the
    # metrics, the generations (as dump_generations) and, for MathVista, the official result file
    # (mathvista_results_step_XXXXXX.json, scored by `python -m sapo_ray.reward.mathvista`).
    val_only: bool = False
    # Write every validation's responses (generations/val_step_XXXXXX.jsonl: prompt, response, gold answer,
    # scores, the row's own columns) and, with dump_rollouts, every step's training samples
    # (generations/rollout_step_XXXXXX.jsonl).
    dump_generations: bool = False
    dump_rollouts: bool = False
    # Keep only the newest this many checkpoints (0 = all).
    max_ckpt_to_keep: int = 0
    # Stop when more than this many optimizer steps in a row are skipped for a non-finite gradient (0 = never).
    max_skipped_steps: int = 5
    # Bound on every wait for an actor (a generation, an update, a save) and on the learners' collectives;
    # an actor past it is treated as dead.
    rpc_timeout_s: float = 3600.0
    # Actors replaced in a run after dying or going silent: a rollout worker is restarted with the current
    # weights and its part of the generation redone; dead learners are rebuilt from the last checkpoint.
    max_actor_restarts: int = 3


@dataclass
class RayConfig:
    # Cluster to join (also read from RAY_ADDRESS); null = start a local one.
    address: Optional[str] = None
    # Resources of a local cluster (null = what the machine has).
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None


@dataclass
class ClusterConfig:
    # How actors are placed on GPUs (sapo_ray.placement): none = Ray places each actor by its resource
    # request; colocate = one placement group, a bundle per GPU, rollout engine i, actor rank i and critic
    # rank i on bundle i (their num_gpus shares must sum to <= 1); split = engines on GPUs of their own,
    # actor and critic rank i together on learner bundle i (what rollout.weight_sync=broadcast needs).
    placement: str = "none"
    # Seconds to wait for the placement group's bundles before failing with the numbers.
    placement_timeout_s: float = 120.0
    # Start the local Ray cluster with this many logical GPUs and run the actors that hold GPU shares on
    # the CPU (gloo instead of NCCL): the exact GPU topology, exercised on a machine without GPUs. 0 = off.
    simulate_gpus: int = 0
    # Memory of one GPU in GiB, and GPUs per node: the budget and the node layout of the memory plan
    # (`python -m sapo_ray.plan`), which the trainer also checks before it creates actors.
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmSpec = field(default_factory=lambda: get_algorithm("sapo"))
    actor: LearnerConfig = field(default_factory=LearnerConfig)
    critic: LearnerConfig = field(default_factory=lambda: LearnerConfig(optim=OptimConfig(lr=2e-5)))
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_configs() -> None:
    """The root schema and one `algorithm` option per registered algorithm."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="algorithm", name="base_algorithm", node=AlgorithmSpec)
    for name in ALGORITHMS:
        cs.store(group="algorithm", name=name, node=get_algorithm(name))


def compose_config(*overrides: str):
    """The config `python -m sapo_ray.main OVERRIDES...` would run, composed without Hydra's app (for tools
    and tests): `conf/config.yaml` with the overrides, validated against the schema but not `validate`d."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        return compose("config", overrides=list(overrides))


def algorithm_spec(cfg) -> AlgorithmSpec:
    """The `AlgorithmSpec` the config describes."""
    return OmegaConf.to_object(cfg.algorithm)


# ------------------------------------------------------------------------------------------------
# What crosses into the actors
# ------------------------------------------------------------------------------------------------


@dataclass
class RolloutWorkerConfig:
    """Everything a rollout worker (and its engine) reads."""

    model: ModelConfig
    rollout: RolloutConfig
    # This worker's position among the rollout workers, and the run's seed (its engine seed derives from both).
    index: int
    seed: int
    # `data.max_pixels` / `data.min_pixels`: the vllm engine runs its own image processor on the raw images,
    # with the driver's pixel budget (else its prompts would not match the learner's).
    max_pixels: Optional[int] = None
    min_pixels: Optional[int] = None
    # Multi-turn episodes (`env.name` set): the worker runs the environments and their tools.
    env: EnvConfig = field(default_factory=EnvConfig)
    # The policy's LoRA adapters (`actor.lora`): an engine that takes adapters (`EngineTraits.adapters`) holds the
    # base with the same adapters beside it, and each sync sends the adapters alone.
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LearnerWorkerConfig:
    """Everything one rank of a learner group (the policy or the critic) reads."""

    role: str  # "actor" or "critic"
    model: ModelConfig
    learner: LearnerConfig  # the `actor` or `critic` section
    algorithm: AlgorithmSpec
    rollout: RolloutConfig  # its temperature (log-probs)
    seed: int
    # Optimizer steps over the whole run: the length of the learning-rate schedule.
    optimizer_steps: int
    # The longest response a step trains on (`response_tokens`): Dr.GRPO's constant length.
    response_tokens: int
    # The policy also holds the frozen reference (KL in the reward or as a loss).
    needs_ref: bool = False
    # The run's data has videos: each forward pass runs the vision tower for images and again for videos, on
    # every rank alike (`sapo_ray.learner.vision`).
    videos: bool = False
    # The policy keeps what its loss saw per token in each update (`PolicyWorker.loss_trace`), for the
    # experience dumps (`trainer.dump_rollouts`).
    trace_loss: bool = False
    # The weight sync sends the LoRA adapters alone (the engines hold the base and take adapters), else the
    # merged model.
    sync_adapters: bool = False


def optimizer_steps(cfg, role: str) -> int:
    """Optimizer steps `role` takes over the run: updating steps x mini-batches per step x PPO epochs.

    The critic updates at every step; the actor skips the critic's warm-up steps when there is a critic.
    Each step's batch is `data.prompts_per_step * rollout.n` rows (fewer only when groups are dropped).
    """
    spec, group = algorithm_spec(cfg), cfg[role]
    rows = cfg.data.prompts_per_step * cfg.rollout.n
    updates = cfg.trainer.steps
    if role == "actor" and spec.needs_critic:
        updates = max(0, updates - spec.critic_warmup)
    return updates * math.ceil(rows / group.mini_batch_size) * group.ppo_epochs


def response_tokens(cfg) -> int:
    """The longest response a step samples and trains on: `rollout.max_new_tokens`, or with multi-turn
    episodes `env.max_tokens` (the model's turns and the observations together)."""
    return cfg.env.max_tokens if cfg.env.name else cfg.rollout.max_new_tokens


def rollout_worker_config(cfg, index: int) -> RolloutWorkerConfig:
    return RolloutWorkerConfig(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.rollout), index, cfg.seed,
                               max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels,
                               env=OmegaConf.to_object(cfg.env), lora=OmegaConf.to_object(cfg.actor.lora))


def learner_worker_config(cfg, role: str, videos: bool = False, sync_adapters: bool = False) -> LearnerWorkerConfig:
    spec = algorithm_spec(cfg)
    return LearnerWorkerConfig(
        role=role, model=OmegaConf.to_object(cfg.model), learner=OmegaConf.to_object(cfg[role]), algorithm=spec,
        rollout=OmegaConf.to_object(cfg.rollout), seed=cfg.seed, optimizer_steps=optimizer_steps(cfg, role),
        needs_ref=role == "actor" and spec.needs_ref, videos=videos,
        trace_loss=role == "actor" and cfg.trainer.dump_rollouts, response_tokens=response_tokens(cfg),
        sync_adapters=role == "actor" and sync_adapters,
    )


class ConfigError(ValueError):
    """A configuration a user wrote that cannot work; the message names the key."""
