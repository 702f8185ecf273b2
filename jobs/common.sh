# Sourced by every jobs/job_<N>_<name>.sh. Arguments of the job script:
#   ROOT PRESET SEED WORK_DIR [--set KEY=VALUE ...]
# (run_all.sh passes them explicitly; from the environment only MONO_NPROC_PER_NODE, which
# run_all.sh exports to multi-process training jobs, and the site setup below.)
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

# run_stage_job STAGE: run scripts/STAGE.py; on USR1/USR2/TERM ask it to
# checkpoint (it exits 75), then requeue this job so it resumes; record the
# outcome for `run_all.sh --status`. Exit non-zero unless the stage finished,
# so that afterok never releases dependents on partial work.
#
# Several processes (MONO_NPROC_PER_NODE set by run_all.sh for stages 2-6, or a
# multi-node allocation): one srun task per node starts torchrun, which starts
# MONO_NPROC_PER_NODE ranks per node and meets the other nodes at a c10d
# rendezvous on the allocation's first node. srun's tasks cannot be signalled
# from here, so the request to checkpoint is a stop file the ranks poll
# (MONO_STOP_FILE); a signal reaching any rank stops them all.
run_stage_job() {
  local stage="$1" rc child tag nproc nnodes launcher=python
  tag="${stage}_seed${SEED}"
  case "$stage" in stage_0_setup|stage_7_aggregate|compare_variants) tag="$stage" ;; esac
  nproc="${MONO_NPROC_PER_NODE:-}"; nnodes="${SLURM_JOB_NUM_NODES:-1}"
  case "$stage" in stage_[2-6]_*|attack_pilot) ;; *) nproc=""; nnodes=1 ;; esac    # stages 0, 1 and 7: one process
  echo "[job] $stage preset=$PRESET seed=$SEED work_dir=$WORK_DIR job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0} host=$(hostname -s)"
  # Compute nodes read only what stage 0 put in the cache (models, data, lm-eval's task datasets): no job
  # after it touches the hub. MONO_HUB_ONLINE=1 lets them.
  if [ "$stage" != stage_0_setup ] && [ "${MONO_HUB_ONLINE:-0}" != 1 ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    echo "[job] hub offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1): stage 0 cached what this stage reads"
  fi
  echo "running ${SLURM_JOB_ID:-local}" > "$STATUS_DIR/$tag"
  export MONO_STOP_FILE="$STATUS_DIR/$tag.stop"
  rm -f "$MONO_STOP_FILE"
  if [ -n "$nproc" ] || [ "$nnodes" -gt 1 ]; then
    nproc="${nproc:-1}"
    local head port cpus="${SLURM_CPUS_PER_TASK:-$nproc}"
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    port="${MONO_RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}"
    export OMP_NUM_THREADS=$(( cpus / nproc > 0 ? cpus / nproc : 1 ))
    echo "[job] $nnodes node(s) x $nproc process(es); rendezvous $head:$port"
    srun --nodes "$nnodes" --ntasks-per-node 1 --cpus-per-task "$cpus" --kill-on-bad-exit=1 \
      python -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" \
        --rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "${SLURM_JOB_ID:-local}" \
        "$ROOT/scripts/$stage.py" --preset "$PRESET" --seed "$SEED" --work-dir "$WORK_DIR" "${EXTRA[@]}" &
    child=$! launcher=torchrun
    trap 'echo "[job] signal received: asking $stage to checkpoint"; touch "$MONO_STOP_FILE"' USR1 USR2 TERM
  else
    # USR1 ignored until the stage installs its handler: a warning during its imports would otherwise kill it
    # (the stop file, touched first, still tells it to stop at its first check).
    (trap '' USR1; exec python "$ROOT/scripts/$stage.py" --preset "$PRESET" --seed "$SEED" --work-dir "$WORK_DIR" \
       "${EXTRA[@]}") &
    child=$!
    trap 'echo "[job] signal received: asking $stage to checkpoint"; touch "$MONO_STOP_FILE"; kill -USR1 $child 2>/dev/null' USR1 USR2 TERM
  fi
  # Bash defers traps while a foreground command runs: the stage runs in the
  # background and we `wait`, which a trapped signal interrupts at once.
  wait "$child"; rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  trap - USR1 USR2 TERM
  # torchrun exits 1 whatever its ranks' codes: asked to stop and not done means checkpointed.
  if [ "$launcher" = torchrun ] && [ "$rc" != 0 ] && [ -f "$MONO_STOP_FILE" ]; then rc=75; fi
  rm -f "$MONO_STOP_FILE"
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
