#!/usr/bin/env bash
# The comparison study of benchmarks/RESULTS.md: SAPO against token-level (PPO, GRPO, ...) and
# sequence-level (GSPO) optimisation on the demo task, plus SAPO's ablations. Each run trains the demo
# config (`make demo`) with its overrides into benchmarks/study/<name>/ and keeps there only small text
# files: metrics.jsonl, the resolved config.yaml and command.txt, the one line that reruns it from the
# repository root (runs are deterministic on the CPU: the same command gives the same numbers).
#
#   launch/study.sh --list                  # the runs, with their overrides
#   launch/study.sh                         # every run not yet in benchmarks/study
#   launch/study.sh sapo-seed1 grpo-seed1   # these runs (again)
#   launch/study.sh --tables                # the tables and curves from the committed metrics
#
# Names end in -seed<N>; `python -m sapo_ray.compare --by-dir` groups runs by the name before it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STUDY=benchmarks/study
RUN_FIRST=()
# shellcheck source=launch/study_lib.sh
source launch/study_lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false

# Each algorithm's actor lr in the main table: of the grid's 1e-5, 2e-5 (the demo's) and 4e-5, the one with
# the highest final sampled validation accuracy on seed 0 (benchmarks/RESULTS.md).
DEMO_LR=2e-5
declare -A BEST_LR=([sapo]=$DEMO_LR [grpo]=$DEMO_LR [ppo]=$DEMO_LR [gspo]=4e-5 [soft_sapo]=4e-5)

# A run's name: <algorithm>[-lr<lr> unless the demo's]-seed<N>.
name() { if [[ $2 == "$DEMO_LR" ]]; then echo "$1-seed$3"; else echo "$1-lr$2-seed$3"; fi; }

runs() {
  # Each algorithm at the demo's learning rate, seeds 0-2; the others on seed 0.
  for alg in sapo grpo ppo gspo soft_sapo; do
    for seed in 0 1 2; do echo "$alg-seed$seed algorithm=$alg seed=$seed"; done
  done
  for alg in dapo rloo dr_grpo vc_ppo; do echo "$alg-seed0 algorithm=$alg seed=0"; done
  # Learning-rate grid on seed 0 (the demo's 2e-5 is the main table's).
  for alg in sapo grpo ppo gspo soft_sapo; do
    for lr in 1e-5 4e-5; do echo "$alg-lr$lr-seed0 algorithm=$alg actor.optim.lr=$lr seed=0"; done
  done
  # Main table: seeds 1-2 at the grid's best lr where it is not the demo's.
  for alg in sapo grpo ppo gspo soft_sapo; do
    lr=${BEST_LR[$alg]}
    [[ $lr == "$DEMO_LR" ]] && continue
    for seed in 1 2; do echo "$(name "$alg" "$lr" "$seed") algorithm=$alg actor.optim.lr=$lr seed=$seed"; done
  done
  # SAPO ablations on seed 0: segmenter, entropy top-k fraction, value anchor. `fixed` cuts every 3 tokens,
  # the granularity of entropy_topk's 30% of tokens; `low_prob` ends at the tokens sampled with p < 0.9 (the
  # warm start samples 12% of its tokens so, 6 per response; 0.7 or 0.95 would give 6 too).
  for seg in step_marker token sequence newline; do
    echo "sapo-seg_$seg-seed0 algorithm=sapo algorithm.segmenter=$seg seed=0"
  done
  echo "sapo-seg_fixed-seed0 algorithm=sapo algorithm.segmenter=fixed +algorithm.segment_options.n=3 seed=0"
  echo "sapo-seg_low_prob-seed0 algorithm=sapo algorithm.segmenter=low_prob +algorithm.segment_options.rho=0.9 seed=0"
  # GSPO with old log-probs from the learner: the demo takes them from the float32 engine while the learner
  # computes in bf16, a gap of ~2e-3 per sequence against GSPO's clip range of 3e-4 / 4e-4.
  for seed in 0 1 2; do echo "gspo-recompute-seed$seed algorithm=gspo actor.recompute_old_logp=true seed=$seed"; done
  for frac in 0.1 0.5; do echo "sapo-frac$frac-seed0 algorithm=sapo algorithm.frac=$frac seed=0"; done
  echo "sapo-anchor_seg_start-seed0 algorithm=sapo algorithm.value_anchor=seg_start seed=0"
}

tables() {
  local main=() dirs=()
  for d in "$STUDY"/*/; do [[ -f $d/metrics.jsonl ]] && dirs+=("$d"); done
  # Main table: every algorithm at the demo's lr, and the four at the grid's best where it differs.
  for alg in sapo grpo ppo gspo soft_sapo; do
    [[ ${BEST_LR[$alg]} == "$DEMO_LR" ]] && continue
    for seed in 0 1 2; do main+=("$STUDY/$(name "$alg" "${BEST_LR[$alg]}" "$seed")/"); done
  done
  for d in "${dirs[@]}"; do [[ $(basename "$d") =~ ^(sapo|grpo|ppo|gspo|gspo-recompute|dapo|rloo|dr_grpo|vc_ppo|soft_sapo)-seed[0-9]+$ ]] && main+=("$d"); done
  for metric in val/accuracy val/accuracy_greedy; do
    "$PYTHON" -m sapo_ray.compare "${main[@]}" --by-dir --metric "$metric" --out "$STUDY/${metric//\//_}.png"
  done
  # Stability (SAPO_SPEC.md section 8): the last step's running numbers and the per-step ones.
  for metric in actor/grad_norm_std actor/grad_norm_spikes actor/collapsed actor/entropy response_length/mean \
                reward/accuracy batch/groups_without_signal critic/td_error_std critic/vf_explained_var; do
    "$PYTHON" -m sapo_ray.compare "${main[@]}" --by-dir --metric "$metric" --out ''
  done
  "$PYTHON" -m sapo_ray.compare "${dirs[@]}" --by-dir --metric val/accuracy --out ''
}

study_main "$@"
