"""Entry point: `python -m sapo_ray.main [+experiment=NAME] [key=value ...]` (Hydra).

Validates the composed config (before Ray starts), joins the Ray cluster named by `ray.address` or
`RAY_ADDRESS` (e.g. under `ray job submit`) or starts a local one, then trains.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sapo_ray.config import CONF_MODULE, ConfigError, register_configs, resolve_model_path
from sapo_ray.config_checks import validate

register_configs()
log = logging.getLogger("sapo_ray")


def check_environment(cfg: DictConfig) -> None:
    """What an experiment needs that this machine may lack: fail fast, naming it."""
    import torch

    path = Path(resolve_model_path(cfg.model.path))
    if not (path / "config.json").exists():
        raise ConfigError(f"model.path={str(path)!r} is not a Hugging Face model directory (no config.json there); "
                          "download the model and set model.path to its directory")
    frozen = [f"{g}.freeze_vision_tower" for g in ("actor", "critic") if cfg[g].freeze_vision_tower]
    if frozen:
        from transformers import AutoConfig

        from sapo_ray.models import is_vision_config

        if not is_vision_config(AutoConfig.from_pretrained(path)):
            raise ConfigError(f"{', '.join(frozen)}=true, but model.path={str(path)!r} is a text-only model "
                              "(no vision tower to freeze)")
    if cfg.model.critic_path and not (Path(resolve_model_path(cfg.model.critic_path)) / "config.json").exists():
        raise ConfigError(f"model.critic_path={cfg.model.critic_path!r} is not a Hugging Face model directory")
    for key in ("train_path", "val_path"):
        value = cfg.data[key]
        if value and not Path(value).exists():
            raise ConfigError(f"data.{key}={value!r} does not exist; point it at a local parquet file or directory")
    wants_gpu = cfg.rollout.num_gpus > 0 or cfg.actor.num_gpus > 0 or (cfg.algorithm.needs_critic and cfg.critic.num_gpus > 0)
    local = not os.environ.get("RAY_ADDRESS") and not cfg.ray.address
    if wants_gpu and local and not cfg.cluster.simulate_gpus and not torch.cuda.is_available():
        raise ConfigError("this config places actors on GPUs (rollout/actor/critic num_gpus > 0) but no CUDA device "
                          "is visible and no Ray cluster address is set; run on a GPU node, set ray.address, or "
                          "try the topology on the CPU with cluster.simulate_gpus=N")
    import importlib.util

    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package, which this "
                          "Python does not have: pip install flash-attn (CUDA machines; the `flash` extra), or "
                          "use model.attn_implementation=sdpa")
    from sapo_ray.rollout.engine import engine_traits

    traits = engine_traits(cfg.rollout.engine)
    if traits.package and importlib.util.find_spec(traits.package) is None:
        raise ConfigError(traits.install_hint)


def init_ray(cfg: DictConfig) -> bool:
    """Join `ray.address` / RAY_ADDRESS, or start a local cluster; True if this call started Ray.

    A local cluster runs without token authentication, so it listens on loopback only (`sapo_ray.net`),
    whatever RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER says, and has no dashboard (no Jobs API to open).
    """
    import ray

    from sapo_ray.net import LOOPBACK, loopback_only

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    num_gpus = cfg.cluster.simulate_gpus or cfg.ray.num_gpus  # logical GPUs: the actors run on the CPU
    with loopback_only():
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True, _node_ip_address=LOOPBACK)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray whose node address no longer follows `loopback_only`
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster took the node address {node_ip}, not {LOOPBACK}: its servers "
                           "would listen beyond loopback with authentication off; stopped it")
    return True


def run(cfg: DictConfig) -> dict:
    """Validate, start Ray, train; returns the last validation metrics."""
    validate(cfg)
    check_environment(cfg)
    import ray

    from sapo_ray.precision import resolve_learners
    from sapo_ray.trainer import Trainer

    decisions = resolve_learners(cfg)
    trainer = Trainer(cfg)
    # Installed before Ray starts, so a signal during the start-up also ends the run cleanly; the
    # handlers stay until the actors and the local Ray instance are gone.
    with trainer.stop:
        started = not ray.is_initialized()  # this run connects (or starts) Ray, so it disconnects (or stops) it
        try:
            init_ray(cfg)
            trainer.stop.install()
            trainer.setup(decisions)
            return trainer.fit()
        except KeyboardInterrupt as err:  # Ray's waits turn a stop signal into a plain KeyboardInterrupt
            raise trainer.stop.reason(err) from None
        finally:
            try:
                trainer.close()
            finally:  # a second signal during close must not leave the local Ray instance behind
                if started and ray.is_initialized():
                    ray.shutdown()


@hydra.main(version_base=None, config_path=f"pkg://{CONF_MODULE}", config_name="config")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from sapo_ray.signals import Interrupted
    from sapo_ray.errors import StopRun

    try:
        result = run(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        sys.exit(2)
    except StopRun as err:
        log.error("%s", err)
        sys.exit(1)
    except Interrupted as stop:
        log.warning("%s; exit status %d", stop, stop.exit_status)
        sys.exit(stop.exit_status)
    log.info("final validation: %s", {k: round(v, 4) for k, v in result.items() if k.startswith("val/accuracy")})
    return result.get("val/accuracy")


if __name__ == "__main__":
    main()
