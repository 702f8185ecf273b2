#!/usr/bin/env bash
# Stage 0 (stage_0_setup) as a SLURM job. Submitted by run_all.sh with its resources,
# log path and dependencies; arguments: ROOT PRESET SEED WORK_DIR [--set KEY=VALUE ...]
source "${1:?ROOT}/jobs/common.sh"
run_stage_job stage_0_setup
