"""What each stage does, as one function (cfg, paths) -> list of output paths.

Stage scripts only parse flags and call these through utils.run.cli.run_stage,
which handles completion flags, the resolved config and error exits.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import numpy as np
import torch

from configs.experiment_config import ExperimentConfig, SPLITS, listed, numbers
from utils.data.corpus import documents, read_corpus
from utils.data.hub import fetch_dataset, fetch_model, file_sha256
from utils.data.overlap import heldout_overlap
from utils.data.tokenization import TokenFile, load_tokenizer, train_bpe, write_split
from utils.measure.capabilities import build_heldout_tasks, cache_task_datasets, task_names
from utils.measure.perplexity import aggregate, document_nll
from utils.model.modeling import build_tiny_model, load_model, save_model
from utils.model.monotonicity import apply_monotonicity, certify
from utils.run.compute import Compute
from utils.run.run_files import PipelineError, RunPaths, code_revision, read_json, share_modes, write_json
from utils.train.training import budget_tokens, passes, train, validation_loss

TINY_PRETRAIN_SEED = 1234   # the tiny "foundation model" is shared by every experiment seed


# -- stage 0 -------------------------------------------------------------------

def unigram_perplexity(train: TokenFile, test: TokenFile, vocab_size: int) -> float:
    """Add-one unigram model from train counts, on the test tokens the LM scores."""
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    nll = sum(-logp[test.document(i)].sum() for i in range(len(test)))
    n = sum(len(test.document(i)) for i in range(len(test)))
    return math.exp(nll / n)


def heldout_perplexity(model, tokens: TokenFile, eos_id: int, cfg: ExperimentConfig, compute: Compute) -> dict:
    """Stage 4's protocol (cfg.eval), on the whole test split."""
    e = cfg.eval
    per_doc = document_nll(model, [tokens.document(i) for i in range(len(tokens))], eos_id, e.max_len, e.stride,
                           e.batch_size, compute)
    return {**aggregate(per_doc), "documents": len(tokens), "max_len": e.max_len, "stride": e.stride}


def fetch_controls(cfg: ExperimentConfig) -> dict:
    """controls.revisions: released checkpoints of the hub model (its stepN revisions), or with
    model.source=local other model directories; each fetched and recorded like the main model."""
    out = {}
    for rev in listed(cfg.controls.revisions):
        if cfg.model.source == "local":
            if not Path(rev).expanduser().is_dir():
                raise PipelineError(f"controls.revisions: with model.source=local each entry is a model directory, "
                                    f"and {rev!r} is not one; list directories, or set controls.revisions= (empty) "
                                    f"to run without these controls")
            out[f"control_{Path(rev).name}"] = fetch_model(dataclasses.replace(cfg.model, path=rev))
        else:
            print(f"[setup] control {cfg.model.hub_id}@{rev}")
            out[f"control_{rev}"] = fetch_model(dataclasses.replace(cfg.model, revision=rev))
    return out


def check_distinct_controls(model: dict, controls: dict) -> None:
    """A control must be another model: refuse, in one line, one whose weight files are byte for byte the main
    model's or another control's (some released step branches serve the final weights: pythia-2.8b's step4000
    and step16000 are `main`, EleutherAI/pythia issues #205 and #206). Records as fetch_model writes them."""
    def weights(record: dict) -> tuple:
        return tuple(sorted(h for name, h in record["files"].items() if name.endswith(".safetensors")))
    seen = {"the main model": weights(model)}
    for name, record in controls.items():
        same = [other for other, w in seen.items() if w == weights(record)]
        if same:
            raise PipelineError(f"controls.revisions: {name}'s weights are {same[0]}'s, byte for byte (a released "
                                f"step branch can serve the final weights): a control must be another model; drop it "
                                f"from controls.revisions")
        seen[name] = weights(record)


def control_step(name: str, record: dict) -> int | None:
    """How far a control was trained: a snapshot's tokens, or the N of a stepN revision or directory name."""
    if "tokens" in record:
        return record["tokens"]
    found = re.search(r"step(\d+)", name.removeprefix("control_"))
    return int(found.group(1)) if found else None


def check_control_losses(cfg: ExperimentConfig, main_model, controls: dict, val: TokenFile, compute: Compute) -> dict:
    """Each control's validation loss (controls.check_windows windows), recorded in its manifest entry (so
    controls.revisions can be chosen by measured loss), and the main model's. Refused in one line: a list whose
    loss does not rise as the step falls (the main model is the last step); a control without a step in its name is
    measured but not ordered (said). Returns {name: loss} with the main model as "main"."""
    def loss(model) -> float:
        return validation_loss(model, val.tokens, cfg.data.seq_len, 4, cfg.controls.check_windows, compute)

    losses = {"main": loss(main_model)}
    for name, record in controls.items():
        record["val_loss"] = losses[name] = loss(load_model(Path(record["path"]), "float32", compute.device))
        print(f"[setup] {name}: validation loss {losses[name]:.4f} (main model {losses['main']:.4f})")
    stepped = sorted((control_step(n, r), n) for n, r in controls.items() if control_step(n, r) is not None)
    unordered = [n for n, r in controls.items() if control_step(n, r) is None]
    if unordered:
        print(f"[setup] {', '.join(unordered)}: no step in the name (stepN), so not checked for order")
    order = [n for _, n in stepped] + ["main"]
    for earlier, later in zip(order, order[1:]):
        if losses[earlier] <= losses[later]:
            raise PipelineError(f"controls: the validation loss does not rise as the step falls: {earlier} "
                                f"{losses[earlier]:.4f} <= {'the main model' if later == 'main' else later} "
                                f"{losses[later]:.4f} ({cfg.controls.check_windows} windows); a control must be an "
                                f"earlier, worse model: drop it from the list")
    return losses


class PretrainSnapshots:
    """`on_step` of the tiny pretraining: the model after each of controls.pretrain_snapshots tokens (the first
    optimizer step that reaches the count), saved as shared/models/control_<tokens>. Unconstrained models of
    higher clean loss than the pretrained one, for stage 7's frontier; saving does not change the training."""

    def __init__(self, cfg: ExperimentConfig, models_dir: Path, tokenizer):
        self.pending = sorted(int(float(v)) for v in listed(cfg.controls.pretrain_snapshots))
        self.models_dir, self.tokenizer, self.saved = models_dir, tokenizer, {}

    def __call__(self, model, step: int, tokens: int) -> None:
        while self.pending and tokens >= self.pending[0]:
            name = f"control_{self.pending.pop(0)}"
            save_model(model, self.models_dir / name, self.tokenizer, extra={"step": step, "tokens": tokens})
            self.saved[name] = {"source": "tiny pretraining snapshot", "step": step, "tokens": tokens,
                                "path": str(self.models_dir / name)}
            print(f"[setup] control snapshot {name} after {tokens:,} tokens (step {step})")


def training_runs(cfg: ExperimentConfig) -> list[str]:
    """Config sections of every training run that reads the training tokens."""
    return ["recovery_baseline", "recovery_monotone"] + (["pretrain"] if cfg.model.source == "tiny" else [])


def train_tokens_needed(cfg: ExperimentConfig) -> int:
    """Training tokens stage 0 reads at most: one pass for the largest budget (plus one window,
    since packing drops the last partial one). Less data means repeating it, up to data.max_epochs."""
    largest = max(budget_tokens(getattr(cfg, run), cfg.data.seq_len) for run in training_runs(cfg))
    return largest + cfg.data.seq_len + 1


def setup_inputs(cfg: ExperimentConfig, paths: RunPaths) -> str:
    """What stage 0's outputs depend on besides its sections: how many training tokens it reads,
    for the tiny preset the precision its model is pretrained in, and which control models it keeps."""
    c = cfg.controls
    return (f"train_tokens={train_tokens_needed(cfg)}" + (f",precision={cfg.precision}" if cfg.model.source == "tiny" else "")
            + (f",controls={c.pretrain_snapshots}|{c.revisions}" if c.pretrain_snapshots or c.revisions else ""))


def check_context(cfg: ExperimentConfig, model_dir: Path) -> None:
    """Windows the config asks for must fit the model's context (hub and local models)."""
    ctx = read_json(model_dir / "config.json").get("max_position_embeddings")
    e, a = cfg.eval, cfg.attack
    too_long = [f"{name}={n}" for name, n in (("data.seq_len", cfg.data.seq_len), ("eval.max_len", e.max_len),
                                              ("attack.text_len+uat_trigger_len+1", a.text_len + a.uat_trigger_len + 1))
                if ctx and n > ctx]
    if too_long:
        raise PipelineError(f"{', '.join(too_long)} exceed the model's context of {ctx} tokens")


def setup(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Documents, tokenizer, token files and the pretrained model, built once for all seeds.

    Computes on a device only for the tiny preset (which pretrains its model):
    hub and local presets set up on any machine, a login node included."""
    shared, d = paths.shared, cfg.data
    manifest = {"config": cfg.to_dict(), "code_revision": code_revision()}
    hub_paths = None
    if d.source == "hub":
        manifest["dataset"] = fetch_dataset(d)
        hub_paths = manifest["dataset"]["paths"]
    if cfg.model.source == "tiny":
        print(f"[setup] training a {cfg.model.vocab_size}-token BPE tokenizer")
        train_docs = itertools.islice(documents(d, "train", hub_paths), d.max_docs("train") or None)
        tokenizer = train_bpe(train_docs, cfg.model.vocab_size)
        pretrained = shared / "models" / "pretrained"
    else:
        print(f"[setup] model from {cfg.model.path if cfg.model.source == 'local' else cfg.model.hub_id}")
        manifest["model"] = fetch_model(cfg.model)
        manifest["controls"] = fetch_controls(cfg)
        check_distinct_controls(manifest["model"], manifest["controls"])
        pretrained = Path(manifest["model"]["path"])
        check_context(cfg, pretrained)
        tokenizer = load_tokenizer(pretrained)
    # From here on the shared files are rewritten: an earlier manifest no longer describes them.
    (shared / "manifest.json").unlink(missing_ok=True)
    paths.flag("stage_0_setup", shared=True).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(shared / "tokenizer"))
    share_modes(shared / "tokenizer")
    manifest["tokenizer_sha256"] = file_sha256(shared / "tokenizer" / "tokenizer.json")
    need = train_tokens_needed(cfg)
    manifest["corpus"] = {}
    for split in SPLITS:
        print(f"[setup] tokenising the {split} split" + (f" (up to {need:,} tokens)" if split == "train" else ""))
        # The training split's text is read only as tokens: no jsonl of it (~8 GB at the pythia budgets).
        corpus_file = None if split == "train" else shared / "corpus" / f"{split}.jsonl"
        manifest["corpus"][split] = write_split(documents(d, split, hub_paths), tokenizer, corpus_file,
                                                shared / "tokens", split, max_docs=d.max_docs(split),
                                                max_tokens=need if split == "train" else 0)
    tok = {s: TokenFile(shared / "tokens", s) for s in SPLITS}
    manifest["heldout_overlap"] = {}
    for split in ("val", "test"):
        manifest["heldout_overlap"][split] = heldout_near_duplicates(cfg, paths, tokenizer, tok, split,
                                                                     manifest["corpus"])
    tok = {s: TokenFile(shared / "tokens", s) for s in SPLITS}
    check_split_sizes(cfg, tok)
    # Capability tasks: the held-out ones from the (final) test split; the harness's own cached (or, offline,
    # found in the cache) for the compute nodes.
    manifest["capability_tasks"] = {**build_heldout_tasks(read_corpus(shared / "corpus" / "test.jsonl"),
                                                          shared / "tasks"),
                                    **cache_task_datasets(task_names(cfg.eval.tasks))}
    manifest["training_data"] = data_budget(cfg, tok["train"])
    if cfg.model.source == "tiny":
        compute = Compute.from_config(cfg.device, cfg.precision)
        model = build_tiny_model(cfg.model, TINY_PRETRAIN_SEED)
        print(f"[setup] pretraining the tiny GPT-NeoX ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters) for {cfg.pretrain.max_tokens:,} tokens on {compute.device} ({compute.precision})")
        snapshots = PretrainSnapshots(cfg, shared / "models", tokenizer)
        manifest["pretrain"] = train(model, tok["train"].tokens, tok["val"].tokens, cfg.pretrain, d.seq_len,
                                     TINY_PRETRAIN_SEED, compute, desc="pretrain", max_epochs=d.max_epochs,
                                     on_step=snapshots)
        ppl = heldout_perplexity(model, tok["test"], tokenizer.eos_token_id, cfg, compute)
        manifest["pretrained_test"] = ppl
        manifest["unigram_test_perplexity"] = unigram_perplexity(tok["train"], tok["test"], cfg.model.vocab_size)
        print(f"[setup] tiny pretrained test perplexity {ppl['perplexity']:.1f} "
              f"(add-one unigram model: {manifest['unigram_test_perplexity']:.1f})")
        save_model(model, pretrained, tokenizer)
        if snapshots.pending:
            raise PipelineError(f"controls.pretrain_snapshots {snapshots.pending} were never reached: the "
                                f"pretraining ended after {manifest['pretrain']['tokens']:,} tokens")
        manifest["controls"] = snapshots.saved
    if manifest.get("controls"):
        # On the compute device where there is one (a hub preset's stage 0 may run on a CPU node).
        check = Compute.from_config(cfg.device if torch.cuda.is_available() else "cpu", "fp32")
        main = model if cfg.model.source == "tiny" else load_model(pretrained, "float32", check.device)
        manifest["model_val_loss"] = check_control_losses(cfg, main, manifest["controls"], tok["val"], check)["main"]
        if cfg.model.source == "tiny":
            manifest["controls"] = {n: {**c, "path": paths.rel(Path(c["path"]))} for n, c in manifest["controls"].items()}
    manifest["pretrained_path"] = paths.rel(pretrained)
    write_json(shared / "manifest.json", manifest)
    return [str(shared / "manifest.json"), str(pretrained)] + \
           [str(t.path) for t in tok.values()]


def heldout_near_duplicates(cfg: ExperimentConfig, paths: RunPaths, tokenizer, tok: dict[str, TokenFile],
                            split: str, corpus: dict) -> dict:
    """Count the split's near-duplicates of training text; with data.heldout_overlap = drop, rewrite
    the split without them (corpus[split] is updated)."""
    d = cfg.data
    report = heldout_overlap(tok["train"], tok[split], tokenizer.eos_token_id, d.near_duplicate_threshold)
    report.pop("containment")
    near = set(report["near_duplicate_docs"])
    report["removed"] = len(near) if d.heldout_overlap == "drop" else 0
    if report["removed"]:
        corpus_file = paths.shared / "corpus" / f"{split}.jsonl"
        kept = [t for i, t in enumerate(read_corpus(corpus_file)) if i not in near]
        corpus[split] = write_split(iter(kept), tokenizer, corpus_file, paths.shared / "tokens", split)
    print(f"[setup] {split}: {report['near_duplicates']} of {report['documents']} documents share more than "
          f"{d.near_duplicate_threshold:.0%} of their {report['shingle_tokens']}-token n-grams with the training "
          f"split" + (" (removed)" if report["removed"] else "")
          + (f"; n-grams sampled 1 in {report['sample_rate']}" if report["sample_rate"] > 1 else ""))
    return report


def check_split_sizes(cfg: ExperimentConfig, tok: dict[str, TokenFile]) -> None:
    """Before anything trains: every split is large enough for every stage that reads it."""
    d, a, problems = cfg.data, cfg.attack, []
    lengths = np.diff(np.asarray(tok["test"].offsets)) - 1             # tokens per test document
    eligible = int((lengths >= a.min_text_len).sum())
    uat = a.uat_opt_texts + a.uat_eval_texts
    chosen = listed(a.text_attacks)
    hot = max(a.hotflip_texts if "hotflip" in chosen else 0,
              a.gcg_texts if {"gcg", "gcg_surrogate", "random_search"} & set(chosen) else 0,
              a.pgd_texts if numbers(a.pgd_radii) else 0)
    if eligible < max(uat, hot):
        problems.append(f"the test split has {eligible} documents of >= attack.min_text_len={a.min_text_len} tokens, "
                        f"but UAT needs {uat} (attack.uat_opt_texts {a.uat_opt_texts} + attack.uat_eval_texts "
                        f"{a.uat_eval_texts}) and stage 6 {hot} (attack.hotflip_texts, attack.gcg_texts, attack.pgd_texts): add test documents "
                        f"(data.test_docs, data.test_file) or lower those counts")
    for split in ("train", "val"):
        if (tok[split].tokens.size - 1) // d.seq_len < 1:
            problems.append(f"the {split} split has {tok[split].tokens.size} tokens, less than one window of "
                            f"data.seq_len+1={d.seq_len + 1}: add {split} documents or lower data.seq_len")
    if problems:
        raise PipelineError("; ".join(problems))


def data_budget(cfg: ExperimentConfig, train_tokens: TokenFile) -> dict:
    """Passes each training run will make over the training tokens; more than data.max_epochs is refused."""
    runs = {name: passes(name, budget_tokens(getattr(cfg, name), cfg.data.seq_len), train_tokens.tokens.size,
                         cfg.data.seq_len, cfg.data.max_epochs) for name in training_runs(cfg)}
    return {"documents": len(train_tokens), "max_epochs": cfg.data.max_epochs, "runs": runs}


def pretrained_model(paths: RunPaths) -> Path:
    """The model stage 0 set up: inside the work dir (tiny) or where the manifest says (hub, local)."""
    path = paths.resolve(read_manifest(paths)["pretrained_path"])
    if not (path / "config.json").is_file():
        raise PipelineError(f"the pretrained model recorded by stage 0 is not at {path} (moved or deleted?); "
                            f"rerun stage 0 with --force")
    return path


def read_manifest(paths: RunPaths) -> dict:
    if not (paths.shared / "manifest.json").exists():
        raise PipelineError(f"stage 0 has not run for work dir {paths.work_dir} (no shared/manifest.json)")
    return read_json(paths.shared / "manifest.json")


# -- stage 1 -------------------------------------------------------------------

def certificate_probe(cfg: ExperimentConfig, paths: RunPaths) -> torch.Tensor:
    """A few windows of validation text whose MLP inputs the certificate also tests."""
    val = TokenFile(paths.shared / "tokens", "val")
    window = min(cfg.data.seq_len, 256)
    n = min(4, (val.tokens.size - 1) // window)
    return torch.from_numpy(np.asarray(val.tokens[:n * window], dtype=np.int64).reshape(n, window))


def apply_monotone(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Constrain the pretrained model, certify it, save `monotonic_init`."""
    pretrained = pretrained_model(paths)
    device = Compute.from_config(cfg.device, cfg.precision).device   # the certificate computes in fp32/float64
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    probe_ids = certificate_probe(cfg, paths).to(device)
    model = load_model(pretrained, "float32", device)
    mo = cfg.monotone
    before = certify(model, mo.scope, trials=mo.cert_trials, seed=mo.cert_seed, input_ids=probe_ids)
    names = apply_monotonicity(model, mo.scope, mo.activation, mo.init_eps, mo.construction, mo.init)
    print(f"[monotone] constrained {len(names)} modules (scope {mo.scope}, activation {mo.activation}, "
          f"construction {mo.construction}, init {model.config.monotone['init']})")
    cert = certify(model, mo.scope, trials=mo.cert_trials, seed=mo.cert_seed, input_ids=probe_ids)
    cert.update({
        "activation_policy": mo.activation, "configured_monotone": cfg.is_monotone_run,
        "label": "monotone" if cert["monotone"] else
                 f"NOT MONOTONE ({cert['total_violations']} property-test violations"
                 + (", activation=keep: GELU decreases below -0.75)" if mo.activation == "keep" else ")"),
        "constrained_modules": names,
        "pretrained_reference": {k: before[k] for k in ("monotone", "min_weight", "total_violations")},
    })
    cert_path = paths.results / "monotonicity_certificate.json"
    write_json(cert_path, cert)
    print(f"[monotone] certificate: {cert['label']}; min weight {cert['min_weight']:.3g}; "
          f"pretrained model violations {before['total_violations']}")
    if cfg.is_monotone_run and not cert["monotone"]:
        raise PipelineError(f"run is configured monotone but the certificate failed: see {cert_path}")
    out = paths.models / "monotonic_init"
    save_model(model.cpu(), out, tokenizer, extra={"certificate": paths.rel(cert_path), "label": cert["label"]})
    return [str(cert_path), str(out)]
