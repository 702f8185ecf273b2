# Sourced by run_all.sh and run_tests.sh: make sure .venv exists and matches
# requirements.txt (reused when it does), then put it first on PATH.
# Override the interpreter with PYTHON=/path/to/python3.11; skip with MONO_NO_VENV=1
# (then the active environment must already have the requirements).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${MONO_NO_VENV:-0}" != "1" ]; then
  _venv="${MONO_VENV:-$_root/.venv}"
  _stamp="$_venv/.requirements.sha256"
  _want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
  if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[env] installing requirements.txt into $_venv (first run only)" >&2
    "${PYTHON:-python3}" -m venv "$_venv" || { echo "error: cannot create a virtual environment at $_venv" >&2; exit 1; }
    "$_venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$_venv/bin/python" -m pip install --quiet -r "$_root/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
    "$_venv/bin/python" -c "import torch, transformers, tokenizers, safetensors, numpy" \
      || { echo "error: installing requirements.txt into $_venv failed" >&2; exit 1; }
    echo "$_want" > "$_stamp"
  else
    echo "[env] using $_venv" >&2
  fi
  export PATH="$_venv/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
