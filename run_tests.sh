#!/usr/bin/env bash
# Run the test suite:  bash run_tests.sh [MODE] [extra pytest args]
#   unit         fast tests only (no stage runs, no SLURM)
#   integration  end-to-end stage runs on the tiny preset (marked slow), no SLURM
#   slurm        the SLURM tests on a real local cluster (root starts one:
#                bash scripts/slurm_local_cluster.sh start)
#   all          everything, with a coverage report of configs/ and utils/ (default; what CI runs)
#   coverage     the same, plus an HTML report in htmlcov/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${1:-}" in -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
MODE="${1:-all}"; [ $# -gt 0 ] && shift
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
case "$MODE" in
  unit|fast) exec python -m pytest -m "not slow and not slurm" "$@" ;;
  integration) exec python -m pytest -m "slow and not slurm" "$@" ;;
  slurm) exec python -m pytest -m slurm "$@" ;;
  all) exec python -m pytest --cov=configs --cov=utils --cov-report=term "$@" ;;
  coverage) exec python -m pytest --cov=configs --cov=utils --cov-report=term --cov-report=html "$@" ;;
  *) echo "error: unknown mode '$MODE' (unit, integration, slurm, coverage, all)" >&2; exit 2 ;;
esac
