# Sourced by every jobs/job_<N>_<name>.sh. Arguments of the job script:
#   ROOT PRESET SEED WORK_DIR [--set KEY=VALUE ...]
# (run_all.sh passes them explicitly; nothing is taken from the inherited environment.)
#
# Site setup: if jobs/site.sh exists (or MONO_SITE_SETUP names a file) it is
# sourced first: put `module load`, conda activation etc. there, and set
# MONO_NO_VENV=1 if it provides the Python environment. Otherwise .venv is used
# (created from requirements.txt on first use).
set -uo pipefail
ROOT="$1"; PRESET="$2"; SEED="$3"; WORK_DIR="$4"; shift 4
EXTRA=("$@")
cd "$ROOT" || exit 1
SITE="${MONO_SITE_SETUP:-$ROOT/jobs/site.sh}"
[ -f "$SITE" ] && source "$SITE"
source "$ROOT/scripts/ensure_env.sh"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}"
STATUS_DIR="$WORK_DIR/slurm/status"
mkdir -p "$STATUS_DIR"

# run_stage_job STAGE: run scripts/STAGE.py; forward USR1/USR2/TERM to it (it
# checkpoints and exits 75), then requeue this job so it resumes; record the
# outcome for `run_all.sh --status`. Exit non-zero unless the stage finished,
# so that afterok never releases dependents on partial work.
run_stage_job() {
  local stage="$1" rc child tag
  tag="${stage}_seed${SEED}"
  [ "$stage" = stage_0_setup ] && tag="$stage"
  [ "$stage" = stage_7_aggregate ] && tag="$stage"
  echo "[job] $stage preset=$PRESET seed=$SEED work_dir=$WORK_DIR job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0} host=$(hostname -s)"
  echo "running ${SLURM_JOB_ID:-local}" > "$STATUS_DIR/$tag"
  python "$ROOT/scripts/$stage.py" --preset "$PRESET" --seed "$SEED" --work-dir "$WORK_DIR" "${EXTRA[@]}" &
  child=$!
  # Bash defers traps while a foreground command runs: the stage runs in the
  # background and we `wait`, which a trapped signal interrupts at once.
  trap 'echo "[job] signal received: asking $stage to checkpoint"; kill -USR1 $child 2>/dev/null' USR1 USR2 TERM
  wait "$child"; rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  trap - USR1 USR2 TERM
  if [ "$rc" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${MONO_NO_REQUEUE:-0}" != 1 ]; then
    echo "requeued ${SLURM_JOB_ID}" > "$STATUS_DIR/$tag"
    echo "[job] $stage checkpointed; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 75
  fi
  if [ "$rc" = 0 ]; then
    echo "done ${SLURM_JOB_ID:-local}" > "$STATUS_DIR/$tag"
  else
    echo "failed ${SLURM_JOB_ID:-local} rc=$rc" > "$STATUS_DIR/$tag"
  fi
  echo "[job] $stage exited $rc"
  exit "$rc"
}
