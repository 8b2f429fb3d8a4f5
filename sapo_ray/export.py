"""Export a training checkpoint as a Hugging Face model directory.

    python -m sapo_ray.export CHECKPOINT_DIR OUT_DIR [--role actor|critic] [--model-path DIR] [--dtype DTYPE] [--adapter]

CHECKPOINT_DIR is a checkpoint of a run, `RUN_DIR/checkpoints/step_000040`, or a run directory (or
its `checkpoints/`), which stands for the latest checkpoint there. OUT_DIR (new or empty) receives
safetensors weights, `config.json` and the processor's files (tokenizer, chat template, image
processor), taken from the model directory the run started from:

- `--role actor` (default): the policy, which `transformers` loads as the run did
  (`AutoModelForImageTextToText` for a vision-language model, `AutoModelForCausalLM` for a text-only
  one; `sapo_ray.models.load_policy(OUT_DIR)`), and which `model.path=OUT_DIR` trains further;
- a LoRA policy (`actor.lora.rank > 0`): its adapters merged into the base's weights, a plain model as above;
  with `--adapter`, the adapters alone as a `peft` adapter directory (`adapter_config.json`,
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base_model, OUT_DIR)` loads;
- `--role critic`: the value model, `sapo_ray.models.ValueModel.from_pretrained(OUT_DIR)` (the
  backbone plus `value_head`; `model.critic_path=OUT_DIR` starts a critic from it).

The weights come from the role's torch.distributed.checkpoint shards, read in this one process
whatever number of ranks wrote them, and are cast to `--dtype` (default: the run's `model.dtype`,
as the trainer's own `hf_policy/` export; checkpoints hold float32). Weights that never train (a LoRA policy's
base, a frozen vision tower) are not in checkpoints: they are read from the model directory. The architecture and processor
come from the run's config: the `config.yaml` saved in the checkpoint, else the run directory's
`config.yaml` or `.hydra/config.yaml` (`model.path`; for the critic `model.critic_path` when set).
`--model-path DIR` names that directory instead, e.g. when the run's path does not exist on this
machine. Exit status 2, with a message, for a directory that holds no checkpoint, a role the
checkpoint does not have, a model directory that cannot be found, or weights that do not fit it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from sapo_ray.models import lora

STATE_FILE = "trainer_state.json"  # in every checkpoint (Trainer.save_checkpoint renames only complete ones into place)
ROLES = ("actor", "critic")
# Module names that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile);
# FSDP2, which the learners use, inserts none.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class ExportError(ValueError):
    """A checkpoint, role or model directory the user named cannot be exported; the message says why."""


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, or the one its `latest` (or `checkpoints/latest`) points to."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    if (path / STATE_FILE).is_file():
        return path
    for latest in (path / "latest", path / "checkpoints" / "latest"):
        if latest.is_file():
            step = latest.parent / latest.read_text().strip()
            if (step / STATE_FILE).is_file():
                return step
    raise ExportError(f"{path}: not a checkpoint (no {STATE_FILE}); pass a checkpoint directory "
                      f"RUN_DIR/checkpoints/step_NNNNNN, or a run directory with checkpoints/latest")


def run_config(checkpoint: Path):
    """The config the checkpoint was trained with (OmegaConf), or None when none is found next to it."""
    from omegaconf import OmegaConf

    run_dir = checkpoint.parent.parent
    for path in (checkpoint / "config.yaml", run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path), path
    return None, None


def model_state(role_dir: Path) -> dict[str, torch.Tensor]:
    """The model entries of a learner checkpoint (`{"model": ..., "optim": ...}`, torch.distributed.checkpoint),
    as full tensors of their stored dtype under their parameter names; the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(role_dir))
    try:
        metadata = reader.read_metadata().state_dict_metadata
    except FileNotFoundError:
        raise ExportError(f"{role_dir}: no torch.distributed.checkpoint metadata (.metadata); "
                          "the checkpoint is incomplete") from None
    # Loading fills the tensors it is given: allocate each stored model tensor at its full size.
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not model:
        raise ExportError(f"{role_dir}: the checkpoint holds no model weights")
    with warnings.catch_warnings():
        # One process on purpose: torch warns that it assumes so when no process group exists.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    state = {}
    for name, tensor in model.items():
        for part in WRAPPER_PARTS:
            name = name.replace(part, "")
        state[name] = tensor
    return state


def _empty_model(role: str, path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The role's architecture from the model directory `path`, on the meta device (no memory, no init)."""
    from sapo_ray.models.loading import empty_policy
    from sapo_ray.models.value import ValueModel

    with torch.device("meta"):
        return empty_policy(path, dtype) if role == "actor" else ValueModel.empty(path, dtype)


def _check_fits(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        show = lambda keys: ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
        problems = [f"{len(keys)} {what} ({show(keys)})" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
        raise ExportError(f"the checkpoint's weights do not fit the architecture of {path}: " + "; ".join(problems)
                          + "; pass --model-path with the model directory the run started from")


def _model_dirs(checkpoint: Path, role: str, cfg, cfg_path: Path | None, model_path: str | None) -> tuple[str, str]:
    """The directories of the role's architecture and of the processor: `--model-path` for both, else
    the run's `model.critic_path` (critic, when set) or `model.path`, and `model.path` (as the learners)."""
    from sapo_ray.models.processor import _check_dir

    if model_path is not None:
        dirs, source = (model_path, model_path), "--model-path"
    elif cfg is None:
        raise ExportError(f"{checkpoint}: no config.yaml in it or in its run directory to name the model; "
                          "pass --model-path with the model directory the run started from")
    else:
        critic_path = cfg.model.get("critic_path") if role == "critic" else None
        dirs = (critic_path or cfg.model.path, cfg.model.path)
        source = f"model.{'critic_path' if critic_path else 'path'} in {cfg_path}"
    try:
        return _check_dir(dirs[0]), _check_dir(dirs[1])
    except FileNotFoundError as err:
        raise ExportError(f"{err} ({source}); pass --model-path with the model directory the run started from") from None


def _with_frozen(state: dict[str, torch.Tensor], role: str, model: torch.nn.Module, model_dir: str) -> dict:
    """`state` with the weights a checkpoint leaves out because they never train (a LoRA policy's base, a frozen
    vision tower) read from the model directory the run started from, under the checkpoint's names (an adapted
    layer's `X.weight` is `X.base_layer.weight`). `model`: the role's architecture (on the meta device)."""
    from sapo_ray.models import load_policy
    from sapo_ray.models.value import ValueModel

    adapted = {k.split(lora.ADAPTER_A)[0] for k in state if lora.ADAPTER_A in k}

    def stored(key: str) -> str:
        layer, _, kind = key.rpartition(".")
        return f"{layer}{lora.BASE}{kind}" if layer in adapted else key

    names = {k: stored(k) for k in model.state_dict()}
    missing = [k for k, name in names.items() if name not in state]
    if not missing or not {k for k in state if not lora.is_adapter(k)} <= set(names.values()):
        return state  # complete, or weights of another architecture (`_check_fits` names them)
    base = (load_policy(model_dir) if role == "actor" else ValueModel.from_pretrained(model_dir)).state_dict()
    return {**state, **{stored(k): base[k] for k in missing}}


def _lora_config(cfg):
    from omegaconf import OmegaConf

    from sapo_ray.config import LoraConfig

    return LoraConfig(**OmegaConf.to_container(cfg.actor.lora))


def _lora_state(state: dict[str, torch.Tensor], adapted: bool, adapter: bool, cfg, checkpoint: Path) -> dict:
    """A LoRA policy's weights: the adapters as they are for `--adapter`, else merged into the base's names."""
    if not adapted:
        raise ExportError(f"{checkpoint}: --adapter, but the policy has no LoRA adapters (actor.lora.rank was 0)")
    if cfg is None:
        raise ExportError(f"{checkpoint}: a LoRA policy, and no config.yaml in it or in its run directory to give "
                          "its actor.lora (rank and alpha)")
    return state if adapter else lora.merged_state_dict(state, lora.adapter_scale(_lora_config(cfg)))


def export(checkpoint: str | Path, out_dir: str | Path, role: str = "actor", model_path: str | None = None,
           dtype: str | None = None, adapter: bool = False) -> Path:
    """Write `role` of `checkpoint` as a Hugging Face directory `out_dir`, or with `adapter` a LoRA policy's
    adapters as a `peft` adapter directory (see the module docstring)."""
    from sapo_ray.learner.worker import DTYPES
    from sapo_ray.models import load_processor

    checkpoint = find_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: exists and is not an empty directory; pass a new or empty OUT_DIR")
    roles = [r for r in ROLES if (checkpoint / r).is_dir()]
    if role not in roles:
        raise ExportError(f"{checkpoint}: no {role} in this checkpoint (it holds: {', '.join(roles) or 'none'})"
                          + ("; the run's algorithm trains no critic" if role == "critic" else ""))
    cfg, cfg_path = run_config(checkpoint)
    model_dir, processor_dir = _model_dirs(checkpoint, role, cfg, cfg_path, model_path)
    dtype = dtype or (cfg.model.dtype if cfg is not None else "float32")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")

    state = model_state(checkpoint / role)
    adapted = any(lora.is_adapter(k) for k in state)
    if adapter:
        state = _lora_state(state, adapted, adapter, cfg, checkpoint)
        out_dir.mkdir(parents=True, exist_ok=True)
        lora.save_adapter({k: v.to(DTYPES[dtype]) for k, v in state.items()}, _lora_config(cfg), model_dir, out_dir)
        return out_dir
    model = _empty_model(role, model_dir, DTYPES[dtype])
    state = _with_frozen(state, role, model, model_dir)
    if adapted:
        state = _lora_state(state, adapted, adapter, cfg, checkpoint)
    _check_fits(state, model, model_dir)
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    if role == "actor" and os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        from transformers import GenerationConfig

        # As `hf_policy/` carries it: the model directory's own, not defaults derived from its config.
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    load_processor(processor_dir).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sapo_ray.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="RUN_DIR/checkpoints/step_NNNNNN, or a run directory (its latest checkpoint)")
    parser.add_argument("out", metavar="OUT_DIR", help="new or empty directory for the Hugging Face model")
    parser.add_argument("--role", choices=ROLES, default="actor", help="the policy or the critic (default: %(default)s)")
    parser.add_argument("--model-path", default=None,
                        help="model directory the run started from (default: model.path of the run's config)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the run's model.dtype)")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA policy's adapters alone, for peft (default: the model with them merged)")
    args = parser.parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.checkpoint)
        out = export(checkpoint, args.out, args.role, args.model_path, args.dtype, args.adapter)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.role} of {checkpoint}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
