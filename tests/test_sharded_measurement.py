"""Stages 4-6 on two processes (torchrun, gloo on CPU) write exactly what one process writes; stage 6 loads
each model as few times as it can."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, fast_sets

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}      # the same threads per process in both runs
SMALL = ["attack.uat_opt_texts=5", "attack.uat_eval_texts=7", "attack.uat_restarts=1", "attack.uat_max_sweeps=1",
         "attack.uat_screen_texts=2", "attack.uat_screen_keep=3", "attack.batch_size=8",
         "attack.hotflip_texts=5", "attack.hotflip_max_flips=2", "attack.gcg_texts=3", "attack.gcg_steps=3",
         "attack.gcg_search_width=12", "eval.task_limit=15"]
STAGES = ("stage_4_evaluate", "stage_5_uat_attacks", "stage_6_hotflip_attacks")
RESULTS = ("evaluation", "capabilities", "uat", "hotflip", "gcg", "gcg_surrogate", "random_search", "worst_case", "pgd")
WALL_CLOCK = {"seconds", "seconds_per_example", "search_seconds", "processes"}


def _without_clock(obj):
    if isinstance(obj, dict):
        return {k: _without_clock(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [_without_clock(v) for v in obj]
    return obj


def _measure(work, nproc: int) -> dict:
    sets = fast_sets() + [a for kv in SMALL for a in ("--set", kv)]
    for stage in STAGES:
        launcher = [sys.executable] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        r = subprocess.run([*launcher, str(ROOT / "scripts" / f"{stage}.py"), "--work-dir", str(work), *sets],
                           capture_output=True, text=True, env=ENV, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    results = work / "seed_42" / "results"
    return {n: json.loads((results / f"{n}.json").read_text()) for n in RESULTS}


def test_two_processes_write_the_records_of_one_process(stage1_work, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(stage1_work, one)
    shutil.copytree(stage1_work, two)
    single, sharded = _measure(one, 1), _measure(two, 2)
    for name in ("evaluation", "uat", "hotflip", "gcg"):
        assert single[name]["processes"] == 1 and sharded[name]["processes"] == 2, name
    # Every record, summary, trigger, cost and transfer entry: identical (paths are relative to the work dir).
    for name in RESULTS:
        assert _without_clock(sharded[name]) == _without_clock(single[name]), name
    assert len(sharded["evaluation"]["models"]["pretrained"]["per_document"]["nll"]) == \
        sharded["evaluation"]["documents"]
    assert len(sharded["gcg"]["models"]["monotonic_init"]["examples"]) == 3


def test_stage_6_loads_each_arm_twice_per_process_whatever_the_number_of_searches(stage1_work, tmp_path, monkeypatch):
    """Every search (and PGD) runs on an arm while it is loaded; it is loaded once more, when every arm's
    searches are done, to score the others' adversarial texts (transfer) and for the worst case. (Before: once
    per search, once per search's transfer, once for the worst case and once for PGD: 10 loads per arm.)"""
    from collections import Counter

    from conftest import tiny_config
    from utils import text_attacks
    from utils.measurement import available_arms
    from utils.run.run_files import RunPaths
    work = tmp_path / "w"
    shutil.copytree(stage1_work, work)
    cfg = tiny_config(work, [("attack.hotflip_texts", "2"), ("attack.hotflip_max_flips", "1"), ("attack.gcg_texts", "2"),
                             ("attack.gcg_steps", "1"), ("attack.pgd_texts", "1"), ("attack.pgd_steps", "1")])
    paths = RunPaths(work, cfg.seed)
    loads, load = Counter(), text_attacks.load_arm
    monkeypatch.setattr(text_attacks, "load_arm", lambda path, device: (loads.update([Path(path).name]), load(path, device))[1])
    written = text_attacks.run_text_attacks(cfg, paths)
    arms = available_arms(paths)
    assert len(arms) == 3 and len(written) == 6                # 4 searches, the worst case, PGD
    assert loads == Counter({path.name: 2 for path in arms.values()}), loads
    gcg = json.loads((paths.results / "gcg.json").read_text())
    assert set(gcg["transfer"]) == set(arms) and all(set(row) == set(arms) for row in gcg["transfer"].values())


def test_a_task_limit_below_the_number_of_ranks_runs_the_task_on_rank_0_alone(stage1_work, tmp_path):
    """lm-eval refuses a rank without documents: with eval.task_limit=1 on two processes each task runs on rank 0
    alone and stage 4 writes what one process writes."""
    one, two = tmp_path / "one", tmp_path / "two"
    for work in (one, two):
        shutil.copytree(stage1_work, work)
    sets = fast_sets() + ["--set", "eval.task_limit=1"]
    for work, launcher in ((one, [sys.executable]), (two, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", "2"])):
        r = subprocess.run([*launcher, str(ROOT / "scripts" / "stage_4_evaluate.py"), "--work-dir", str(work), *sets],
                           capture_output=True, text=True, env=ENV, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    caps = [json.loads((w / "seed_42" / "results" / "capabilities.json").read_text())["models"] for w in (one, two)]
    assert caps[0] == caps[1] and all(t["n"] == 1 for m in caps[1].values() for t in m["tasks"].values())
