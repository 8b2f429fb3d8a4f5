#!/usr/bin/env bash
# The study of turn-level credit (benchmarks/RESULTS.md, "The agent demo and turn-level credit"): on the
# agent demo's tool-using episodes (`+experiment=agent_demo`), SAPO with each turn a segment against SAPO
# with entropy segments, PPO, GRPO and GSPO, seeds 0-2 at the demo's lr and an lr grid on seed 0. Each run
# goes into benchmarks/agent_study/<name>/ and keeps only small text files: metrics.jsonl, the resolved
# config.yaml and command.txt (the line that reruns it from the repository root; runs are deterministic on
# the CPU).
#
#   launch/agent_study.sh --list                      # the runs, with their overrides
#   launch/agent_study.sh                             # every run not yet in benchmarks/agent_study
#   launch/agent_study.sh ppo-seed0 sapo_turn-seed0   # these runs (again)
#   launch/agent_study.sh --tables                    # the tables from the committed metrics
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STUDY=benchmarks/agent_study
RUN_FIRST=(+experiment=agent_demo)
# shellcheck source=launch/study_lib.sh
source launch/study_lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false

# name and overrides of each variant, at the demo's lr (2e-5).
variants() {
  echo "sapo_turn algorithm=sapo algorithm.segmenter=turn"
  echo "sapo_entropy algorithm=sapo algorithm.segmenter=entropy_topk"
  echo "ppo algorithm=ppo"
  echo "grpo algorithm=grpo"
  # A sequence-level ratio: the old log-probs from the learner itself, as algorithm validation asks of GSPO.
  echo "gspo algorithm=gspo actor.recompute_old_logp=true"
}

runs() {
  for seed in 0 1 2; do
    variants | while read -r name overrides; do echo "$name-seed$seed $overrides seed=$seed"; done
  done
  # The lr grid, on seed 0: each variant at half and twice the demo's lr.
  for lr in 1e-5 4e-5; do
    variants | while read -r name overrides; do echo "$name-lr$lr-seed0 $overrides actor.optim.lr=$lr seed=0"; done
  done
}

tables() {
  local dirs=()
  for d in "$STUDY"/*/; do [[ -f $d/metrics.jsonl ]] && dirs+=("$d"); done
  for metric in val/accuracy val/accuracy_greedy; do
    "$PYTHON" -m sapo_ray.compare "${dirs[@]}" --by-dir --metric "$metric" --out "$STUDY/${metric//\//_}.png"
  done
  for metric in val/episode/tool_calls val/episode/tool_errors reward/accuracy critic/vf_explained_var \
                episode/acc_with_tools; do
    "$PYTHON" -m sapo_ray.compare "${dirs[@]}" --by-dir --metric "$metric" --out ''
  done
}

study_main "$@"
