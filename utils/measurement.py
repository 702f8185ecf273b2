"""Stages 4 and 5 (perplexity, capabilities, UAT) and what stages 4-6 share: the arms, MeasuredOnce.

Arms: pretrained, stage 0's controls (control_*: unconstrained models of other
clean loss), monotonic_init, baseline, monotonic, unconstrained_from_init and
stage 3's ladder (ladder_<tokens>: the same start at shorter budgets), whichever
have been built. Every result file names each model's path, the token file and the
exact convention, and stores per-example records that a fresh forward pass
reproduces (tests/test_measured_records.py does exactly that). Stage 6: utils/text_attacks.py.

Under torchrun the work is sharded and rank 0 writes what one process would:
stage 4 deals the batches of windows (perplexity.document_nll) and each
capability task's documents (capabilities: lm-eval data-parallel), stage 6 the attacked texts, each rank taking a contiguous
share (distributed.my_share); stage 5 deals the batches of every exact query of
the trigger search (attack_core.Victim). Every record is computed exactly as in
one process.
"""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from configs.experiment_config import ExperimentConfig, HELDOUT_TASKS
from utils.attacks import uat
from utils.attacks.core import Cost, Victim, forbidden_tokens, select_texts
from utils.data.corpus import read_corpus
from utils.data.tokenization import TokenFile, encoded_utf8_bytes, load_tokenizer, normaliser_name
from utils.measure.capabilities import evaluate_capabilities, task_names
from utils.measure.perplexity import aggregate, document_nll
from utils.model.modeling import load_model
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.run_files import PipelineError, RunPaths, read_json, source_digest, weights_digest, write_json
from utils.run.signals import Preempted, StopOnSignal
from utils.stages import pretrained_model, read_manifest

ARMS = ("pretrained", "monotonic_init", "baseline", "monotonic", "unconstrained_from_init")
WRITER = {"pretrained": "stage_0_setup", "monotonic_init": "stage_1_apply_monotonicity",
          "baseline": "stage_2_train_baseline", "monotonic": "stage_3_train_monotonic",
          "unconstrained_from_init": "stage_3_train_monotonic"}
CERTIFICATES = {"monotonic_init": "monotonicity_certificate.json",
                "monotonic": "monotonicity_certificate_monotonic.json"}
MODEL_SECTIONS = ("model", "data", "pretrain", "monotone", "recovery_baseline", "recovery_monotone", "precision")
EVAL_SECTIONS, ATTACK_SECTIONS = (*MODEL_SECTIONS, "eval"), (*MODEL_SECTIONS, "attack")
BUILD_SECTIONS = ("model", "pretrain", "monotone", "recovery_baseline", "recovery_monotone")   # see MeasuredOnce


def writer(arm: str) -> str:
    """The stage that writes an arm's model (stage 0 the controls, stage 3 the ladder)."""
    return "stage_3_train_monotonic" if arm.startswith("ladder_") else WRITER.get(arm, "stage_0_setup")


def available_arms(paths: RunPaths) -> dict[str, Path]:
    """Every arm whose model exists: pretrained, stage 0's controls, stages 1-3's arms, then the ladder's rungs
    that stage 3's results/ladder.json lists (a rung of an earlier ladder config is not one of them)."""
    arms = {"pretrained": pretrained_model(paths)}
    for name, control in read_manifest(paths).get("controls", {}).items():
        arms[name] = paths.resolve(control["path"])
        if not (arms[name] / "config.json").is_file():
            raise PipelineError(f"control model {name} recorded by stage 0 is not at {arms[name]}; rerun stage 0 with --force")
    for arm in ARMS[1:]:
        if (paths.models / arm / "config.json").exists():
            arms[arm] = paths.models / arm
    ladder = paths.results / "ladder.json"
    for rung in read_json(ladder)["rungs"] if ladder.exists() else []:
        if not (paths.models / rung["arm"] / "config.json").is_file():
            raise PipelineError(f"{paths.rel(ladder)} lists {rung['arm']}, which is not at {paths.models / rung['arm']}; "
                                f"rerun stage 3 with --force")
        arms[rung["arm"]] = paths.models / rung["arm"]
    return arms


def arms_fingerprint(cfg: ExperimentConfig, paths: RunPaths) -> str:
    """Which models exist and when they were written: a retrained model reruns stages 4-6."""
    stamps = {}
    for arm, path in available_arms(paths).items():
        weights = list(path.glob("*.safetensors"))
        if not weights:
            raise PipelineError(f"{paths.rel(path)} has no *.safetensors weights: rerun {writer(arm)}, which writes it")
        stamps[arm] = max(p.stat().st_mtime_ns for p in weights)
    return json.dumps(stamps, sort_keys=True)


def arm_label(paths: RunPaths, arm: str) -> str:
    """'monotone' / 'NOT MONOTONE (...)' for constrained arms, 'control (unconstrained)' for the arms that
    exist only to trace the frontier (stage 0's controls, unconstrained_from_init), 'unconstrained' otherwise."""
    if arm.startswith(("control_", "ladder_")) or arm == "unconstrained_from_init":
        return "control (unconstrained)"
    if arm not in CERTIFICATES:
        return "unconstrained"
    cert = read_json(paths.results / CERTIFICATES[arm])
    return "monotone" if cert["monotone"] else f"NOT MONOTONE ({cert['total_violations']} violations)"


class MeasuredOnce:
    """Each arm is measured once per seed, model and config: its per-arm result (and, within stage 4,
    its perplexity and each capability task as soon as they exist) is kept in
    shared/measured/seed_<S>/<stage>/<arm>[.<part>]-<key>.json, keyed by the model's weights (a digest of
    its safetensors files), the seed (not for stage 4, whose records every seed shares: every_seed/ in place
    of seed_<S>/, SEED_INDEPENDENT), the stage's measurement sections (data, precision, eval or attack)
    and the measurement code's contents (run_files.MEASUREMENT_CODE): not by a path or the git revision,
    so a moved work dir and a commit that changes no measurement code read every record. A requeued or rerun stage
    reads what it measured before (a stage 4 stopped by its time limit resumes at the next task), and a
    grid variant reads what an earlier variant measured of the arms they share (the pretrained model,
    stage 0's controls, a linked baseline), through its shared/ link. --force sets the stage's records
    aside (`measured_dir`). `get` is collective (rank 0 decides); `get_part`/`put` are per rank."""

    def __init__(self, cfg: ExperimentConfig, paths: RunPaths, stage: str, sections: tuple[str, ...]):
        # The sections that only say how the models were built are left out of the key: the weights' digest
        # stands for them, so a variant of another construction reads what an earlier variant measured of the
        # arms they share (the pretrained model, the controls, the baseline).
        self.cfg, self.paths, self.stage = cfg, paths, stage
        self.sections = tuple(s for s in sections if s not in BUILD_SECTIONS)
        self.code = source_digest()

    def _file(self, arm: str, path: Path, part: str = "") -> Path:
        weights = weights_digest(path)
        seed = "" if self.stage in SEED_INDEPENDENT else self.cfg.seed
        key = self.cfg.fingerprint(self.sections, extra=f"{weights}|{seed}|{self.stage}|{self.code}")
        return measured_dir(self.paths, self.stage) / f"{arm}{'.' + part if part else ''}-{key}.json"

    def get(self, arm: str, path: Path, part: str = "") -> dict | None:
        f = self._file(arm, path, part)
        kept = distributed.from_main(int(f.exists()))
        return read_json(f) if kept else None

    def get_part(self, arm: str, path: Path, part: str) -> dict | None:
        f = self._file(arm, path, part)
        return read_json(f) if f.exists() else None

    def put(self, arm: str, path: Path, entry: dict, part: str = "", every_rank: bool = False) -> None:
        if every_rank or distributed.is_main():
            f = self._file(arm, path, part)
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, entry)

    def drop_parts(self, arm: str, path: Path) -> None:
        """Once the arm's whole record is kept, its parts are not needed."""
        if distributed.is_main():
            whole = self._file(arm, path).name
            for f in measured_dir(self.paths, self.stage).glob(f"{arm}.*-{whole.rsplit('-', 1)[1]}"):
                f.unlink(missing_ok=True)


# Stage 4 measures every model on the shared test split with no random choice: a model's records (the pretrained
# model's, the controls', any arm whose weights two seeds share) hold for every seed. Stages 5-6 draw their texts
# and searches from the seed.
SEED_INDEPENDENT = {"stage_4_evaluate"}


def measured_dir(paths: RunPaths, stage: str) -> Path:
    if stage in SEED_INDEPENDENT:
        return paths.shared / "measured" / "every_seed" / stage
    return paths.shared / "measured" / f"seed_{paths.seed}" / stage


def stop_after(stop: StopOnSignal, stage: str, arm: str) -> None:
    """A signal (SLURM's warning before the time limit) stops a measurement stage after `arm` (an arm, or a part
    of one: a task, a UAT restart, a text); what it measured is kept (MeasuredOnce) and the requeued job goes
    on from there. Collective."""
    if distributed.any_rank(stop.requested)[0]:
        raise Preempted(f"stopped by {stop.reason or 'a signal to another process'} after {arm}; what {stage} "
                        f"measured is kept, rerun the same command to go on", stop.signum or signal.SIGUSR1)


def load_arm(path: Path, device):
    model = load_model(path, "float32", device).eval()
    model.requires_grad_(False)      # attacks need input gradients only
    return model


# -- stage 4 -------------------------------------------------------------------

def evaluate(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    e, compute = cfg.eval, Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    test = TokenFile(paths.shared / "tokens", "test")
    corpus_file = paths.shared / "corpus" / "test.jsonl"
    docs = [test.document(i) for i in range(len(test))]
    n_bytes = sum(encoded_utf8_bytes(tokenizer, t) for t in read_corpus(corpus_file))
    out = {
        "split": "test", "compute": compute.describe(), "token_file": paths.rel(test.path),
        "offsets_file": paths.rel(test.path).replace(".tokens.", ".offsets."), "corpus_file": paths.rel(corpus_file), "documents": len(docs), "utf8_bytes": n_bytes,
        "convention": {
            "unit": "per document: tokens[offsets[i]:offsets[i+1]-1] (the trailing EOS is not scored)",
            "sequence": "[EOS] + document, so the first token is predicted from EOS and every token is scored",
            "windows": "targets in consecutive chunks (the first ends at token max_len, each next stride "
                       "tokens later); each window reads the at most max_len tokens before its last target "
                       "and scores only its chunk (the rest is context, label -100); stride = max_len is "
                       "lm-evaluation-harness's loglikelihood_rolling",
            "max_len": e.max_len, "stride": e.stride, "eos_id": tokenizer.eos_token_id,
            "aggregate": "perplexity = exp(sum NLL / sum tokens) over all documents; "
                         "bits_per_byte = sum NLL / ln 2 / utf8_bytes",
            "utf8_bytes": f"UTF-8 bytes of the documents after the tokenizer's normaliser "
                          f"({normaliser_name(tokenizer) or 'none'}), i.e. of the text that was encoded"},
        "models": {},
    }
    tasks, task_data = task_names(e.tasks), paths.shared / "tasks"
    missing = [t for t in tasks if t in HELDOUT_TASKS and not (task_data / f"{t}.jsonl").exists()]
    if missing:
        raise PipelineError(f"eval.tasks names {', '.join(missing)}, which stage 0 did not build (test split too "
                            f"small?); see {paths.shared / 'manifest.json'}")
    if tasks:
        import lm_eval
        caps = {"harness": f"lm-evaluation-harness {lm_eval.__version__}", "num_fewshot": 0,
                "limit": e.task_limit or None, "tasks": tasks,
                "compute": compute.describe(),
                "models": {}}
    once = MeasuredOnce(cfg, paths, "stage_4_evaluate", EVAL_SECTIONS)
    # SLURM's warning (jobs/common.sh forwards it as USR1). Not SIGTERM: lm-eval's bootstrap pool stops its
    # forked workers with it, and they inherit the handler. Ctrl-C stops at once (what is done is kept).
    stop = StopOnSignal((signal.SIGUSR1,))
    for arm, path in available_arms(paths).items():
        kept = once.get(arm, path)
        if kept:             # perhaps another seed's measurement of the same weights: this seed's path and label
            out["models"][arm] = {**kept["evaluation"], "path": paths.rel(path), "label": arm_label(paths, arm)}
            if tasks:
                caps["models"][arm] = {**kept["capabilities"], "path": paths.rel(path)}
            say(f"[evaluate] {arm:<15} perplexity {kept['evaluation']['perplexity']:10.2f}  (measured before: kept)")
            continue
        t0, model = time.time(), None
        evaluation = once.get(arm, path, "perplexity")
        if evaluation is not None:
            evaluation = {**evaluation, "path": paths.rel(path), "label": arm_label(paths, arm)}
        else:
            model = load_arm(path, compute.device)
            per_doc = document_nll(model, docs, tokenizer.eos_token_id, e.max_len, e.stride, e.batch_size, compute,
                                   shard=True)
            agg = aggregate(per_doc)
            evaluation = {
                "path": paths.rel(path), "label": arm_label(paths, arm), **agg,
                "bits_per_byte": agg["nll_sum"] / math.log(2) / n_bytes, "seconds": time.time() - t0,
                "per_document": {"nll": [x for x, _ in per_doc], "tokens": [n for _, n in per_doc]}}
            once.put(arm, path, evaluation, "perplexity")
        out["models"][arm] = evaluation
        say(f"[evaluate] {arm:<15} perplexity {evaluation['perplexity']:10.2f}  "
             f"({evaluation['tokens']:,} tokens, {evaluation['bits_per_byte']:.3f} bits/byte)")
        stop_after(stop, "stage 4", f"{arm}'s perplexity")   # kept: the requeued job goes on with its tasks
        if tasks:      # every task on every rank, its documents dealt to the ranks; each kept as soon as it is done
            log = paths.results / ("lm_eval.log" if distributed.world_size() == 1 else f"lm_eval_rank{distributed.rank()}.log")
            done = {}
            for task in tasks:
                done[task] = once.get(arm, path, f"task.{task}")      # rank 0 decides
                if done[task] is None:
                    model = model or load_arm(path, compute.device)
                    done[task] = evaluate_capabilities(model, tokenizer, [task], task_data, e.task_batch_size,
                                                       e.max_len, e.task_limit, compute, log).get(task)
                    once.put(arm, path, done[task], f"task.{task}")
                stop_after(stop, "stage 4", f"{arm}'s {task}")
            caps["models"][arm] = {"path": paths.rel(path), "tasks": done}
            if distributed.is_main():       # the other ranks' documents went to rank 0
                say(f"[evaluate] {arm:<15} " + ", ".join(
                    f"{t} acc {r['metrics']['acc']:.3f}" + (f" +- {r['metrics']['acc_stderr']:.3f}"
                                                            if "acc_stderr" in r["metrics"] else " (no stderr)")
                    for t, r in done.items() if "acc" in r["metrics"]))
        once.put(arm, path, {"evaluation": out["models"][arm], "capabilities": caps["models"][arm] if tasks else None})
        once.drop_parts(arm, path)
        del model
        stop_after(stop, "stage 4", arm)
    out["processes"] = distributed.world_size()
    path = paths.results / "evaluation.json"
    written = [str(path)] + ([str(paths.results / "capabilities.json")] if tasks else [])
    if distributed.is_main():
        write_json(path, out)
        if tasks:
            write_json(paths.results / "capabilities.json", caps)
    return written


def say(line: str) -> None:
    if distributed.is_main():
        print(line)


# -- stage 5 -------------------------------------------------------------------

def run_uat(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    test = TokenFile(paths.shared / "tokens", "test")
    eos = tokenizer.eos_token_id
    opt = select_texts(test, eos, a.uat_opt_texts, a.text_len, a.min_text_len, cfg.seed)
    held = select_texts(test, eos, a.uat_eval_texts, a.text_len, a.min_text_len, cfg.seed, skip=a.uat_opt_texts)
    init_token = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    arms = available_arms(paths)
    models = {}
    once = MeasuredOnce(cfg, paths, "stage_5_uat_attacks", ATTACK_SECTIONS)
    stop = StopOnSignal((signal.SIGUSR1,))          # SLURM's warning: stop after the restart, requeue, go on
    for arm, path in arms.items():      # the trigger search, the expensive part (the transfer below is cheap)
        models[arm] = once.get(arm, path)
        if models[arm]:
            say(f"[uat] {arm:<15} trigger {models[arm]['trigger_text']!r} (measured before: kept)")
            continue
        t0 = time.time()
        victim = Victim(load_arm(path, compute.device), compute, a.batch_size, shard=True,
                        surrogate_gradient=a.surrogate_gradient)
        forbidden = forbidden_tokens(tokenizer, victim.embeddings.shape[0])
        # Restart by restart, each kept as it finishes: SLURM's warning stops the stage after the restart in
        # progress and the requeued job goes on with the next (every rank runs every restart: the check is
        # collective).
        kept = {r: part for r in range(a.uat_restarts) if (part := once.get(arm, path, f"restart{r}"))}   # rank 0 decides
        if kept:
            say(f"[uat] {arm:<15} {len(kept)} restart(s) searched before: kept")

        def keep(record):
            once.put(arm, path, record, part=f"restart{record['restart']}")
            stop_after(stop, "stage 5", f"{arm}'s restart {record['restart']}")

        found = uat.find_trigger(victim, [t["ids"] for t in opt], a, forbidden, cfg.seed, init_token, kept, keep)
        trig = found["trigger"]
        models[arm] = {"path": paths.rel(path), "label": arm_label(paths, arm), "trigger_ids": trig.tolist(),
                       "trigger_text": tokenizer.decode(trig.tolist()), "opt_loss": found["loss"],
                       "opt_clean_loss": found["clean_loss"],
                       "restart": found["restart"], "iterations": found["iterations"],
                       "search_cost": found["cost"], "search_seconds": time.time() - t0,
                       "restarts": [{"restart": r["restart"], "trigger_ids": r["trigger"].tolist(),
                                     "trigger_text": tokenizer.decode(r["trigger"].tolist()), "opt_loss": r["loss"],
                                     "iterations": r["iterations"], "cost": r["cost"], "trace": r["trace"]}
                                    for r in found["restarts"]]}
        once.put(arm, path, models[arm])
        once.drop_parts(arm, path)
        say(f"[uat] {arm:<15} trigger {models[arm]['trigger_text']!r} (opt-set NLL {found['loss']:.3f}, "
             f"{found['cost']['forward_passes']:,} exact forward passes)")
        del victim
        stop_after(stop, "stage 5", arm)
    # Every trigger on every model, on the held-out texts; the diagonal is each model's own result.
    transfer = {src: {} for src in arms}
    held_ids = [t["ids"] for t in held]
    for arm, path in arms.items():
        victim = Victim(load_arm(path, compute.device), compute, a.batch_size, shard=True)
        # every restart's trigger too: each restart is an independent search (its held-out damage)
        own = [torch.tensor(r["trigger_ids"]) for r in models[arm]["restarts"]]
        triggers = [torch.tensor([], dtype=torch.long)] + [torch.tensor(models[src]["trigger_ids"]) for src in arms]
        clean_per, *attacked_per = uat.per_text_losses(victim, triggers + own, held_ids)
        attacked_per, restart_per = attacked_per[:len(arms)], attacked_per[len(arms):]
        clean = sum(clean_per) / len(clean_per)
        for r, per in zip(models[arm]["restarts"], restart_per):
            r["eval"] = {"clean_nll": clean, "triggered_nll": sum(per) / len(per),
                         "abs_delta_nll": sum(per) / len(per) - clean, "triggered_nll_per_text": per}
        for src, per in zip(arms, attacked_per):
            attacked = sum(per) / len(per)
            row = {"clean_nll": clean, "triggered_nll": attacked, "abs_delta_nll": attacked - clean,
                   "rel_delta_nll": attacked / clean - 1}
            transfer[src][arm] = row
            if src == arm:
                models[arm]["eval"] = row
                models[arm]["examples"] = [
                    {"doc": t["doc"], "text_ids": t["ids"].tolist(), "clean_nll": c, "triggered_nll": p}
                    for t, c, p in zip(held, clean_per, per)]
        models[arm]["transfer_cost"] = victim.cost.since(Cost())
        say(f"[uat] {arm:<15} held-out NLL {clean:.3f} -> {models[arm]['eval']['triggered_nll']:.3f} "
             f"({100 * models[arm]['eval']['rel_delta_nll']:+.1f}%)")
        del victim
    path = paths.results / "uat.json"
    if distributed.is_main():
        write_json(path, {"composition": uat.composition(a), "config": vars(a), "seed": cfg.seed,
                          "compute": compute.describe(), "processes": distributed.world_size(),
                          "token_file": paths.rel(test.path), "opt_docs": [t["doc"] for t in opt],
                          "eval_docs": [t["doc"] for t in held],
                          "loss": "mean over texts of the mean next-token NLL of the text tokens; "
                                  "sequence [EOS] + trigger + text, trigger positions masked",
                          "cost": "exact sequences (and tokens) run forward, and forward + backward for "
                                  "embedding gradients; the whole search, whatever the number of processes",
                          "models": models, "transfer": transfer})
    return [str(path)]
