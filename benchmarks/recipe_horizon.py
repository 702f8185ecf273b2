#!/usr/bin/env python
"""Which learning rate does a recipe search pick at which horizon? For one arm of a work dir where stages 0 and 1
ran: each lr's full run (the preset's recipe) and, per prefix, the run's first PREFIX tokens followed by the
search's cooldown (utils.train.training.train's `branch`), validation loss of each and the full run's test
perplexity (stage 4's protocol). Prints one JSON line per lr (docs/ablations.md, "The recipe search's horizon").

    python benchmarks/recipe_horizon.py --work-dir W --arm baseline --lrs 1e-4,3e-4,1e-3,3e-3 --prefixes 40000,130000
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402,F401  (registers monotone_gelu)
from configs.presets import load_config  # noqa: E402
from utils.data.tokenization import TokenFile, load_tokenizer  # noqa: E402
from utils.model.modeling import load_model  # noqa: E402
from utils.model.monotonicity import release_constraint  # noqa: E402
from utils.run.compute import Compute  # noqa: E402
from utils.run.run_files import RunPaths  # noqa: E402
from utils.stages import heldout_perplexity  # noqa: E402
from utils.train.training import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--arm", choices=("baseline", "monotonic", "unconstrained_from_init"), required=True)
    ap.add_argument("--lrs", required=True)
    ap.add_argument("--prefixes", default="")
    args = ap.parse_args()
    cfg = load_config(args.preset, [("work_dir", args.work_dir), ("seed", str(args.seed))])
    paths = RunPaths(Path(args.work_dir), args.seed)
    compute = Compute.from_config(cfg.device, cfg.precision)
    train_tok, val_tok, test_tok = (TokenFile(paths.shared / "tokens", s) for s in ("train", "val", "test"))
    eos = load_tokenizer(paths.shared / "tokenizer").eos_token_id
    start = paths.shared / "models" / "pretrained" if args.arm == "baseline" else paths.models / "monotonic_init"
    recipe = cfg.recovery_baseline if args.arm == "baseline" else cfg.recovery_monotone
    per_step = recipe.micro_batch_size * recipe.grad_accum_steps * cfg.data.seq_len

    def fresh():
        model = load_model(start, "float32", compute.device)
        if args.arm == "unconstrained_from_init":
            release_constraint(model)
        return model

    for lr in (float(v) for v in args.lrs.split(",")):
        r, row = dataclasses.replace(recipe, lr=lr), {"arm": args.arm, "lr": lr}
        for prefix in (int(v) for v in args.prefixes.split(",") if v):
            k = max(1, round(prefix / per_step))
            row[f"prefix_{prefix}"] = train(fresh(), train_tok.tokens, val_tok.tokens, r, cfg.data.seq_len, cfg.seed,
                                            compute, desc=f"lr {lr:g} prefix {prefix}",
                                            branch=(k, max(1, round(r.cooldown_fraction * k))))["val_loss"]
        model = fresh()
        row["full_run"] = train(model, train_tok.tokens, val_tok.tokens, r, cfg.data.seq_len, cfg.seed, compute,
                                desc=f"lr {lr:g} full")["val_loss"]
        row["test_perplexity"] = heldout_perplexity(model, test_tok, eos, cfg, compute)["perplexity"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
