#!/bin/bash
# The GPU checks in one command, on a CUDA machine, from the repository root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Prints the device and library versions, then runs, each part with its own time
# limit and log under OUT_DIR (a failing part does not stop the others):
#   bench_training  Pythia-1.4B-shaped training step at the pythia-1.4b preset's micro-batch:
#                   tokens/s, MFU, peak memory
#   bench_attacks   Pythia-1.4B-shaped exact candidate scoring: candidates/s
#   pipeline        every stage of the tiny preset end to end on CUDA (device=auto
#                   resolves to cuda, precision to bf16-mixed), with test_pipeline_local's checks
#   tests           the GPU-sensitive tests (tiny preset, so on CUDA too) with deterministic
#                   kernels (MONO_DETERMINISTIC=1, CUBLAS_WORKSPACE_CONFIG): exact resume, a
#                   1-process NCCL torchrun of stage 3 (FSDP2, DCP save, SIGKILL, bitwise resume),
#                   monotonicity certificates, attack records that recompute
# The exit status is the number of parts that failed. Figures go to OUT_DIR/*_gpu.json.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0

part() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-20}" "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

python -c 'import torch, transformers, sys
if not torch.cuda.is_available(): sys.exit("error: no CUDA device here: gpu_check.sh is for a GPU machine")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "device", torch.cuda.get_device_name())' || exit 2

part bench_training "${LIMIT_TRAINING:-100}" python benchmarks/bench_training.py --steps 6 \
  --json "$OUT/bench_training_gpu.json"
part bench_attacks "${LIMIT_ATTACKS:-60}" python benchmarks/bench_attacks.py --only throughput --json "$OUT/bench_attacks_gpu.json"
part pipeline "${LIMIT_PIPELINE:-150}" python test_pipeline_local.py --work-dir /tmp/gpu_pipeline --keep \
  --set pretrain.max_tokens=120000 --set eval.task_limit=40
cp /tmp/gpu_pipeline/results/results.md "$OUT/pipeline_results.md" 2>/dev/null
TAIL_LINES=40 part tests "${LIMIT_TESTS:-200}" env MONO_DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 \
  python -m pytest -v -p no:cacheprovider tests/test_monotonicity.py tests/test_training.py tests/test_attacks.py tests/test_measured_records.py \
  tests/test_distributed.py -k "not frozen_ablation and not signal and (not distributed or nccl)"
echo "=== $failed part(s) failed"
exit "$failed"
