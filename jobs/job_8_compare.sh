#!/usr/bin/env bash
# After an ablation grid (run_all.sh --grid): compare_variants as a SLURM job. Submitted by run_all.sh
# after every variant's stage 7; arguments: ROOT PRESET SEED WORK_DIR [--set KEY=VALUE ...]
source "${1:?ROOT}/jobs/common.sh"
run_stage_job compare_variants
