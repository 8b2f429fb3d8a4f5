#!/usr/bin/env bash
# Hydra multirun: every algorithm x seed as its own run, one after another, then the comparison.
#
#   launch/sweep.sh                                    # sapo vs grpo, seeds 0-2, the embedded default
#   ALGORITHMS=sapo,grpo,ppo SEEDS=0,1 launch/sweep.sh trainer.steps=100
#   RAY_ADDRESS=HEAD_IP:6379 launch/sweep.sh +experiment=mathvista   # every run joins that cluster
#
# Extra arguments are Hydra overrides applied to every run. Runs land in SWEEP_DIR/<n>-<alg>-seed<s>/
# (metrics.jsonl, .hydra/config.yaml, checkpoints); SWEEP_DIR defaults to multirun/<date>/<time>.
# Without RAY_ADDRESS each run starts and stops a local Ray cluster; with it, each run is a driver of
# that cluster. The last step prints the table of val/accuracy per algorithm (mean ± std over seeds)
# and writes SWEEP_DIR/curves.png (see `python -m sapo_ray.compare --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ALGORITHMS=${ALGORITHMS:-sapo,grpo}
SEEDS=${SEEDS:-0,1,2}
SWEEP_DIR=${SWEEP_DIR:-multirun/$(date +%Y-%m-%d)/$(date +%H-%M-%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false

python -m sapo_ray.main -m "algorithm=$ALGORITHMS" "seed=$SEEDS" "hydra.sweep.dir=$SWEEP_DIR" "$@"
python -m sapo_ray.compare "$SWEEP_DIR" --metric "${METRIC:-val/accuracy}" --out "$SWEEP_DIR/curves.png"
