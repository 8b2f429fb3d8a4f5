"""`make gpu-check`: what the paper's run needs of a GPU, checked in a few minutes; a JSON summary at the end.

    python benchmarks/gpu_check.py [--budget-s 450] [--layers 4] [--out gpu_check.json]

0. Refuses (exit status 2, the reason as JSON) where a GPU is present but torch cannot use it.
1. `pytest -m gpu tests`: every gpu-marked test.
2. Two training steps of the tiny VLM in bfloat16 with `cluster.placement=colocate` (hf engine, actor and
   critic on fractions of GPU 0); with two or more GPUs also `cluster.placement=split` with the weights
   broadcast over NCCL.
3. Learner throughput of a Qwen2.5-VL-3B-shaped policy (the shipped architecture, random weights, full
   width, the decoder cut to `--layers` blocks): one rank of the real `PolicyWorker` (FSDP2, bf16 compute),
   one optimizer step on `--rows` x `--seq` tokens, gradient checkpointing on and off: tokens/s, MFU
   against the GPU's dense bf16 peak (6 x the parameters the text batch uses x tokens/s; the vision tower's
   are not), peak allocated and reserved memory next to the memory plan's
   estimate for the same shapes.

Each part runs under what is left of `--budget-s`; a part that fails or runs out of time is reported,
not fatal. On a machine without CUDA, part 3 runs on the CPU (for checking the script itself) and parts
1-2 are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peak of one GPU, TFLOP/s (vendors' data sheets, without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
TINY = ["trainer.steps=2", "trainer.val_every=0", "trainer.loggers=[jsonl]", "trainer.export_hf=false",
        "algorithm.critic_warmup=0", "data.prompts_per_step=4", "data.train_size=64", "data.val_size=4", "rollout.n=2",
        "rollout.max_new_tokens=32", "actor.mini_batch_size=8", "actor.micro_batch_size=4",
        "critic.mini_batch_size=8", "critic.micro_batch_size=4", "model.dtype=bfloat16"]


def _run(cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout))
        ok, text = out.returncode == 0, out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        ok, text = False, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    return {"ok": ok, "seconds": round(time.perf_counter() - start, 1), "tail": "\n".join(str(text).splitlines()[-15:])}


def gpu_present() -> str | None:
    """What shows this machine has an NVIDIA GPU, whatever torch can do with it (None: nothing does)."""
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return "/proc/driver/nvidia/gpus"
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return "/dev/nvidia*"
    return None


def unusable_gpu_error(torch_sees_cuda: bool, evidence: str | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why the check must not run on this machine: a GPU is there but torch cannot use it (a CPU build of
    torch, or a driver too old for its CUDA). Running on would report the CPU's numbers as the GPU's."""
    if torch_sees_cuda or evidence is None:
        return None
    build = f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build"
    return (f"this machine has an NVIDIA GPU ({evidence}) but torch {torch_version} ({build}) cannot use it; "
            "install a CUDA build of torch (docs/running.md, 'On your own GPU machine') and run the check again")


def pytest_gpu(timeout: float) -> dict:
    """Every test marked `gpu` in the tree (tests/test_gpu.py, the CUDA IPC round trip, ...)."""
    result = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], timeout)
    last = [line for line in result["tail"].splitlines() if "passed" in line or "failed" in line]
    return {**result, "summary": last[-1] if last else None}


def training_steps(placement: str, gpus: int, timeout: float) -> dict:
    """Two steps of the tiny VLM through `python -m sapo_ray.main` with `placement` on the GPUs."""
    # Colocated learners offload their state between steps (`learner.offload`), the memory hand-off a shared GPU needs.
    shares = (["rollout.num_gpus=0.3", "actor.num_gpus=0.35", "critic.num_gpus=0.35", "actor.offload=true",
               "critic.offload=true"] if placement == "colocate" else
              ["rollout.num_gpus=1", "actor.num_gpus=0.5", "critic.num_gpus=0.5", "rollout.weight_sync=broadcast"])
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu_check_{placement}_"))
    result = _run([sys.executable, "-m", "sapo_ray.main", "model.path=bundled:tiny-vlm", *TINY,
                   f"cluster.placement={placement}", f"ray.num_gpus={gpus}", *shares, f"trainer.run_dir={run_dir}"],
                  timeout)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        last = rows[-1]
        result["steps"] = [r["step"] for r in rows]
        result["step_s"] = last.get("timing_s/step")
        result["sync_gb_per_s"] = last.get("sync/gb_per_s")
        for kind in ("host", "gpu"):
            result[f"peak_{kind}_mb"] = {k.rsplit("/", 1)[-1]: v for k, v in last.items()
                                         if k.startswith(f"perf/peak_{kind}_mb/")}
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _cut_model_dir(config_path: str, layers: int, out: Path) -> Path:
    """A model directory of `config_path`'s architecture, decoder cut to `layers` blocks, random bf16
    weights, and the bundled tiny VLM's tokenizer and processor files (the learner reads its special ids)."""
    import torch
    from transformers import AutoConfig

    from sapo_ray.models.loading import build_from_config
    from sapo_ray.models.processor import _check_dir

    config = AutoConfig.from_pretrained(_check_dir(config_path))
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    torch.manual_seed(0)
    build_from_config(config, torch.bfloat16, "sdpa").save_pretrained(out)
    tiny = Path(_check_dir("bundled:tiny-vlm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.jinja", "chat_template.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


def learner_throughput(config_path: str, layers: int, rows: int, seq: int, checkpointing: bool,
                       repeats: int = 3) -> dict:
    """One `PolicyWorker` rank (FSDP2 over world size 1) on the GPU, or the CPU without CUDA."""
    import torch
    import torch.distributed as dist

    from sapo_ray.algo.registry import get_algorithm
    from sapo_ray.batch import Batch, Sample
    from sapo_ray.config import LearnerConfig, LearnerWorkerConfig, ModelConfig, OptimConfig, RolloutConfig
    from sapo_ray.learner.worker import PolicyWorker
    from sapo_ray.net import LOOPBACK, listen, tcp_store
    from sapo_ray.plan import GiB, learner_memory, model_shape, phase_totals
    from sapo_ray.precision import use_bf16

    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(_cut_model_dir(config_path, layers, Path(tmp)))
        # bf16 compute on a GPU; on a CPU only where its bf16 matmuls are faster (sapo_ray.precision).
        dtype = "bfloat16" if on_gpu or use_bf16("auto") else "float32"
        model = ModelConfig(path=path, dtype=dtype, gradient_checkpointing=checkpointing)
        learner = LearnerConfig(num_gpus=1.0 if on_gpu else 0.0, num_threads=os.cpu_count() or 1, micro_batch_size=rows,
                                mini_batch_size=rows, shuffle=False, optim=OptimConfig(lr=1e-6))
        half = seq // 2
        cfg = LearnerWorkerConfig(role="actor", model=model, learner=learner, algorithm=get_algorithm("rloo"),
                                  rollout=RolloutConfig(temperature=1.0, max_new_tokens=half), seed=0,
                                  optimizer_steps=repeats + 1, response_tokens=half)
        if not dist.is_initialized():
            listener = listen(LOOPBACK)
            store = tcp_store(LOOPBACK, listener.getsockname()[1], 1, listener)
            dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=0, world_size=1)
        worker = PolicyWorker(0, 1, cfg)
        worker.setup()
        gen = torch.Generator().manual_seed(0)
        samples = [Sample(torch.randint(20, 400, (seq - half,), generator=gen).tolist(),
                          torch.randint(20, 400, (half,), generator=gen).tolist(), [0.0] * half, [0.0] * half, "", True, i)
                   for i in range(rows)]
        batch = Batch.from_samples(samples, pad_id=0)
        batch = batch.with_fields(old_logp=torch.full((rows, half), -5.0),
                                advantages=torch.randn(rows, half, generator=gen))
        worker.update(batch)  # warm-up: kernels, allocator
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            worker.update(batch)
        if on_gpu:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        params = sum(p.numel() for p in worker.model.parameters())
        peak_gb = torch.cuda.max_memory_allocated() / GiB if on_gpu else None
        reserved_gb = torch.cuda.max_memory_reserved() / GiB if on_gpu else None
        dist.destroy_process_group()
        shape = model_shape(path)
    tokens_per_s = rows * seq / seconds
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    used = params - shape.vision_params  # the batch is text: the vision tower computes nothing
    from omegaconf import OmegaConf

    plan_cfg = OmegaConf.create({"actor": {**OmegaConf.to_container(OmegaConf.structured(learner)), "world_size": 1},
                                 "model": OmegaConf.to_container(OmegaConf.structured(model)),
                                 "data": {"max_prompt_length": seq - half, "max_pixels": None, "max_frames": 0,
                                          "video_max_pixels": None},
                                 # text rows: no image or video patches through the vision tower
                                 "rollout": {"max_new_tokens": half, "sync_bucket_mb": 256, "images_per_prompt": 0,
                                             "videos_per_prompt": 0},
                                 "env": {"name": None}})  # one turn per prompt
    # The update phase's terms, without the CUDA context (the allocator's peak does not see it).
    terms = learner_memory(shape, plan_cfg, "actor", with_ref=False)
    predicted = phase_totals({"actor": terms}, False, {})["update"] - terms["context"]
    return {"device": name, "dtype": dtype, "layers": layers, "rows": rows, "seq": seq, "checkpointing": checkpointing,
            "params": params, "params_used": used, "step_s": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(6 * used * tokens_per_s / (peak * 1e12), 4) if peak else None,
            "peak_mem_gb": round(peak_gb, 2) if peak_gb is not None else None,
            "peak_reserved_gb": round(reserved_gb, 2) if reserved_gb is not None else None,
            "plan_gb": round(predicted, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--config", default="bundled:configs/qwen2_5_vl_3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None, help="also write the summary here")
    args = ap.parse_args()
    import torch

    refusal = unusable_gpu_error(torch.cuda.is_available(), gpu_present(), torch.__version__, torch.version.cuda)
    if refusal:
        print(json.dumps({"error": refusal}, indent=2))
        sys.exit(2)
    deadline = time.monotonic() + args.budget_s
    left = lambda share: max(1.0, (deadline - time.monotonic()) * share)
    gpus = torch.cuda.device_count()
    summary: dict = {"gpus": gpus, "device": torch.cuda.get_device_name() if gpus else "cpu"}
    if gpus:
        # The tests start ~17 actors and load models: most of the budget.
        summary["pytest_gpu"] = pytest_gpu(left(0.5))
        summary["colocate"] = training_steps("colocate", gpus, left(0.3))
        if gpus >= 2:
            summary["split"] = training_steps("split", gpus, left(0.4))
    summary["throughput"] = []
    for ckpt in (True, False):
        if time.monotonic() > deadline:
            break
        try:
            summary["throughput"].append(learner_throughput(args.config, args.layers, args.rows, args.seq, ckpt))
        except Exception as err:  # an out-of-memory without checkpointing is a result, not a crash
            summary["throughput"].append({"checkpointing": ckpt, "error": f"{type(err).__name__}: {err}"[:500]})
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
