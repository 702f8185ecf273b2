"""The attack pilot's grid (utils/attack_pilot.py): every budget it runs, as the AttackConfig each search runs
with. Config arithmetic only: utils/run/time_limits.py counts the same list before anything is submitted."""
from __future__ import annotations

import dataclasses

from configs.experiment_config import AttackConfig

STEP_FACTORS = (0.25, 0.5, 1, 2, 4)         # GCG steps and UAT sweep caps, x the preset's
FLIPS = (1, 2, 5, 10, 20, None)             # None: every position of the text
PILOT_TEXTS = 8                             # attacked texts per arm (scripts/attack_pilot.py --texts)


def pilot_runs(a: AttackConfig) -> dict:
    """Every search the pilot runs on each arm and text, each as the AttackConfig it runs with: the one list that
    run_pilot runs and utils/run/time_limits.py counts (unbounded flips: a.text_len, every position)."""
    steps = [max(1, round(f * a.gcg_steps)) for f in STEP_FACTORS]
    sweeps = [max(1, round(f * a.uat_max_sweeps)) for f in STEP_FACTORS]
    return {"gcg_steps": steps,
            "gcg": [_with(a, gcg_steps=steps[-1], gcg_search_width=w * a.gcg_search_width, gcg_top_k=k * a.gcg_top_k)
                    for w in (1, 2) for k in (1, 4)],
            "hotflip": [_with(a, hotflip_top_k=k) for k in (max(1, a.hotflip_top_k // 2), a.hotflip_top_k,
                                                            2 * a.hotflip_top_k, 4 * a.hotflip_top_k)],
            "flips": [_with(a, hotflip_max_flips=f or a.text_len) for f in FLIPS],
            "uat_sweeps": sweeps,
            "uat": _with(a, uat_max_sweeps=sweeps[-1]) if a.uat_search == "beam" else None}


def _with(a: AttackConfig, **changes) -> AttackConfig:
    return dataclasses.replace(a, **changes)
