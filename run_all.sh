#!/usr/bin/env bash
# Run the pipeline: every stage, for every seed.
#   bash run_all.sh --local                      # embedded tiny preset, no download, no GPU
#   bash run_all.sh --local --preset tiny --seeds 42,1337,2024 --work-dir /tmp/run
# Extra --set KEY=VALUE arguments are passed to every stage.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
LOCAL=0; PRESET=tiny; SEEDS=42; WORK_DIR="$ROOT/work"; SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --local) LOCAL=1 ;;
    --preset) PRESET="${2:?--preset needs a value}"; shift ;;
    --seeds) SEEDS="${2:?--seeds needs a value}"; shift ;;
    --work-dir) WORK_DIR="${2:?--work-dir needs a value}"; shift ;;
    --set) SETS+=(--set "${2:?--set needs KEY=VALUE}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$LOCAL" != 1 ]; then
  echo "error: SLURM submission is not built yet; run with --local" >&2
  exit 2
fi
[[ "$SEEDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: --seeds must be comma-separated integers, got '$SEEDS'" >&2; exit 2; }

source "$ROOT/scripts/ensure_env.sh"
mkdir -p "$WORK_DIR"
WORK_DIR="$(cd "$WORK_DIR" && pwd)"

# Stage 0 is shared by all seeds; the others run once per seed, in order.
PER_SEED_STAGES=(stage_1_apply_monotonicity stage_2_train_baseline stage_3_train_monotonic
                 stage_4_evaluate stage_5_uat_attacks stage_6_hotflip_attacks)

run() {  # run STAGE SEED
  echo "=== $1 (preset $PRESET, seed $2) ==="
  if ! python "$ROOT/scripts/$1.py" --preset "$PRESET" --seed "$2" --work-dir "$WORK_DIR" "${SETS[@]}"; then
    echo "error: $1 failed for seed $2; outputs so far are in $WORK_DIR" >&2
    exit 1
  fi
}

IFS=, read -ra SEED_LIST <<< "$SEEDS"
run stage_0_setup "${SEED_LIST[0]}"
for seed in "${SEED_LIST[@]}"; do
  for stage in "${PER_SEED_STAGES[@]}"; do run "$stage" "$seed"; done
done
echo "=== stage_7_aggregate (seeds $SEEDS) ==="
python "$ROOT/scripts/stage_7_aggregate.py" --preset "$PRESET" --work-dir "$WORK_DIR" --seeds "$SEEDS" "${SETS[@]}" \
  || { echo "error: stage_7_aggregate failed; per-seed outputs are in $WORK_DIR" >&2; exit 1; }
echo "=== all stages done; outputs in $WORK_DIR ==="
