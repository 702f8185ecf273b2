"""Ablation grids: each variant of the monotone configuration as its own run under one work dir.

`run_all.sh --grid monotone.construction=softplus_abs,signed_units,projected` lays a work dir out as

    WORK/shared/                        stage 0, once
    WORK/seed_<S>/                      stage 2, the baseline arm, once per seed
    WORK/variants/<name>/               a complete run per variant (its stages 1 and 3-7), where
        shared -> ../../shared              stage 0 is a link, and so is each seed's baseline:
        seed_<S>/models/baseline -> ../../../../seed_<S>/models/baseline   (and the files below)
    WORK/final/comparison.{json,md}     the variants side by side (utils/results/comparison.py)

Sharing is exact only if no variant changes what stage 0 reads, so a grid may vary monotone,
recovery_monotone, recovery_baseline, eval, attack and controls.unconstrained_from_init. A variant
that sets recovery_baseline trains the baseline of its settings in its own dir, once: the first
variant with those settings owns it and later ones link to it (its "baseline owner"). Every
variant is compared with its own baseline. Links are relative, so a copied or moved work dir
keeps working, and may point at baseline files that stage 2 has not written yet (SLURM creates
them before the jobs run).
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from configs.experiment_config import ConfigError
from configs.presets import load_config
from utils.run.run_files import PipelineError

SHARED_SECTIONS = ("model", "data", "pretrain", "precision")          # stage 0 (and every arm) reads these
STAGE_0_KEYS = ("controls.pretrain_snapshots", "controls.revisions")  # stage 0's controls
MAIN = "-"                          # the baseline owner of variants that keep the main run's recovery_baseline
# What stage 2 writes into a seed directory (tests/test_grid.py checks this against its flag).
BASELINE_OUTPUTS = ("models/baseline", "models/baseline_best", "results/training_baseline.json",
                    "results/training_baseline.history.jsonl", "results/config_stage_2_train_baseline.json",
                    "flags/stage_2_train_baseline.done")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` per --grid flag -> [(KEY, [V1, V2])]; keys the shared stages read are refused."""
    axes, problems = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            problems.append(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        elif "." not in key or key.split(".", 1)[0] in SHARED_SECTIONS or key in STAGE_0_KEYS:
            problems.append(f"--grid {key}: stage 0 reads it, so the variants could not share it; grid a key of "
                            f"monotone, recovery_monotone, recovery_baseline, eval, attack or controls.unconstrained_from_init")
        elif key in (k for k, _ in axes):
            problems.append(f"--grid names {key} twice")
        elif len(set(vals)) != len(vals):
            problems.append(f"--grid {key} lists a value twice")
        else:
            axes.append((key, vals))
    if problems:
        raise ConfigError("; ".join(problems))
    return axes


def baseline_owners(plan: list[tuple[str, list[tuple[str, str]]]]) -> list[str]:
    """Per variant, whose baseline it uses: MAIN (the main run's, when it sets no recovery_baseline key),
    else the first variant with the same recovery_baseline settings (itself, if it is that first one)."""
    first, owners = {}, []
    for name, pairs in plan:
        key = tuple(sorted((k, v) for k, v in pairs if k.startswith("recovery_baseline.")))
        owners.append(first.setdefault(key, name) if key else MAIN)
    return owners


def variants(preset: str, sets: list[tuple[str, str]], specs: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every combination of the grid's values: (name, its overrides), each validated as a whole config."""
    axes = parse_grid(specs)
    leaves = [key.rsplit(".", 1)[1] for key, _ in axes]
    short = len(set(leaves)) == len(leaves)                 # name variants by field, section only if needed
    out = []
    for values in itertools.product(*(vals for _, vals in axes)):
        pairs = [(key, value) for (key, _), value in zip(axes, values)]
        load_config(preset, [*sets, *pairs])                 # ConfigError names the bad combination
        out.append((",".join(f"{k.rsplit('.', 1)[1] if short else k}={v}" for k, v in pairs), pairs))
    return out


def variant_dir(work_dir: Path, name: str) -> Path:
    return work_dir / "variants" / name


def _link(link: Path, target: Path) -> None:
    """A relative symlink `link` -> `target`; an existing correct one is kept, anything else refused."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()                                     # a stale link (the work dir was reorganised)
    elif link.exists():
        raise PipelineError(f"{link} exists and is not a link to the shared {target.name}: "
                          "refusing to replace what a run wrote")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(rel)


def link_variant(work_dir: Path, name: str, seeds: list[int], owner: str = MAIN) -> Path:
    """Create (or check) a variant's links to stage 0 and to each seed's baseline arm: the main run's,
    or its baseline owner's; a variant that owns its baseline trains it (no baseline links)."""
    work_dir = Path(os.path.abspath(work_dir))
    vdir = variant_dir(work_dir, name)
    vdir.mkdir(parents=True, exist_ok=True)
    _link(vdir / "shared", work_dir / "shared")
    if owner == name:
        return vdir
    source = work_dir if owner == MAIN else variant_dir(work_dir, owner)
    for seed in seeds:
        for rel in BASELINE_OUTPUTS:
            _link(vdir / f"seed_{seed}" / rel, source / f"seed_{seed}" / rel)
    return vdir


def find_variants(work_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(work_dir) / "variants").glob("*") if p.is_dir())
