#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job (the repo is uploaded as the working dir).
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh [HYDRA_OVERRIDE ...]
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh +experiment=mathvista trainer.run_dir=/shared/runs/sapo-s0
#
# RAY_ADDRESS   the cluster's job server = its dashboard, http://HEAD:8265 unless the head was started
#               with another --dashboard-port (the Jobs API needs the dashboard: ray[default], and not
#               --include-dashboard=false); http://127.0.0.1:8265 through `ssh -N -L 8265:127.0.0.1:8265
#               HEAD` when the dashboard listens on the head's loopback only (`ray start`'s default).
#               RAY_API_SERVER_ADDRESS, if set, takes precedence.
# SUBMIT_ARGS   extra `ray job submit` options, e.g. "--no-wait --submission-id sapo-s0".
# NUM_THREADS   OMP/MKL threads of the driver process (actors set their own from the config); default 1.
# Passed through to the job when set here: HF_HOME HF_HUB_OFFLINE HF_ENDPOINT WANDB_MODE WANDB_PROJECT.
#
# Authentication: start the cluster with token auth (docs/running.md) and give this client its token:
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(ssh HEAD ray get-auth-token)
# or copy the head's ~/.ray/auth_token here (or point RAY_AUTH_TOKEN_PATH at a copy). Without it:
# "Token authentication is enabled but no authentication token was found" (or "Missing authentication
# token"). Only a cluster started with RAY_AUTH_MODE=disabled takes RAY_AUTH_MODE=disabled here, and
# then anyone who reaches its ports can run code on it.
# Write trainer.run_dir to storage the head node can see: the driver (and metrics.jsonl) runs there.
# `ray job submit` exits non-zero when the job fails; `ray job logs/status/stop ID` manage it later.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}
if [[ -z $address ]]; then
  echo "set RAY_ADDRESS to the job server of the cluster, e.g. RAY_ADDRESS=http://HEAD:8265 $0 ..." >&2
  exit 2
fi
threads=${NUM_THREADS:-1}
env_json="\"OMP_NUM_THREADS\": \"$threads\", \"MKL_NUM_THREADS\": \"$threads\", \"OMP_WAIT_POLICY\": \"PASSIVE\""
env_json+=", \"TOKENIZERS_PARALLELISM\": \"false\""
for var in HF_HOME HF_HUB_OFFLINE HF_ENDPOINT WANDB_MODE WANDB_PROJECT; do
  if [[ -n "${!var:-}" ]]; then
    value=${!var//\\/\\\\}
    env_json+=", \"$var\": \"${value//\"/\\\"}\""
  fi
done

# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of options
exec ray job submit --address "$address" --working-dir . \
  --runtime-env-json "{\"env_vars\": {$env_json}, \"excludes\": [\".git\"]}" ${SUBMIT_ARGS:-} \
  -- python -m sapo_ray.main "$@"
