#!/usr/bin/env bash
# The attack pilot (scripts/attack_pilot.py) as a SLURM job: submitted by run_all.sh --pilot after stage 1 of the
# first seed, and nothing after it; arguments: ROOT PRESET SEED WORK_DIR [--set KEY=VALUE ...]
source "${1:?ROOT}/jobs/common.sh"
run_stage_job attack_pilot
