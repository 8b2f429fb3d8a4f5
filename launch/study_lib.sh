# What launch/study.sh and launch/agent_study.sh share (sourced by them). The caller sets STUDY (the runs'
# parent directory), PYTHON, RUN_FIRST (overrides every run starts with, may be empty) and defines runs()
# (lines "<name> <overrides...>") and tables(); then `study_main "$@"`.

# One run into $STUDY/<name>, keeping only small text files: metrics.jsonl, the resolved config.yaml and
# command.txt, the line that reruns it from the repository root (runs are deterministic on the CPU).
study_run() {
  local name=$1; shift
  local dir=$STUDY/$name
  local args=("${RUN_FIRST[@]}" "$@" "trainer.run_dir=$dir" trainer.resume=never "trainer.loggers=[console,jsonl]"
              trainer.export_hf=false)
  echo "== $name: python -m sapo_ray.main ${args[*]}"
  rm -rf "$dir"
  mkdir -p "$dir"
  local start=$SECONDS
  "$PYTHON" -m sapo_ray.main "${args[@]}"
  echo "== $name: $((SECONDS - start)) s"
  echo "python -m sapo_ray.main ${args[*]}" > "$dir/command.txt"
  rm -rf "$dir/checkpoints" "$dir/generations"
}

# --list, --tables, the named runs, or every run not yet in $STUDY; then the tables.
study_main() {
  case "${1:-}" in
    --list) runs; exit 0 ;;
    --tables) tables; exit 0 ;;
  esac
  if (($#)); then
    for name in "$@"; do
      line=$(runs | awk -v n="$name" '$1 == n')
      [[ -n $line ]] || { echo "unknown run $name ($0 --list)" >&2; exit 2; }
      # shellcheck disable=SC2086
      study_run $line
    done
  else
    runs | while read -r name overrides; do
      # shellcheck disable=SC2086
      [[ -f $STUDY/$name/command.txt ]] || study_run "$name" $overrides
    done
  fi
  tables
}
