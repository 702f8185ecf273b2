#!/usr/bin/env python
"""Host memory of stage 3 on a model of Pythia's shape, measured per rank and per phase (not counted).

    python benchmarks/host_memory.py WORK [--d-model 768 --layers 12 --heads 12 --rows 50304] [--procs 2] [--json F]

Builds a Pythia-format stand-in of the given shape (tests/standins.py: pythia-160m's by default, 162M
parameters; nothing downloaded) and the Pile-layout stand-in under WORK, runs stages 0-1 of the pythia-410m
preset on them (sizes and budgets shrunk: 128-token windows, 4 optimizer steps, a 3-value recipe search of one
step each, a checkpoint and a best-weights save every 2 steps), then stage 3's monotone arm under torchrun with
PROCS gloo processes, each instrumented here (no production code changes): for every phase where the code
holds model state on the host it records the growth of the process's peak resident memory over its size on
entry (VmHWM, restarted through /proc/self/clear_refs), in bytes per parameter:
  load start       load_model: the whole fp32 start model (rank 0; the others build it on the meta device)
  shard            shard_from_main: rank 0's whole model broadcast into every rank's shard
  checkpoint       Checkpointer.save: a checkpoint with Adam's moments, each rank its shard
  best weights     Checkpointer.save_best
  gather           distributed.gather_into: the trained model into rank 0's whole copy
  movement         movement_report: the start's tensors read from its files
  save model       save_model: the final and the best export
On CPU processes the training state itself (16 bytes a parameter over the ranks) is host memory too; the
phases above are what a GPU node's host holds beside its runtime. The peak over the whole run per rank is
printed as well. utils/run/resources.py counts stages 2-3 at 4 bytes a parameter (rank 0's whole model).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PRESET = "pythia-410m"
SETS = {"device": "cpu", "model.source": "local", "data.source": "jsonl.zst", "data.seq_len": "128",
        "recovery_monotone.max_tokens": "16384", "recovery_baseline.max_tokens": "16384",
        "recovery_monotone.sweep_tokens": "4096", "recovery_baseline.sweep_tokens": "4096",
        "recovery_monotone.lr_grid_extensions": "0", "recovery_monotone.eval_interval": "2",
        "recovery_monotone.eval_windows": "8", "recovery_monotone.checkpoint_every_steps": "2",
        "monotone.cert_trials": "2", "controls.revisions": "", "controls.unconstrained_from_init": "false",
        "controls.ladder": "", "analysis.frontier": "all",
        # stage 0 checks the stand-in's test split against the attacks' text counts; the held-out tasks need no hub
        "attack.uat_opt_texts": "4", "attack.uat_eval_texts": "6", "attack.hotflip_texts": "4",
        "attack.gcg_texts": "3", "attack.pgd_texts": "1", "attack.uat_screen_texts": "2",
        "eval.tasks": "heldout_lastword,heldout_cloze", "eval.task_limit": "20"}
PHASES = {"load start": ("utils.recovery", "load_model"), "shard": ("utils.run.distributed", "shard_from_main"),
          "gather": ("utils.run.distributed", "gather_into"), "movement": ("utils.recovery", "movement_report"),
          "save model": ("utils.recovery", "save_model")}
METHODS = {"checkpoint": "save", "best weights": "save_best"}


def kib(field: str) -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":")).split()[1])


def instrument(record: dict):
    """Wrap each phase's function to record its peak growth; keep the whole run's peak in record["peak_kib"]."""
    import importlib

    import utils.train.checkpoint as checkpoint

    def measured(name, fn):
        def wrapper(*args, **kwargs):
            record["peak_kib"] = max(record["peak_kib"], kib("VmHWM"))
            Path("/proc/self/clear_refs").write_text("5")
            entry = kib("VmRSS")
            try:
                return fn(*args, **kwargs)
            finally:
                hwm = kib("VmHWM")
                record["peak_kib"] = max(record["peak_kib"], hwm)
                phase = record["phases"].setdefault(name, {"calls": 0, "growth_kib": 0})
                phase["calls"] += 1
                phase["growth_kib"] = max(phase["growth_kib"], hwm - entry)
        return wrapper

    for name, (module, attr) in PHASES.items():
        mod = importlib.import_module(module)
        setattr(mod, attr, measured(name, getattr(mod, attr)))
    for name, attr in METHODS.items():
        setattr(checkpoint.Checkpointer, attr, measured(name, getattr(checkpoint.Checkpointer, attr)))


def rank_part(out: Path, argv: list[str]) -> int:
    """Inside torchrun: stage 3 (its monotone arm), instrumented; writes out/rank<r>.json."""
    record = {"peak_kib": 0, "phases": {}}
    instrument(record)
    from utils.pipeline import STAGE
    from utils.run.cli import run_stage
    sys.argv = ["stage_3_train_monotonic.py", *argv]
    code = run_stage(STAGE["stage_3_train_monotonic"], "stage 3 (host memory benchmark)")
    record["peak_kib"] = max(record["peak_kib"], kib("VmHWM"))
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({**record, "exit": code}))
    return code


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-part":
        return rank_part(Path(sys.argv[2]), sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--rows", type=int, default=50304, help="embedding rows (Pythia's 50,304)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from standins import pile_layout, pythia_format_dir
    work = args.work.resolve()
    files = pile_layout(work / "standins" / "pile")
    model = work / "standins" / "pythia"
    if not (model / "config.json").exists():
        pythia_format_dir(model, d_model=args.d_model, n_layer=args.layers, n_head=args.heads, rows=args.rows,
                          pretrain_tokens=1024)
    sets = {**SETS, "model.path": str(model), **{f"data.{s}_file": str(p) for s, p in files.items()}}
    flags = ["--preset", PRESET, "--work-dir", str(work / "run"), *[a for k, v in sets.items()
                                                                    for a in ("--set", f"{k}={v}")]]
    # glibc serves every allocation over 64 KiB from its own mapping and unmaps it when freed (no adaptive
    # threshold): a phase's peak is what was alive in it, not what the allocator kept from earlier phases.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    for stage in ("stage_0_setup", "stage_1_apply_monotonicity"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / f"{stage}.py"), *flags], env=env, check=True)
    out = work / "host_memory"
    out.mkdir(exist_ok=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.procs), __file__, "--rank-part", str(out), *flags, "--force"], env=env, check=True)
    from safetensors import safe_open
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.procs)]
    print(f"stage 3, monotone arm, {n / 1e6:.1f}M parameters, {args.procs} gloo processes, "
          f"{time.time() - t0:.0f} s; host peak growth per phase, GB (bytes per parameter):")
    names = [p for p in [*PHASES, *METHODS] if any(p in r["phases"] for r in ranks)]
    for name in names:
        cells = []
        for r, rec in enumerate(ranks):
            ph = rec["phases"].get(name)
            cells.append(f"rank {r}: " + (f"{ph['growth_kib'] * 1024 / 1e9:.2f} ({ph['growth_kib'] * 1024 / n:.2f}) "
                                          f"x{ph['calls']}" if ph else "-"))
        print(f"  {name:<13} " + "   ".join(cells))
    print("  whole run     " + "   ".join(f"rank {r}: peak RSS {rec['peak_kib'] * 1024 / 1e9:.2f} GB"
                                         for r, rec in enumerate(ranks)))
    if args.json:
        args.json.write_text(json.dumps({"parameters": n, "procs": args.procs, "ranks": ranks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
