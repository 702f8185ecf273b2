#!/usr/bin/env bash
# Run the test suite:  bash run_tests.sh [fast|all|coverage] [extra pytest args]
#   fast      unit tests (skips tests marked slow)
#   all       everything (default; what CI runs)
#   coverage  everything, with a coverage report for configs/, utils/ and scripts/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${1:-all}"; [ $# -gt 0 ] && shift
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
case "$MODE" in
  fast) exec python -m pytest -m "not slow" "$@" ;;
  all) exec python -m pytest "$@" ;;
  coverage) exec python -m pytest --cov=configs --cov=utils --cov=scripts --cov-report=term "$@" ;;
  *) echo "error: unknown mode '$MODE' (fast, all, coverage)" >&2; exit 2 ;;
esac
