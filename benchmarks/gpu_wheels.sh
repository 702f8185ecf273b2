#!/bin/bash
# The wheels a GPU image lacks, for benchmarks/gpu_check.sh, in one folder:
#
#   bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]      (default 3.12)
#
# GPU machines (an H200 image, many clusters' containers) ship their own Python with torch,
# transformers, accelerate, safetensors, numpy, scipy, pandas, pyarrow, fsspec, xxhash and pytest,
# but not datasets, lm_eval or zstandard. This downloads those and what they need beyond the image
# (manylinux x86-64, no dependency resolution: the image's own packages stay), and checks that the
# folder stays under 50 MiB (what travels with a working tree). On the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl; export PYTHONPATH=/tmp/site
set -euo pipefail
DIR=${1:?usage: bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]}
PY=${2:-3.12}
# The versions of requirements.txt where it pins them; the rest are what lm_eval 0.4.13 and
# datasets 5.2.0 import on the paths the pipeline takes (tasks, the HF model wrapper, utils).
pin() { grep -i "^$1==" "$(dirname "$0")/../requirements.txt" | head -1; }
WHEELS=("$(pin datasets)" "$(pin lm_eval)" "$(pin zstandard)" evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
        sacrebleu==2.6.0 more-itertools==11.2.1)
mkdir -p "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${platforms[@]}" -d "$DIR" "${WHEELS[@]}"
size=$(du -sm "$DIR" | cut -f1)
if [ "$size" -ge 50 ]; then
  echo "error: $DIR holds ${size} MiB of wheels, over the 50 MiB that travel with the working tree" >&2
  exit 1
fi
echo "$(ls "$DIR"/*.whl | wc -l) wheels, ${size} MiB in $DIR"
