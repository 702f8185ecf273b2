#!/usr/bin/env bash
# Run the whole pipeline: stage 0 once, stages 1-6 per seed, stage 7 over all seeds.
#   bash run_all.sh --local                  # in this shell, no SLURM (embedded tiny preset by default)
#   bash run_all.sh --preset pythia-1.4b --seeds 42,1337,2024     # submit the job graph to SLURM
#   bash run_all.sh --dry-run ...            # print the sbatch commands (stdout), submit and create nothing
#   bash run_all.sh --status --work-dir DIR  # what ran, what failed, where the logs are
#   bash run_all.sh --pilot --preset pythia-1.4b   # stages 0-1, then the attack pilot only (docs/measurement.md):
#                                            # the budgets where the attacks plateau, as --set lines for the run
#                                            # (--pilot-texts N: attacked texts per arm, default 8)
#   bash run_all.sh --local --seeds 42,1337,2024 --grid monotone.construction=softplus_abs,signed_units,projected
#                                            # an ablation: each variant its own run in WORK/variants/<name>
# Options: --preset NAME (tiny) --seeds 42[,S...] --work-dir DIR (./work) --set KEY=VALUE (to every stage)
#   --grid KEY=V1,V2 (repeatable: every combination) runs stage 0 and each distinct baseline arm once, then
#   stages 1 and 3-7 per variant, sharing both (utils/run/grid.py), then WORK/final/comparison.md.
# SLURM settings (environment): MONO_SLURM_PARTITION, MONO_SLURM_ACCOUNT, MONO_SLURM_QOS,
#   MONO_SLURM_GPU (gres for stages 1-6: default gpu:1 if the config's device is cuda, else none;
#   set non-empty to request it whatever the device; empty = none), MONO_SLURM_CPUS (8),
#   MONO_SLURM_MEM (64G; CPU-only stages: MONO_SLURM_CPU_MEM, 16G), MONO_SLURM_TIME_<N> (per stage;
#   default: stages 2-6 derived from the config's counted work, scripts/time_limits.py; --dry-run explains),
#   MONO_SLURM_SIGNAL (USR1) and MONO_SLURM_SIGNAL_LEAD (120 s) for preemption, MONO_SLURM_EXTRA (more sbatch flags).
#   Training stages 2-3 on several GPUs: MONO_SLURM_GPUS_PER_NODE (processes per node: GPUs, or CPU processes
#   when device=cpu) and MONO_SLURM_NODES (1); they run as srun + torchrun (FSDP2), CPUs and memory per node.
#   Measurement stages 4-6 sharded over several processes of one node: MONO_SLURM_MEASURE_PROCS (GPUs, or CPU
#   processes when device=cpu); each rank takes a share of the documents, texts or candidate batches.
# --local on CPU runs stages 4 and 6 the same way, as MONO_LOCAL_PROCS processes under torchrun (default: one
#   per core, at most 8; they write what one process writes; stage 6 1.6x faster on 2 cores); 1 = one process.
# If sbatch rejects a job, the jobs of this run already submitted are cancelled (exit 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
MODE=slurm; PILOT=0; PILOT_TEXTS=8; PRESET=tiny; SEEDS=42; WORK_DIR="$ROOT/work"; SETS=(); GRID=()
while [ $# -gt 0 ]; do
  case "$1" in
    --local) MODE=local ;;
    --dry-run) MODE=dry ;;
    --status) MODE=status ;;
    --pilot) PILOT=1 ;;
    --pilot-texts) PILOT_TEXTS="${2:?--pilot-texts needs a value}"; shift ;;
    --preset) PRESET="${2:?--preset needs a value}"; shift ;;
    --seeds) SEEDS="${2:?--seeds needs a value}"; shift ;;
    --work-dir) WORK_DIR="${2:?--work-dir needs a value}"; shift ;;
    --set) SETS+=(--set "${2:?--set needs KEY=VALUE}"); shift ;;
    --grid) GRID+=(--grid "${2:?--grid needs KEY=V1,V2,...}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$SEEDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: --seeds must be comma-separated integers, got '$SEEDS'" >&2; exit 2; }
IFS=, read -ra SEED_LIST <<< "$SEEDS"
[[ "$PILOT_TEXTS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --pilot-texts must be a positive integer, got '$PILOT_TEXTS'" >&2; exit 2; }
[ "$PILOT" = 0 ] || [ ${#GRID[@]} -eq 0 ] || { echo "error: --pilot sets the attack budgets of one config: run it without --grid" >&2; exit 2; }
DUPLICATE=$(printf '%s\n' "${SEED_LIST[@]}" | sort | uniq -d | head -n1)
[ -z "$DUPLICATE" ] || { echo "error: --seeds lists seed $DUPLICATE more than once ('$SEEDS'): its stages would run twice on the same files" >&2; exit 2; }
WORK_DIR="$(realpath -m "$WORK_DIR")"
# A dry run creates nothing and --status only reads; anything else writes the work dir.
if [ "$MODE" != dry ] && [ "$MODE" != status ] && ! { mkdir -p "$WORK_DIR" 2>/dev/null && [ -w "$WORK_DIR" ]; }; then
  echo "error: cannot write to work dir $WORK_DIR (a read-only file system or no permission): copy it somewhere writable (cp -a) to rerun it; --status reads it as it is" >&2
  exit 1
fi
exec 3>&1                                                              # stdout, also inside $(submit ...)
# record_job TSV ID STAGE SEED LOG: a job of this invocation (TSV: its jobs.tsv, which a failed
# submission cancels) and of the work dir's history.tsv beside it (every invocation's; --status).
record_job() {
  local tsv="$1" history; shift
  history="$(dirname "$tsv")/history.tsv"
  [ -f "$history" ] || printf 'job_id\tstage\tseed\tlog\tunix_time\n' > "$history"
  printf '%s\t%s\t%s\t%s\n' "$@" >> "$tsv"
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" "$(date +%s.%N)" >> "$history"
}

PER_SEED_STAGES=(stage_1_apply_monotonicity stage_2_train_baseline stage_3_train_monotonic
                 stage_4_evaluate stage_5_uat_attacks stage_6_hotflip_attacks)

if [ "$MODE" = status ]; then
  exec python3 "$ROOT/scripts/pipeline_status.py" "$WORK_DIR"
fi

source "$ROOT/scripts/ensure_env.sh"
# DONE: the stages 0-6 already done for the current work dir and config, as " N:SEED " words, read in
# one process (scripts/stages_done.py). The first call also fails early, before anything runs or
# is submitted, on a bad preset or override.
read_done() {
  local out err rc=0
  DONE=" "
  [ "${1:-}" = --validate ] || compgen -G "$WORK_DIR/seed_*/flags/*.done" >/dev/null || return 0
  err="$(mktemp)"
  out="$(python "$ROOT/scripts/stages_done.py" --preset "$PRESET" --work-dir "$WORK_DIR" "${SETS[@]}" \
    --seeds "$SEEDS" 2>"$err")" || rc=$?
  if [ "$rc" != 0 ]; then
    grep '^error:' "$err" >&2 || cat "$err" >&2
    rm -f "$err"; return 1
  fi
  rm -f "$err"
  DONE=" $(tr ' \n' ': ' <<< "$out")"
}
read_done --validate || exit 2
is_done() { [[ "$DONE" == *" $1:$2 "* ]]; }   # is_done N SEED
# An ablation grid: one line per variant, NAME then its overrides, tab-separated (scripts/grid.py).
VARIANTS=()
if [ ${#GRID[@]} -gt 0 ]; then
  PLAN="$(python "$ROOT/scripts/grid.py" plan --preset "$PRESET" "${SETS[@]}" "${GRID[@]}")" || exit 2
  mapfile -t VARIANTS <<< "$PLAN"
fi
MAIN_WORK="$WORK_DIR"; MAIN_SETS=("${SETS[@]+"${SETS[@]}"}"); VTAG=""; VNAME=""; OWNER=""
enter_variant() {  # enter_variant I: WORK_DIR, SETS, VTAG, VNAME and OWNER become variant I's
  local parts kv             # (its run dir, overrides, job tag, name and baseline owner: - main, else a variant)
  IFS=$'\t' read -ra parts <<< "${VARIANTS[$1]}"
  VNAME="${parts[0]}"; OWNER="${parts[1]}"
  WORK_DIR="$MAIN_WORK/variants/$VNAME"; SETS=("${MAIN_SETS[@]+"${MAIN_SETS[@]}"}"); VTAG="-v$1"
  for kv in "${parts[@]:2}"; do SETS+=(--set "$kv"); done
}
main_baseline_used() {  # does some variant use the main run's baseline (so that the main run trains it)?
  local v parts
  for v in "${VARIANTS[@]}"; do IFS=$'\t' read -ra parts <<< "$v"; [ "${parts[1]}" = - ] && return 0; done
  return 1
}
leave_variant() { WORK_DIR="$MAIN_WORK"; SETS=("${MAIN_SETS[@]+"${MAIN_SETS[@]}"}"); VTAG=""; VNAME=""; OWNER=""; }

# -- local: the same graph, in this shell -------------------------------------
# Each stage's output also goes to WORK_DIR/local/logs/<stage>[_seed<S>].log, and
# WORK_DIR/local/{jobs.tsv,status/} record the run as SLURM runs are recorded, so
# `run_all.sh --status` reports local runs too.
if [ "$MODE" = local ]; then
  local_record() {  # the run record of the current work dir (a variant has its own)
    LOCAL_DIR="$WORK_DIR/local"
    mkdir -p "$LOCAL_DIR/logs" "$LOCAL_DIR/status"
    printf 'job_id\tstage\tseed\tlog\n' > "$LOCAL_DIR/jobs.tsv"
  }
  local_record
  # Stages 4 and 6 on a CPU: one single-threaded process per core (at most 8) beats one process on every core
  # for the attack core's small matrices (stage 6 of a tiny seed: 541 s against 862 s on 2 cores). Not stage
  # 5: UAT shards each query's few candidate batches, and waiting on each other cost more (161 s against 105).
  CORES=$(nproc)
  LOCAL_PROCS="${MONO_LOCAL_PROCS:-}"
  if [ -z "$LOCAL_PROCS" ]; then
    LOCAL_PROCS=$(( CORES < 8 ? CORES : 8 ))
    DEVICE=$(python "$ROOT/scripts/config_value.py" --preset "$PRESET" "${SETS[@]}" device) || exit 2
    if [ "$DEVICE" = cuda ] || { [ "$DEVICE" = auto ] && nvidia-smi -L >/dev/null 2>&1; }; then LOCAL_PROCS=1; fi
  fi
  [[ "$LOCAL_PROCS" =~ ^[1-9][0-9]*$ ]] || { echo "error: MONO_LOCAL_PROCS must be a positive integer, got '$LOCAL_PROCS'" >&2; exit 2; }
  RAN=0        # once a stage has run, later ones may depend on its new outputs: their scripts decide
  run() {  # run STAGE SEED [extra args]
    local stage="$1" seed="$2" tag log rc=0 n; shift 2
    tag="${stage}_seed$seed"
    case "$stage" in stage_0_setup|stage_7_aggregate|compare_variants) tag="$stage" ;; esac
    log="$LOCAL_DIR/logs/$tag.log"
    record_job "$LOCAL_DIR/jobs.tsv" local "$stage" "$seed" "$log"
    n="${stage#stage_}"; n="${n%%_*}"
    if [ "$RAN" = 0 ] && [[ "$n" =~ ^[0-6]$ ]] && is_done "$n" "$seed"; then
      echo "skip: $tag already done" | tee -a "$log" >&2
      echo "done local" > "$LOCAL_DIR/status/$tag"; return 0
    fi
    RAN=1
    echo "running local" > "$LOCAL_DIR/status/$tag"
    echo "=== $stage (preset $PRESET, seed $seed) ===" | tee -a "$log"
    local launch=(python)
    if [ "$LOCAL_PROCS" -gt 1 ] && [[ "$stage" =~ ^(stage_[46]_|attack_pilot) ]]; then
      launch=(env OMP_NUM_THREADS=$(( CORES / LOCAL_PROCS > 0 ? CORES / LOCAL_PROCS : 1 ))
              python -m torch.distributed.run --standalone --nproc_per_node "$LOCAL_PROCS")
    fi
    "${launch[@]}" "$ROOT/scripts/$stage.py" --preset "$PRESET" --seed "$seed" --work-dir "$WORK_DIR" "${SETS[@]}" "$@" \
      2>&1 | tee -a "$log" || rc=$?
    if [ "$rc" = 0 ]; then echo "done local" > "$LOCAL_DIR/status/$tag"; return 0; fi
    if [ "$rc" = 130 ] || [ "$rc" = 75 ]; then
      echo "interrupted local rc=$rc" > "$LOCAL_DIR/status/$tag"
      echo "error: $stage (seed $seed) was interrupted; rerun the same command to resume (log: $log)" >&2
    else
      echo "failed local rc=$rc" > "$LOCAL_DIR/status/$tag"
      echo "error: $stage failed for seed $seed (log: $log); outputs so far are in $WORK_DIR" >&2
    fi
    exit 1
  }
  run stage_0_setup "${SEED_LIST[0]}"
  if [ "$PILOT" = 1 ]; then
    run stage_1_apply_monotonicity "${SEED_LIST[0]}"
    run attack_pilot "${SEED_LIST[0]}" --texts "$PILOT_TEXTS"
    echo "=== the attack pilot is done: $WORK_DIR/seed_${SEED_LIST[0]}/results/attack_pilot.md; run the pipeline with its --set lines ==="
    exit 0
  fi
  if [ ${#VARIANTS[@]} -eq 0 ]; then
    for seed in "${SEED_LIST[@]}"; do
      for stage in "${PER_SEED_STAGES[@]}"; do run "$stage" "$seed"; done
    done
    run stage_7_aggregate "${SEED_LIST[0]}" --seeds "$SEEDS"
    echo "=== all stages done; outputs in $WORK_DIR (logs: $LOCAL_DIR/logs) ==="
    exit 0
  fi
  if main_baseline_used; then for seed in "${SEED_LIST[@]}"; do run stage_2_train_baseline "$seed"; done; fi
  for i in "${!VARIANTS[@]}"; do
    enter_variant "$i"
    python "$ROOT/scripts/grid.py" link --work-dir "$MAIN_WORK" --seeds "$SEEDS" --baseline-from "$OWNER" "$VNAME" \
      || exit 1
    local_record
    read_done || exit 1
    for seed in "${SEED_LIST[@]}"; do
      for stage in "${PER_SEED_STAGES[@]}"; do    # stage 2: only in the variant that owns its baseline
        [ "$stage" = stage_2_train_baseline ] && [ "$OWNER" != "$VNAME" ] || run "$stage" "$seed"
      done
    done
    run stage_7_aggregate "${SEED_LIST[0]}" --seeds "$SEEDS"
  done
  leave_variant
  LOCAL_DIR="$WORK_DIR/local"
  run compare_variants "${SEED_LIST[0]}"
  echo "=== all stages of ${#VARIANTS[@]} variant(s) done; comparison in $WORK_DIR/final/comparison.md ==="
  exit 0
fi

# -- SLURM: one job per stage and seed, chained with afterok ------------------
command -v sbatch >/dev/null || [ "$MODE" = dry ] || {
  echo "error: sbatch not found; on a machine without SLURM use --local" >&2; exit 2; }
LOG_DIR="$WORK_DIR/slurm/logs"
JOBS_TSV="$WORK_DIR/slurm/jobs.tsv"
SUBMIT_ERROR="$WORK_DIR/slurm/.submit_error"      # stage, seed, sbatch's reason of a rejected submission
SBATCH_ERR="$WORK_DIR/slurm/.sbatch_stderr"
[ "$MODE" = dry ] || mkdir -p "$LOG_DIR"
rm -f "$SUBMIT_ERROR" "$SBATCH_ERR"
[ "$MODE" = dry ] || printf 'job_id\tstage\tseed\tlog\n' > "$JOBS_TSV"
# GPU for stages 1-6: MONO_SLURM_GPU if set (empty: none); else gpu:1 only if the
# resolved config (preset, MONO__* environment, --set) has device=cuda.
DEVICE=$(python "$ROOT/scripts/config_value.py" --preset "$PRESET" "${SETS[@]}" device) || exit 2
if [ -n "${MONO_SLURM_GPU+set}" ]; then GPU_GRES="$MONO_SLURM_GPU"
elif [ "$DEVICE" = cuda ]; then GPU_GRES=gpu:1
else GPU_GRES=""; fi
# Multi-process training (stages 2-3): processes per node and nodes.
TRAIN_NODES="${MONO_SLURM_NODES:-1}"; TRAIN_PROCS="${MONO_SLURM_GPUS_PER_NODE:-}"
[[ "$TRAIN_NODES" =~ ^[1-9][0-9]*$ ]] || { echo "error: MONO_SLURM_NODES must be a positive integer, got '$TRAIN_NODES'" >&2; exit 2; }
[ -z "$TRAIN_PROCS" ] || [[ "$TRAIN_PROCS" =~ ^[1-9][0-9]*$ ]] || {
  echo "error: MONO_SLURM_GPUS_PER_NODE must be a positive integer, got '$TRAIN_PROCS'" >&2; exit 2; }
[ "$TRAIN_NODES" = 1 ] || TRAIN_PROCS="${TRAIN_PROCS:-1}"
MEASURE_PROCS="${MONO_SLURM_MEASURE_PROCS:-}"
[ -z "$MEASURE_PROCS" ] || [[ "$MEASURE_PROCS" =~ ^[1-9][0-9]*$ ]] || {
  echo "error: MONO_SLURM_MEASURE_PROCS must be a positive integer, got '$MEASURE_PROCS'" >&2; exit 2; }
gres_for() {  # gres_for N: the GPU gres with N GPUs (gpu[:type]:N), or none
  [ -n "$GPU_GRES" ] || return 0
  if [[ "$GPU_GRES" =~ :[0-9]+$ ]]; then echo "${GPU_GRES%:*}:$1"; else echo "$GPU_GRES:$1"; fi
}
TRAIN_GRES="$GPU_GRES"                    # gpu[:type]:N with N = processes per node
[ -z "$TRAIN_PROCS" ] || TRAIN_GRES="$(gres_for "$TRAIN_PROCS")"
MEASURE_GRES="$GPU_GRES"
[ -z "$MEASURE_PROCS" ] || MEASURE_GRES="$(gres_for "$MEASURE_PROCS")"
declare -A TIME MEM
# derive_limits: every job's time limit and --mem (scripts/time_limits.py, which --dry-run makes explain itself on
# stderr): stages 2-6 from the current config's counted work and a stated throughput, the others fixed; none
# over the cluster's own limit (the partition's MaxTime, the QOS's MaxWall, or MONO_SLURM_MAX_TIME), and a
# stage that cannot fit even in requeued jobs is refused here, before anything is submitted. --mem from each
# job's counted host memory (utils/run/resources.py). MONO_SLURM_TIME_<N>, MONO_SLURM_MEM and
# MONO_SLURM_CPU_MEM override them.
derive_limits() {
  local n t out explain=()
  [ "$MODE" = dry ] && explain=(--explain)
  out=$(python "$ROOT/scripts/time_limits.py" --preset "$PRESET" "${SETS[@]+"${SETS[@]}"}" \
        --gpu "$([ -n "$GPU_GRES" ] && echo 1 || echo 0)" --train-procs "$(( ${TRAIN_PROCS:-1} * TRAIN_NODES ))" \
        --train-nodes "$TRAIN_NODES" \
        --measure-procs "${MEASURE_PROCS:-1}" --pilot-texts "$PILOT_TEXTS" "${explain[@]+"${explain[@]}"}") || return 1
  while read -r n t m; do [ -n "$n" ] && TIME[$n]="$t" && MEM[$n]="$m"; done <<< "$out"
  return 0
}
derive_limits || exit 2
JOB_FILE=([0]=job_0_setup [1]=job_1_monotonicity [2]=job_2_baseline [3]=job_3_monotonic [4]=job_4_evaluate
          [5]=job_5_uat [6]=job_6_hotflip [7]=job_7_aggregate [8]=job_8_compare [9]=job_9_pilot)
STAGE_NAME=([0]=stage_0_setup [1]=stage_1_apply_monotonicity [2]=stage_2_train_baseline
            [3]=stage_3_train_monotonic [4]=stage_4_evaluate [5]=stage_5_uat_attacks
            [6]=stage_6_hotflip_attacks [7]=stage_7_aggregate [8]=compare_variants   # 8: after a --grid
            [9]=attack_pilot)                                                      # 9: --pilot

# submit N SEED DEPS -> prints the job id ("" if skipped: done, and nothing it depends on was submitted).
# Runs in a $(...) subshell: if sbatch rejects the job it writes $SUBMIT_ERROR and
# returns 1; the caller then runs abort_submission in the main shell.
submit() {
  local n="$1" seed="$2" deps="$3" tag log time_var opts=()
  tag="${STAGE_NAME[$n]}_seed$seed"; [ "$n" = 0 ] || [ "$n" = 7 ] || [ "$n" = 8 ] && tag="${STAGE_NAME[$n]}"
  if [ -z "$deps" ] && [ "$n" -lt 7 ] && is_done "$n" "$seed"; then
    echo "skip: $tag already done" >&2; return 0
  fi
  log="$LOG_DIR/${tag}_%j.log"
  time_var="MONO_SLURM_TIME_$n"
  opts+=(--parsable --job-name "mono-$n-s$seed$VTAG" --output "$log" --time "${!time_var:-${TIME[$n]}}"
         --kill-on-invalid-dep=yes --cpus-per-task "${MONO_SLURM_CPUS:-8}")
  if [ "$n" = 0 ] || [ "$n" = 7 ] || [ "$n" = 8 ]; then
    opts+=(--mem "${MONO_SLURM_CPU_MEM:-${MEM[$n]}}")
  elif { [ "$n" = 2 ] || [ "$n" = 3 ]; } && [ -n "$TRAIN_PROCS" ]; then     # srun + torchrun, see jobs/common.sh
    opts+=(--mem "${MONO_SLURM_MEM:-${MEM[$n]}}" --nodes "$TRAIN_NODES" --ntasks-per-node 1
           --export "ALL,MONO_NPROC_PER_NODE=$TRAIN_PROCS")
    [ -n "$TRAIN_GRES" ] && opts+=(--gres "$TRAIN_GRES")
  elif [ "$n" -ge 4 ] && [ -n "$MEASURE_PROCS" ]; then   # stages 4-6 and the pilot: one node, torchrun shards
    opts+=(--mem "${MONO_SLURM_MEM:-${MEM[$n]}}" --nodes 1 --ntasks-per-node 1
           --export "ALL,MONO_NPROC_PER_NODE=$MEASURE_PROCS")
    [ -n "$MEASURE_GRES" ] && opts+=(--gres "$MEASURE_GRES")
  else
    opts+=(--mem "${MONO_SLURM_MEM:-${MEM[$n]}}")
    [ -n "$GPU_GRES" ] && opts+=(--gres "$GPU_GRES")
  fi
  if [ "$n" -ge 2 ] && [ "$n" -le 6 ]; then   # training checkpoints, stages 4-6 keep each arm measured: requeue
    opts+=(--signal "B:${MONO_SLURM_SIGNAL:-USR1}@${MONO_SLURM_SIGNAL_LEAD:-120}" --requeue --open-mode=append)
  fi
  [ -n "${MONO_SLURM_PARTITION:-}" ] && opts+=(--partition "$MONO_SLURM_PARTITION")
  [ -n "${MONO_SLURM_ACCOUNT:-}" ] && opts+=(--account "$MONO_SLURM_ACCOUNT")
  [ -n "${MONO_SLURM_QOS:-}" ] && opts+=(--qos "$MONO_SLURM_QOS")
  [ -n "$deps" ] && opts+=(--dependency "afterok:$deps")
  # shellcheck disable=SC2206
  [ -n "${MONO_SLURM_EXTRA:-}" ] && opts+=($MONO_SLURM_EXTRA)
  local args=("$ROOT" "$PRESET" "$seed" "$WORK_DIR" "${SETS[@]}")
  [ "$n" = 7 ] && args+=(--seeds "$SEEDS")
  [ "$n" = 9 ] && args+=(--texts "$PILOT_TEXTS")
  if [ "$MODE" = dry ]; then
    echo "sbatch ${opts[*]} $ROOT/jobs/${JOB_FILE[$n]}.sh ${args[*]}" >&3
    echo "<job_${n}_s${seed}${VTAG}>"
    return 0
  fi
  local id rc=0
  id=$(sbatch "${opts[@]}" "$ROOT/jobs/${JOB_FILE[$n]}.sh" "${args[@]}" 2>"$SBATCH_ERR") || rc=$?
  id="${id%%;*}"
  if [ "$rc" != 0 ] || ! [[ "$id" =~ ^[0-9]+$ ]]; then
    local reason
    reason=$(grep -m1 . "$SBATCH_ERR" || true)
    [ -n "$reason" ] || reason="sbatch exited $rc and printed job id '$id'"
    printf '%s\t%s\t%s\n' "${STAGE_NAME[$n]}" "$seed" "$reason" > "$SUBMIT_ERROR"
    return 1
  fi
  cat "$SBATCH_ERR" >&2        # sbatch's warnings, if any
  record_job "$JOBS_TSV" "$id" "${STAGE_NAME[$n]}" "$seed" "${log//%j/$id}"
  echo "submitted $tag as job $id" >&2
  echo "$id"
}

# abort_submission: a submission failed; cancel every job of this run submitted so
# far (jobs.tsv), say why, exit 1. Nothing of a half-submitted graph stays queued.
abort_submission() {
  local stage seed reason ids=()
  if [ -s "$SUBMIT_ERROR" ]; then
    IFS=$'\t' read -r stage seed reason < "$SUBMIT_ERROR"
    echo "error: sbatch rejected $stage (seed $seed): $reason" >&2
  else
    echo "error: submitting the job graph failed (see the messages above)" >&2
  fi
  mapfile -t ids < <(for tsv in "${JOB_TSVS[@]}"; do tail -n +2 "$tsv" | cut -f1; done)
  if [ ${#ids[@]} -gt 0 ]; then
    if scancel "${ids[@]}"; then
      echo "cancelled the ${#ids[@]} job(s) of this run already submitted: ${ids[*]}" >&2
    else
      echo "scancel reported errors; check that none of the ${#ids[@]} job(s) of this run is left: squeue -j $(join "${ids[@]}" | tr : ,)" >&2
    fi
  else
    echo "no job of this run had been submitted" >&2
  fi
  rm -f "$SUBMIT_ERROR" "$SBATCH_ERR"
  exit 1
}

join() { local IFS=:; echo "$*"; }
ids() { local out=(); for x in "$@"; do [ -n "$x" ] && out+=("$x"); done; join "${out[@]+"${out[@]}"}"; }

# submit_seed_chains: stages 1-6 of every seed, then stage 7 over them (J7). Stage 2 is taken from J2
# when a grid submitted it once for all variants, else submitted here.
declare -A J2 J2_MAIN J2_OWN      # J2: this chain's baseline jobs; J2_OWN[VARIANT:SEED]: those a variant trains
submit_seed_chains() {
  local seed n j j1 j2 j3 deps all=()
  for seed in "${SEED_LIST[@]}"; do
    j1=$(submit 1 "$seed" "$(ids "$J0")") || abort_submission
    if [ -n "${J2[$seed]+set}" ]; then j2="${J2[$seed]}"
    else j2=$(submit 2 "$seed" "$(ids "$J0")") || abort_submission; J2_OWN[$VNAME:$seed]="$j2"; fi
    j3=$(submit 3 "$seed" "$(ids "$j1")") || abort_submission
    deps=$(ids "$j2" "$j3")
    for n in 4 5 6; do j=$(submit "$n" "$seed" "$deps") || abort_submission; all+=("$j"); done
  done
  J7=$(submit 7 "${SEED_LIST[0]}" "$(ids "${all[@]}")") || abort_submission
}

JOB_TSVS=("$JOBS_TSV")            # every jobs.tsv this submission writes (a grid variant has its own)
J0=$(submit 0 "${SEED_LIST[0]}" "") || abort_submission
if [ "$PILOT" = 1 ]; then
  J1=$(submit 1 "${SEED_LIST[0]}" "$(ids "$J0")") || abort_submission
  J9=$(submit 9 "${SEED_LIST[0]}" "$(ids "$J1")") || abort_submission
  rm -f "$SBATCH_ERR"
  if [ "$MODE" = dry ]; then echo "(dry run: nothing submitted; job ids above are placeholders)" >&2; exit 0; fi
  echo "the attack pilot submitted (job $J9), after stages 0-1; nothing else. When it is done, run the pipeline with"
  echo "the --set lines it recommends: $WORK_DIR/seed_${SEED_LIST[0]}/results/attack_pilot.md (stages 0-1 are kept)"
  exit 0
fi
if [ ${#VARIANTS[@]} -gt 0 ]; then
  if main_baseline_used; then
    for seed in "${SEED_LIST[@]}"; do J2_MAIN[$seed]=$(submit 2 "$seed" "$(ids "$J0")") || abort_submission; done
  fi
  AGGREGATES=()
  for i in "${!VARIANTS[@]}"; do
    enter_variant "$i"
    LOG_DIR="$WORK_DIR/slurm/logs"; JOBS_TSV="$WORK_DIR/slurm/jobs.tsv"
    if [ "$MODE" != dry ]; then            # links to stage 0 and the baselines (dangling until they exist)
      python "$ROOT/scripts/grid.py" link --work-dir "$MAIN_WORK" --seeds "$SEEDS" --baseline-from "$OWNER" "$VNAME" \
        || abort_submission
      mkdir -p "$LOG_DIR"; printf 'job_id\tstage\tseed\tlog\n' > "$JOBS_TSV"; JOB_TSVS+=("$JOBS_TSV")
    fi
    read_done || abort_submission
    derive_limits || abort_submission
    J2=()                                  # the baseline jobs this variant waits for; none: it trains its own
    for seed in "${SEED_LIST[@]}"; do
      if [ "$OWNER" = - ]; then J2[$seed]="${J2_MAIN[$seed]}"
      elif [ "$OWNER" != "$VNAME" ]; then J2[$seed]="${J2_OWN[$OWNER:$seed]}"; fi
    done
    submit_seed_chains
    AGGREGATES+=("$J7")
  done
  leave_variant
  LOG_DIR="$WORK_DIR/slurm/logs"; JOBS_TSV="$WORK_DIR/slurm/jobs.tsv"
  J8=$(submit 8 "${SEED_LIST[0]}" "$(ids "${AGGREGATES[@]}")") || abort_submission
  rm -f "$SBATCH_ERR"
  if [ "$MODE" = dry ]; then echo "(dry run: nothing submitted; job ids above are placeholders)" >&2; exit 0; fi
  echo "all jobs of ${#VARIANTS[@]} variant(s) submitted (comparison: job $J8). Watch them:"
  echo "  bash run_all.sh --status --work-dir $WORK_DIR   # the shared stages, then each variant"
  exit 0
fi
submit_seed_chains
rm -f "$SBATCH_ERR"
if [ "$MODE" = dry ]; then
  echo "(dry run: nothing submitted; job ids above are placeholders)" >&2
  exit 0
fi
echo "all jobs submitted (aggregate: job $J7). Watch them:"
echo "  squeue -u ${USER:-$(id -un)}            # queue"
echo "  bash run_all.sh --status --work-dir $WORK_DIR   # per stage: done / running / failed, with log paths"
echo "  logs: $LOG_DIR"
