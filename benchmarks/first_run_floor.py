#!/usr/bin/env python
"""The least time a finished tiny seed could have taken on this machine: the work its records count, at the
matmul peak.

    python benchmarks/first_run_floor.py WORK_DIR [--seed N] [--json out.json]

WORK_DIR is a finished `run_all.sh --local` work dir. Every token the seed's runs computed is read from what
they wrote: stage 0's pretraining (shared/manifest.json), the recoveries with their recipe searches and the
ladder (results/training_*.json), the perplexities (evaluation.json), UAT's searches and transfer rescoring
(uat.json), and every stage-6 search's exact cost per text (gcg, gcg_surrogate where it ran, random_search,
hotflip, pgd). Each token costs 2N FLOPs forward, with N the model's matmul parameters (the unembedding
included, attention's own products left out); a training token 6N; an attack's embedding-gradient pass 4N
(forward, and backward to the inputs only). Evaluation windows during training, lm-eval's tasks, model loads,
tokenization and Python are not counted, so the floor is a lower bound. It is set against the fp32 `torch.mm`
peak on the same threads and against the stage times the run logged (local/history.tsv).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utils  # noqa: E402,F401
from benchmarks.bench_attacks import matmul_gflops  # noqa: E402
from utils.model.modeling import load_model  # noqa: E402

STAGE_6_SEARCHES = ("gcg", "gcg_surrogate", "random_search", "hotflip")


def matmul_parameters(model_dir: Path) -> int:
    model = load_model(model_dir)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_tokens(record: dict) -> int:
    """Tokens an arm's stage trained: each searched value's prefix and cooldown, the rest of the run for the
    values taken to full length, and the arm's own run where it did not go on from one of those."""
    full = record["history"]["tokens"]
    sweep = record.get("lr_sweep") or {}
    rows = sweep.get("rows", [])
    tokens = sum(r["prefix_tokens"] + r["cooldown_tokens"] for r in rows)
    confirmed = [r for r in rows if "full_val_loss" in r]
    tokens += sum(full - r["prefix_tokens"] for r in confirmed)
    if not any(r["lr"] == sweep.get("chosen_lr") for r in confirmed):
        tokens += full - (sweep.get("sweep_tokens", 0) if rows else 0)
    return tokens


def stage_counts(work: Path, seed: int) -> dict:
    """{stage: (forward tokens, training tokens, gradient tokens)} of one seed (stage 0 shared)."""
    res = work / f"seed_{seed}" / "results"
    load = lambda p: json.loads(Path(p).read_text())                              # noqa: E731
    counts = {"stage_0": [0, load(work / "shared" / "manifest.json")["pretrain"]["tokens"], 0]}
    train = {2: 0, 3: 0}
    for f in res.glob("training_*.json"):
        train[2 if f.stem == "training_baseline" else 3] += training_tokens(load(f))
    counts["stage_2"], counts["stage_3"] = [0, train[2], 0], [0, train[3], 0]
    counts["stage_4"] = [sum(m["tokens"] for m in load(res / "evaluation.json")["models"].values()), 0, 0]
    fwd = grad = 0
    for m in load(res / "uat.json")["models"].values():
        for c in (m["search_cost"], m["transfer_cost"]):
            fwd, grad = fwd + c["forward_tokens"], grad + c["gradient_tokens"]
    counts["stage_5"] = [fwd, 0, grad]
    fwd = grad = 0
    for name in [n for n in STAGE_6_SEARCHES if (res / f"{n}.json").is_file()]:      # the searches that ran
        for m in load(res / f"{name}.json")["models"].values():
            if "same_as" in m:                  # another search's records, not run again
                continue
            for e in m["examples"] + (m.get("control_examples") or []):
                c = e.get("cost") or {}
                fwd, grad = fwd + c.get("forward_tokens", 0), grad + c.get("gradient_tokens", 0)
    for m in (load(res / "pgd.json")["models"] if (res / "pgd.json").is_file() else {}).values():
        for e in m["examples"]:
            c = e.get("cost") or {}
            fwd, grad = fwd + c.get("forward_tokens", 0), grad + c.get("gradient_tokens", 0)
    counts["stage_6"] = [fwd, 0, grad]
    return counts


def logged_seconds(work: Path, seed: int) -> dict:
    """Each stage's wall time from local/history.tsv, summed over its runs (a rerun that skipped it adds ~0):
    from each logged start to the next one, or to its log's last write if sooner (the last stage)."""
    rows = [line.split("\t") for line in (work / "local" / "history.tsv").read_text().splitlines()[1:]]
    out = {}
    for i, (_, stage, s, log, start) in enumerate(rows):
        if stage != "stage_0_setup" and int(s) != seed:
            continue
        ends = [float(rows[i + 1][4])] if i + 1 < len(rows) else []
        ends += [Path(log).stat().st_mtime] if Path(log).is_file() else []
        key = "stage_" + stage.split("_")[1]
        out[key] = out.get(key, 0.0) + min(ends, default=float(start)) - float(start)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dir", type=Path)
    p.add_argument("--seed", type=int, help="default: the first seed_N in WORK_DIR")
    p.add_argument("--json")
    args = p.parse_args()
    work = args.work_dir
    seeds = sorted(int(d.name[5:]) for d in work.glob("seed_*") if (d / "results" / "hotflip.json").is_file())
    if not seeds:
        sys.exit(f"error: no finished seed in {work} (seed_N/results/hotflip.json)")
    seed = args.seed if args.seed is not None else seeds[0]
    n = matmul_parameters(work / "shared" / "models" / "pretrained")
    peak = matmul_gflops()
    counts = stage_counts(work, seed)
    logged = logged_seconds(work, seed)
    rows, total_floor, total_logged = {}, 0.0, 0.0
    print(f"seed {seed}: N = {n:,} matmul parameters; fp32 torch.mm peak {peak:.0f} GFLOP/s on "
          f"{torch.get_num_threads()} threads")
    print(f"{'stage':8} {'forward':>9} {'training':>9} {'gradient':>9} {'TFLOP':>7} {'floor s':>8} {'logged s':>9}")
    for stage, (fwd, trained, grad) in counts.items():
        tflop = (2 * n * fwd + 6 * n * trained + 4 * n * grad) / 1e12
        floor = tflop * 1e3 / peak
        rows[stage] = {"forward_tokens": fwd, "training_tokens": trained, "gradient_tokens": grad,
                       "tflop": tflop, "floor_s": floor, "logged_s": logged.get(stage)}
        total_floor += floor
        total_logged += logged.get(stage, 0.0)
        print(f"{stage:8} {fwd / 1e6:8.2f}M {trained / 1e6:8.2f}M {grad / 1e6:8.2f}M {tflop:7.1f} {floor:8.0f} "
              f"{logged.get(stage, float('nan')):9.0f}")
    print(f"{'total':8} {'':>9} {'':>9} {'':>9} {sum(r['tflop'] for r in rows.values()):7.1f} {total_floor:8.0f} "
          f"{total_logged:9.0f}  (stages 1 and 7 not counted)")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": seed, "matmul_parameters": n, "matmul_gflops": peak,
                                               "threads": torch.get_num_threads(), "stages": rows,
                                               "floor_s": total_floor, "logged_s": total_logged}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
