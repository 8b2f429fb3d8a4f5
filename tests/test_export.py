"""`python -m sapo_ray.export`: a checkpoint written by the trainer's own save path, exported and loaded back
with transformers, gives exactly the weights and logits the learner ranks held; clear errors otherwise."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoModelForImageTextToText

from helpers import free_ports, local_process_group, tiny_cfg
from sapo_ray import export
from sapo_ray.config import learner_worker_config, resolve_model_path
from sapo_ray.data.prompt_loader import PromptLoader
from sapo_ray.learner.worker import CriticWorker, PolicyWorker
from sapo_ray.models import ValueModel, load_policy, load_processor
from sapo_ray.learner.group import Learners
from sapo_ray.trainer import Trainer
from tests.models.conftest import vlm_batch

BASE = resolve_model_path("bundled:tiny-vlm")


class InProcessGroup:
    """A learner group of one rank in this process: what `Trainer.save_checkpoint` calls, without Ray."""

    world_size = 1

    def __init__(self, worker):
        self.worker = worker

    def save_checkpoint(self, path: str) -> None:
        self.worker.save_checkpoint(path)


def _perturb(worker, seed: int) -> dict[str, torch.Tensor] | None:
    """Add noise to every weight of the sharded model (rank 0 draws it; every rank calls this, a collective);
    the full weights the model then holds, on rank 0."""
    full = worker.full_state_dict()
    gen = torch.Generator().manual_seed(seed)
    noisy = {} if full is None else {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in full.items()}
    set_model_state_dict(worker.model, noisy, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=worker.world_size > 1))
    return worker.full_state_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A SAPO run directory with one checkpoint (step 3) of perturbed actor and critic weights, saved by
    `Trainer.save_checkpoint` from real learner ranks; and those weights, as the ranks held them."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(run_dir)
    trainer = Trainer(cfg)
    held, groups = {}, {}
    with local_process_group():
        for cls, role in ((PolicyWorker, "actor"), (CriticWorker, "critic")):
            worker = cls(0, 1, learner_worker_config(cfg, role))
            worker.setup()
            held[role] = _perturb(worker, seed=len(held))
            groups[role] = InProcessGroup(worker)
        trainer.learners = Learners(groups["actor"], groups["critic"])
        trainer.loader = PromptLoader([{"id": i} for i in range(8)], 4, seed=0)
        trainer.step = 3
        checkpoint = trainer.save_checkpoint()
    return run_dir, checkpoint, held


def test_checkpoint_records_its_config(run):
    run_dir, checkpoint, _ = run
    assert checkpoint == run_dir / "checkpoints" / "step_000003"
    cfg = OmegaConf.load(checkpoint / "config.yaml")
    assert (cfg.model.path, cfg.model.dtype, cfg.algorithm.name) == ("bundled:tiny-vlm", "float32", "sapo")


def test_actor_round_trip_is_exact(run, tmp_path):
    _, checkpoint, held = run
    out = tmp_path / "policy"
    assert export.main([str(checkpoint), str(out)]) == 0
    base = load_policy(BASE).state_dict()
    assert all(not torch.equal(held["actor"][k], base[k]) for k in base)  # the weights were perturbed
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    loaded = exported.state_dict()
    assert loaded.keys() == held["actor"].keys()
    for name, tensor in held["actor"].items():
        assert torch.equal(loaded[name], tensor), name
    # The perturbed model the ranks held, rebuilt from the base, and the export score a prompt alike.
    original = load_policy(BASE)
    original.load_state_dict(held["actor"])
    batch = vlm_batch(load_processor(out))
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, original.eval()(**batch).logits)
    # The base directory's generation config and processor come along: the export encodes as the base does.
    assert exported.generation_config.to_dict() == original.generation_config.to_dict()
    base_batch = vlm_batch(load_processor(BASE))
    assert batch.keys() == base_batch.keys() and all(torch.equal(batch[k], base_batch[k]) for k in batch)


def test_actor_in_bfloat16(run, tmp_path):
    """`--dtype bfloat16` (a GPU run's model.dtype): the weights rounded to bf16, as the trainer's hf_policy/."""
    _, checkpoint, held = run
    out = tmp_path / "policy16"
    assert export.main([str(checkpoint), str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:  # stored in bf16, not cast on loading
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = AutoModelForImageTextToText.from_pretrained(out).state_dict()  # dtype from config.json
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.bfloat16()) for k, v in held["actor"].items())


def test_critic_round_trip_is_exact(run, tmp_path):
    run_dir, _, held = run
    out = tmp_path / "critic"
    # A run directory stands for its latest checkpoint.
    assert export.main([str(run_dir), str(out), "--role", "critic"]) == 0
    critic = ValueModel.from_pretrained(out)
    loaded = critic.state_dict()
    assert loaded.keys() == held["critic"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in held["critic"].items())
    # A fresh critic from the base would draw a new head: this one is the trained head.
    assert not torch.equal(loaded["value_head.weight"], ValueModel.from_pretrained(BASE).value_head.weight)


def _save_two_rank_checkpoint(rank: int, port: int, run_dir, held_file) -> None:
    """Rank `rank` of two policy ranks (gloo): perturb the weights rank 0 broadcasts, save the sharded checkpoint."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A rank that cannot join (its port taken meanwhile) fails the test in a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = tiny_cfg(run_dir)
        worker = PolicyWorker(rank, 2, learner_worker_config(cfg, "actor"))
        worker.setup()
        held = _perturb(worker, seed=7)
        worker.save_checkpoint(str(run_dir / "checkpoints" / "step_000001" / "actor"))
        if rank == 0:
            torch.save(held, held_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_checkpoint_sharded_over_two_ranks(tmp_path):
    """Each rank saved its shard of every weight: the export puts them back together exactly."""
    import torch.multiprocessing as mp

    run_dir = tmp_path / "run"
    # Spawned, not forked: a fork of this process after the Ray tests (driver and gRPC threads alive) can start
    # its ranks with a lock held by a thread that did not come along, and hang.
    mp.start_processes(_save_two_rank_checkpoint, args=(free_ports(1)[0], run_dir, tmp_path / "held.pt"), nprocs=2,
                       start_method="spawn")
    checkpoint = run_dir / "checkpoints" / "step_000001"
    # Two shard files, one per rank; then the rest of a checkpoint that the export reads.
    assert sorted(p.name for p in (checkpoint / "actor").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "config.yaml").write_text(OmegaConf.to_yaml(tiny_cfg(run_dir), resolve=True))
    assert export.main([str(checkpoint), str(tmp_path / "policy")]) == 0
    held = torch.load(tmp_path / "held.pt")
    loaded = load_policy(tmp_path / "policy").state_dict()
    assert loaded.keys() == held.keys() and all(torch.equal(loaded[k], v) for k, v in held.items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_model_state_reads_only_the_model_and_drops_wrapper_names(tmp_path):
    """Parameter names as FSDP1 / activation checkpointing / torch.compile would have saved them come back
    as the model's own; the optimizer's entries are not returned."""
    import torch.distributed.checkpoint as dcp

    weight, bias = torch.randn(3, 2), torch.randn(3)
    state = {"model": {"_orig_mod.layers.0._checkpoint_wrapped_module.proj.weight": weight,
                       "_fsdp_wrapped_module.proj.bias": bias},
             "optim": {"state": {"proj.bias": {"exp_avg": torch.ones(3)}}}}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    loaded = export.model_state(tmp_path)
    assert loaded.keys() == {"layers.0.proj.weight", "proj.bias"}
    assert torch.equal(loaded["layers.0.proj.weight"], weight) and torch.equal(loaded["proj.bias"], bias)


def test_config_falls_back_to_the_run_and_to_model_path(run, tmp_path):
    """A checkpoint from before checkpoints carried their config: the run's .hydra/config.yaml names the
    model; with no config anywhere, --model-path does."""
    _, checkpoint, held = run
    old = tmp_path / "old-run" / "checkpoints" / "step_000003"
    shutil.copytree(checkpoint, old)
    (old / "config.yaml").unlink()
    (old.parent.parent / ".hydra").mkdir()
    (old.parent.parent / ".hydra" / "config.yaml").write_text(
        f"model:\n  path: {BASE}\n  critic_path: ''\n  dtype: float32\ntrainer:\n  run_dir: ${{hydra:runtime.output_dir}}\n")
    assert export.main([str(old), str(tmp_path / "a")]) == 0
    shutil.rmtree(old.parent.parent / ".hydra")
    assert export.main([str(old), str(tmp_path / "b"), "--model-path", BASE]) == 0
    for out in ("a", "b"):
        loaded = load_policy(tmp_path / out).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in held["actor"].items())


def test_clear_errors(run, tmp_path, capsys):
    run_dir, checkpoint, _ = run
    assert export.main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert export.main([str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not a checkpoint (no trainer_state.json)" in capsys.readouterr().err
    # A GRPO run has no critic.
    grpo = tmp_path / "grpo" / "checkpoints" / "step_000001"
    shutil.copytree(checkpoint, grpo, ignore=shutil.ignore_patterns("critic"))
    assert export.main([str(grpo), str(tmp_path / "o"), "--role", "critic"]) == 2
    assert "no critic in this checkpoint (it holds: actor)" in capsys.readouterr().err
    (grpo / "config.yaml").unlink()
    assert export.main([str(grpo), str(tmp_path / "o")]) == 2
    assert "pass --model-path" in capsys.readouterr().err
    # Weights of another architecture: the text-only twin has no vision tower.
    assert export.main([str(checkpoint), str(tmp_path / "o"), "--model-path", resolve_model_path("bundled:tiny-lm")]) == 2
    err = capsys.readouterr().err
    assert "do not fit the architecture" in err and "missing (model.embed_tokens.weight" in err
    assert "unexpected (model.language_model.embed_tokens.weight" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert export.main([str(checkpoint), str(tmp_path / "full")]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point(run, tmp_path):
    _, checkpoint, _ = run
    proc = subprocess.run([sys.executable, "-m", "sapo_ray.export", str(checkpoint / "actor"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A run directory with one checkpoint of a LoRA policy (rank 4) whose adapters are drawn at random, saved by
    `Trainer.save_checkpoint`; and the merged weights the rank serves (`engine_state_dict`)."""
    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = tiny_cfg(run_dir, "bundled:tiny-vlm", "algorithm=grpo", "actor.lora.rank=4", "actor.lora.alpha=8")
    trainer = Trainer(cfg)
    with local_process_group():
        worker = PolicyWorker(0, 1, learner_worker_config(cfg, "actor"))
        worker.setup()
        full = worker.full_state_dict()
        gen = torch.Generator().manual_seed(0)
        noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v for k, v in full.items()}
        set_model_state_dict(worker.model, noisy, options=StateDictOptions(full_state_dict=True))
        merged = worker.engine_state_dict()
        trainer.learners = Learners(InProcessGroup(worker))
        trainer.loader = PromptLoader([{"id": i} for i in range(8)], 4, seed=0)
        trainer.step = 2
        checkpoint = trainer.save_checkpoint()
    return checkpoint, merged


def test_a_lora_policy_exports_merged_or_as_its_adapter(lora_run, tmp_path):
    """By default the adapters merged into the base's names, exactly the weights the rank served; with `--adapter`
    a peft adapter directory, which peft loads onto the base model to compute the merged model's logits."""
    from peft import PeftModel

    checkpoint, merged = lora_run
    assert export.main([str(checkpoint), str(tmp_path / "merged")]) == 0
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert loaded.state_dict().keys() == merged.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in merged.items())
    assert not torch.equal(merged["model.language_model.layers.0.self_attn.q_proj.weight"],
                           load_policy(BASE).state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert export.main([str(checkpoint), str(tmp_path / "adapter"), "--adapter"]) == 0
    adapted = PeftModel.from_pretrained(load_policy(BASE), str(tmp_path / "adapter")).eval()
    batch = vlm_batch(load_processor(BASE))
    with torch.no_grad():
        want, got, base = loaded(**batch).logits, adapted(**batch).logits, load_policy(BASE).eval()(**batch).logits
    # (W + BA) x and W x + B (A x) round differently in float32 (by up to 1.2e-5 on an Intel AVX512 CPU): a
    # tolerance relative to the logits' size, far below what the adapters change.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((want - base).abs().max()) > 1e-2


def test_adapter_export_of_a_full_policy_is_a_clear_error(run, tmp_path, capsys):
    _, checkpoint, _ = run
    assert export.main([str(checkpoint), str(tmp_path / "adapter"), "--adapter"]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
