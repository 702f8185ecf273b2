"""Shared command line of the stage scripts: flags -> config -> stage function.

Every stage takes --preset, --seed, --work-dir and repeatable --set key=value.
Exit codes: 0 done (or already done with the same config), 1 the stage could
not finish, 2 invalid flags or config, 75 stopped by SIGUSR1/SIGTERM after
saving a checkpoint (rerun to resume), 130 interrupted by Ctrl-C (SIGINT; a
training stage checkpoints first, as for SIGTERM). Only exit 0 writes the
completion flag.

Stages that train (2 and 3) also run under torchrun: every rank runs the stage
function; rank 0 alone takes the lock, decides whether the stage is already
done, and writes the config and the flag.
"""
from __future__ import annotations

import argparse
import errno
import shutil
import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from configs.experiment_config import ConfigError
from configs.presets import parse_sets
from configs.presets import PRESETS, load_config
from utils.run import distributed
from utils.run.compute import deterministic_from_environment
from utils.run.run_files import (ROOT, PipelineError, RunPaths, flag_matches, flag_problem, set_aside, stage_lock,
                                 write_flag, write_json)
from utils.run.signals import Preempted, ignore_warnings_from_now_on

EXIT_FAILED, EXIT_CONFIG, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 75, 130


@dataclass(frozen=True)
class Stage:
    """A stage as the CLI runs it; utils/pipeline.py lists stages 0-6.

    `run(cfg, paths)` returns the output paths. The completion fingerprint covers the config
    `sections` and, if given, `inputs(cfg, paths)`: what the stage reads besides the config
    (e.g. which models exist). `shared` stages write WORK/shared (once for every seed);
    `multiprocess` ones may be started by torchrun. `checkpoints(cfg, paths)` lists a training stage's
    checkpoint directories: --force sets them aside, so the stage starts afresh instead of resuming."""
    name: str
    run: Callable
    sections: tuple[str, ...]
    shared: bool = False
    inputs: Callable | None = None
    multiprocess: bool = False
    checkpoints: Callable | None = None

    def fingerprint(self, cfg, paths: RunPaths) -> str:
        return cfg.fingerprint(self.sections, self.inputs(cfg, paths) if self.inputs else "")

    def done(self, cfg, paths: RunPaths) -> bool:
        """The completion flag matches this config (a stage whose inputs cannot be read is not done)."""
        try:
            return flag_matches(paths.flag(self.name, self.shared), self.fingerprint(cfg, paths), paths)
        except PipelineError:
            return False


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Config keys: see configs/experiment_config.py; "
                                       "environment overrides: MONO__SECTION__FIELD=value.")
    p.add_argument("--preset", default="tiny", help=f"named preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--seed", type=int, default=None, help="experiment seed (default: the preset's, 42)")
    p.add_argument("--work-dir", default=None, help=f"run directory (default: {ROOT / 'work'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.seq_len=64 (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if the completion flag matches")
    p.add_argument("--check", action="store_true",
                   help="run nothing; exit 0 if the completion flag matches this config, 1 if not")
    return p


def config_from_args(args: argparse.Namespace, seed: int | None = None):
    overrides = parse_sets(args.overrides)
    seed = args.seed if seed is None else seed
    if seed is not None:
        overrides.append(("seed", str(seed)))
    overrides.append(("work_dir", str(Path(args.work_dir or ROOT / "work").resolve())))
    return load_config(args.preset, overrides)


def os_error_line(name: str, e: OSError) -> str:
    """The file system, not the code: one line (a full disk or a read-only work dir says how to go on)."""
    hints = {errno.ENOSPC: " free space or choose another --work-dir (downloads go to the Hugging Face cache: "
                           "HF_HOME / HF_HUB_CACHE), then rerun",
             errno.EROFS: " the work dir is read-only: copy it somewhere writable (cp -a) to rerun or re-aggregate"}
    what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    return f"error: [{name}] {what} ({e.filename or 'its files'}):{hints.get(e.errno) or ' ' + str(e)}"


def one_line_on_failure(name: str, work: Callable[[], object]) -> int:
    """Run `work()` for a script that is not a stage: a PipelineError or an OSError is one `error:` line and
    EXIT_FAILED, success 0."""
    try:
        work()
    except PipelineError as e:
        print(f"error: [{name}] {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(os_error_line(name, e), file=sys.stderr)
        return EXIT_FAILED
    return 0


def run_stage(stage: Stage, description: str) -> int:
    """Parse flags, skip if done, run the stage, write its config and completion flag."""
    args = stage_parser(description).parse_args()
    name = stage.name
    if distributed.launched() and not stage.multiprocess:
        print(f"error: [{name}] runs as one process; start it with python, not torchrun", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    deterministic_from_environment()
    if distributed.launched() and not args.check:
        try:
            distributed.init(cfg.device)
        except PipelineError as e:
            print(f"error: [{name}] {e}", file=sys.stderr)
            return EXIT_FAILED
    try:
        return _run(stage, args, cfg)
    finally:
        distributed.destroy()


def done_stages(stages: list[Stage], argv=None) -> int:
    """`--seeds S1,S2 ...`: print `INDEX SEED` for every stage (its index in `stages`) done for that
    seed's config, in one process; run_all.sh skips those without starting Python per stage."""
    p = stage_parser("Which stages are done for this config (one 'INDEX SEED' line each).")
    p.add_argument("--seeds", required=True, help="comma-separated seeds")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        configs = {seed: config_from_args(args, seed) for seed in seeds}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for seed, cfg in configs.items():
        paths = RunPaths(Path(cfg.work_dir), cfg.seed)
        for i, stage in enumerate(stages):
            if stage.done(cfg, paths):
                print(i, seed)
    return 0


def drop_set_aside(name: str, kept: list[Path]) -> None:
    """Once a stage has finished, what --force set aside of its checkpoints is not needed: removed, in one line."""
    aside = [p for path in kept for p in sorted(path.parent.glob(f"{path.name}.set-aside-*"))]
    for p in aside:
        shutil.rmtree(p, ignore_errors=True)
    if aside:
        print(f"[{name}] finished: removed what --force had set aside ({', '.join(str(p) for p in aside)})")


def _run(stage: Stage, args, cfg) -> int:
    name, shared, main = stage.name, stage.shared, distributed.is_main()
    paths = RunPaths(Path(cfg.work_dir), cfg.seed)
    if paths.work_dir.exists() and not paths.work_dir.is_dir():
        print(f"error: [{name}] work dir {paths.work_dir} is a file, not a directory", file=sys.stderr)
        return EXIT_CONFIG
    flag = paths.flag(name, shared)
    try:
        fingerprint = stage.fingerprint(cfg, paths)
    except PipelineError as e:
        print(f"error: [{name}] {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.check:
        done = flag_matches(flag, fingerprint, paths)
        print(f"[{name}] {'done' if done else 'not done'} for this config")
        return 0 if done else EXIT_FAILED
    RUN, SKIP, FAILED = 0, 1, 2
    try:
        with ExitStack() as held:
            verdict = RUN
            if main:     # rank 0 decides for all ranks (and is the only one without torchrun)
                try:
                    held.enter_context(stage_lock(flag.with_suffix(".lock"),
                                                  f"{name} (seed {cfg.seed})" if not shared else name))
                    problem = flag_problem(flag, fingerprint, paths)
                    if problem is None and not args.force:
                        verdict = SKIP
                    if problem is not None and problem.startswith("its output"):
                        print(f"[{name}] was done, but {problem}: running it again")
                    for kept in (stage.checkpoints(cfg, paths) if args.force and stage.checkpoints else []):
                        aside = set_aside(kept)
                        if aside is not None:
                            print(f"[{name}] --force: starting afresh; its checkpoints are set aside in {aside}")
                except PipelineError as e:
                    print(f"error: [{name}] {e}", file=sys.stderr)
                    verdict = FAILED
            verdict = distributed.from_main(verdict)
            if verdict == FAILED:
                return EXIT_FAILED
            if verdict == SKIP:
                if main:
                    print(f"[{name}] already done with this config ({flag}); skipping (use --force to rerun)")
                return 0
            out_dir = paths.shared if shared else paths.results
            if main:
                write_json(out_dir / f"config_{name}.json", cfg.to_dict())
            outputs = stage.run(cfg, paths)
            ignore_warnings_from_now_on()
            if main:
                write_flag(flag, fingerprint, outputs, paths)
                drop_set_aside(name, stage.checkpoints(cfg, paths) if stage.checkpoints else [])
            # Every rank leaves together: a rank that tears its process group down while rank 0 still
            # writes (the trained model, its export) can abort in gloo's teardown. (A failing rank is
            # not waited for: torchrun stops the others.)
            distributed.barrier()
    except PipelineError as e:
        print(f"error: [{name}] {e}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as e:
        if main:
            print(f"[{name}] {e}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.signum == signal.SIGINT else EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"\n[{name}] interrupted (Ctrl-C); not marked done, rerun the same command to run it again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(os_error_line(name, e), file=sys.stderr)
        return EXIT_FAILED
    if main:
        print(f"[{name}] done")
    return 0
