#!/bin/bash
# The GPU checks in one command, on a GPU machine's own Python, from the repository root:
#
#   bash benchmarks/gpu_wheels.sh .whl                     # here, once: what the GPU image lacks (16 MiB)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # there
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh OUT_DIR
#
# It uses the image's python3, torch and transformers (no venv). First it checks, in one line, that the
# commands and packages it needs are there; then it runs four parts, each with its own time limit (TERM,
# then KILL 15 s later: the stages checkpoint on TERM) and its log under OUT_DIR; a failing part does not
# stop the others. The benchmarks run first and alone on the GPU, then the tests and the pipeline side by
# side (tiny models: process starts and Python dominate, and the machine has the cores). 8 files come
# back to OUT_DIR: the 5 logs, the 2 benchmark JSONs and the pipeline's report.
#   bench_training  Pythia-1.4B-shaped recovery steps at the pythia-1.4b preset's micro-batch and
#                   accumulation: tokens/s, MFU, peak memory (baseline and the monotone arm)
#   bench_attacks   Pythia-1.4B shape at the preset's attack and eval sizes: Victim.nll candidates/s,
#                   seconds per GCG step, perplexity tokens/s
#   tests_resume    the GPU-specific tests with deterministic kernels (MONO_DETERMINISTIC=1,
#                   CUBLAS_WORKSPACE_CONFIG): a 1-process NCCL torchrun of stage 3 (FSDP2, DCP save,
#                   SIGKILL, bitwise resume) first, the 1-process bitwise resume, the best weights' export
#   tests_records   stages 4-6's records on CUDA, recomputed by fresh fp32 forwards on the CPU at their
#                   precision's tolerance
#   pipeline        every stage of the tiny preset end to end on CUDA (device=auto resolves to cuda,
#                   precision to bf16-mixed) at the tests' small budgets, with test_pipeline_local's checks
# Its limits add up to 390 s; from the first H200 run (docs/cluster.md, "The GPU check") it takes about
# 300 s there. The exit status is the number of parts that failed (2: a missing command or
# package, or no CUDA). GPU_CHECK_CPU=1 runs the parts that need no CUDA (tests, pipeline) on a CPU: the
# GPU image's stand-in (docs/cluster.md).
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

for cmd in python3 ps timeout; do
  command -v "$cmd" >/dev/null || { echo "error: '$cmd' is not on PATH: gpu_check.sh needs python3, ps and timeout" >&2; exit 2; }
done
python3 - <<'EOF' || exit 2
import importlib, os, sys
# lm_eval's tasks and HF wrapper import what lm_eval itself does not (sacrebleu, portalocker, ...).
need = ["torch", "transformers", "accelerate", "safetensors", "tokenizers", "numpy", "scipy", "pyarrow", "fsspec",
        "matplotlib", "pytest", "datasets", "lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface", "zstandard"]
found, missing = {}, []
for name in need:
    try:
        module = importlib.import_module(name)
        if "." not in name:
            found[name] = getattr(module, "__version__", "?")
    except Exception as e:                                # an import error of any kind is a missing package
        missing.append(f"{name} ({e})")
if missing:
    sys.exit(f"error: python3 lacks {', '.join(missing)}: build the wheel folder with "
             "'bash benchmarks/gpu_wheels.sh DIR', install it with --no-index --no-deps --target and set PYTHONPATH")
import torch
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_CPU") != "1":
    sys.exit("error: no CUDA device here: gpu_check.sh is for a GPU machine")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (GPU_CHECK_CPU=1)"
print("python", sys.version.split()[0], "device", device, "cuda", torch.version.cuda,
      " ".join(f"{k} {v}" for k, v in found.items()))
EOF
cuda=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')

RC=$(mktemp -d)
part() {     # part NAME LIMIT COMMAND...: its log in OUT/NAME.log, its exit status in RC/NAME
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$rc" >"$RC/$name"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s; its log ends:"
  tail -n "${TAIL_LINES:-20}" "$OUT/$name.log"
}

# The benchmarks first and alone on the GPU (their timings), their CPU halves skipped: those figures are
# this machine's CPU, not the GPU's.
if [ "$cuda" = 1 ]; then
  part bench_training "${LIMIT_TRAINING:-90}" python3 benchmarks/bench_training.py --gpu-only --steps 3 \
    --json "$OUT/bench_training_gpu.json"
  part bench_attacks "${LIMIT_ATTACKS:-60}" python3 benchmarks/bench_attacks.py --only throughput --gpu-only \
    --json "$OUT/bench_attacks_gpu.json"
else
  echo "=== bench_training, bench_attacks: skipped (no CUDA device)"
fi

# Then the tests (two parts) and the pipeline side by side: tiny models, where process starts and Python
# dominate (on an H200 each stage run took 20-35 s, most of it starting). The GPU-specific tests only,
# NCCL/FSDP2/DCP first (pytest keeps the order given). On CPU the NCCL test skips itself and the stages
# resolve to fp32 unless MONO__PRECISION=bf16-mixed is set.
DETERMINISTIC=(env MONO_DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8)
TAIL_LINES=30 part tests_resume "${LIMIT_TESTS:-240}" "${DETERMINISTIC[@]}" \
  python3 -m pytest -v -p no:cacheprovider -o addopts="--durations=8" \
  tests/test_distributed.py::test_one_nccl_process_checkpoints_and_resumes_bitwise \
  tests/test_training.py::test_resume_after_sigkill_is_bitwise_identical \
  tests/test_training.py::test_the_best_weights_are_kept_sharded_and_exported_once_at_the_end &
TAIL_LINES=30 part tests_records "${LIMIT_TESTS:-240}" "${DETERMINISTIC[@]}" \
  python3 -m pytest -v -p no:cacheprovider -o addopts="--durations=8" \
  tests/test_measured_records.py -k "not time_limits" &

# tests/test_stages.py's settings for the whole pipeline (every stage, small budgets).
PIPELINE=$(mktemp -d)
part pipeline "${LIMIT_PIPELINE:-240}" python3 test_pipeline_local.py --work-dir "$PIPELINE" \
  --set pretrain.max_tokens=120000 --set controls.pretrain_snapshots=40000 \
  --set recovery_baseline.max_tokens=60000 --set recovery_monotone.max_tokens=60000 \
  --set recovery_baseline.lr_grid= --set recovery_monotone.lr_grid= --set monotone.cert_trials=16 \
  --set eval.task_limit=40 --set attack.uat_opt_texts=6 --set attack.uat_eval_texts=8 --set attack.uat_restarts=1 \
  --set attack.uat_max_sweeps=2 --set attack.hotflip_texts=10 --set attack.hotflip_max_flips=3 \
  --set attack.hotflip_top_k=16 --set attack.gcg_texts=4 --set attack.gcg_steps=6 --set attack.gcg_search_width=16 \
  --set attack.pgd_texts=2 --set attack.pgd_steps=3 &
wait
cp "$PIPELINE/final/results.md" "$OUT/pipeline_results.md" 2>/dev/null
rm -rf "$PIPELINE"

failed=0
for f in "$RC"/*; do
  [ "$(cat "$f")" = 0 ] || { echo "=== failed: $(basename "$f")"; failed=$((failed + 1)); }
done
rm -rf "$RC"
echo "=== $failed part(s) failed"
exit "$failed"
