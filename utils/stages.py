"""What each stage does, as one function (cfg, paths) -> list of output paths.

Stage scripts only parse flags and call these through utils.cli.run_stage,
which handles completion flags, the resolved config and error exits.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from configs.experiment_config import SPLITS, ExperimentConfig
from utils.corpus import read_corpus, write_corpus
from utils.modeling import build_tiny_model, download_hub_model, file_sha256, load_model, resolve_device, save_model
from utils.monotonicity import apply_monotonicity, certify
from utils.perplexity import aggregate, document_nll
from utils.run_files import PipelineError, RunPaths, code_revision, read_json, write_json
from utils.tokenization import TokenFile, load_tokenizer, tokenize_split, train_bpe
from utils.training import train

TINY_PRETRAIN_SEED = 1234   # the tiny "foundation model" is shared by every experiment seed


# -- stage 0 -------------------------------------------------------------------

def unigram_perplexity(train: TokenFile, test: TokenFile, vocab_size: int) -> float:
    """Add-one unigram model from train counts, on the test tokens the LM scores."""
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    nll = sum(-logp[test.document(i)].sum() for i in range(len(test)))
    n = sum(len(test.document(i)) for i in range(len(test)))
    return math.exp(nll / n)


def heldout_perplexity(model, tokens: TokenFile, eos_id: int, cfg: ExperimentConfig, device) -> dict:
    """Stage 4's protocol (cfg.eval), on the whole test split."""
    e = cfg.eval
    per_doc = document_nll(model, [tokens.document(i) for i in range(len(tokens))], eos_id, e.max_len, e.stride,
                           e.batch_size, device)
    return {**aggregate(per_doc), "documents": len(tokens), "max_len": e.max_len, "stride": e.stride}


def setup(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Corpus, tokenizer, token files and the pretrained model, built once for all seeds."""
    shared = paths.shared
    device = resolve_device(cfg.device)
    manifest = {"config": cfg.to_dict(), "code_revision": code_revision()}
    if cfg.data.source == "hub":      # pin the dataset revision we read
        from huggingface_hub import HfApi
        manifest["dataset"] = {"hub_id": cfg.data.hub_id, "revision": cfg.data.revision,
                               "sha": HfApi().dataset_info(cfg.data.hub_id, revision=cfg.data.revision).sha,
                               "files": {s: getattr(cfg.data, f"{s}_file") for s in SPLITS}}
    print(f"[setup] writing corpus ({cfg.data.source}) to {shared / 'corpus'}")
    manifest["corpus"] = write_corpus(cfg.data, shared / "corpus",
                                      revision=manifest.get("dataset", {}).get("sha"))
    if cfg.model.source == "hub":
        print(f"[setup] downloading {cfg.model.hub_id}@{cfg.model.revision}")
        manifest["model"] = download_hub_model(cfg.model, shared / "hf_cache")
        pretrained = Path(manifest["model"]["path"])
        tokenizer = load_tokenizer(pretrained)
    else:
        print(f"[setup] training a {cfg.model.vocab_size}-token BPE tokenizer")
        tokenizer = train_bpe(read_corpus(shared / "corpus" / "train.jsonl"), cfg.model.vocab_size)
        pretrained = shared / "models" / "pretrained"
    tokenizer.save_pretrained(str(shared / "tokenizer"))
    manifest["tokenizer_sha256"] = file_sha256(shared / "tokenizer" / "tokenizer.json")
    manifest["tokens"] = {s: tokenize_split(tokenizer, shared / "corpus" / f"{s}.jsonl", shared / "tokens", s)
                          for s in SPLITS}
    tok = {s: TokenFile(shared / "tokens", s) for s in SPLITS}
    if cfg.model.source == "tiny":
        model = build_tiny_model(cfg.model, TINY_PRETRAIN_SEED)
        print(f"[setup] pretraining the tiny GPT-NeoX ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters) for {cfg.pretrain.max_tokens:,} tokens on {device}")
        manifest["pretrain"] = train(model, tok["train"].tokens, tok["val"].tokens, cfg.pretrain,
                                     cfg.data.seq_len, TINY_PRETRAIN_SEED, device, desc="pretrain")
        ppl = heldout_perplexity(model, tok["test"], tokenizer.eos_token_id, cfg, device)
        manifest["pretrained_test"] = ppl
        manifest["unigram_test_perplexity"] = unigram_perplexity(tok["train"], tok["test"], cfg.model.vocab_size)
        print(f"[setup] tiny pretrained test perplexity {ppl['perplexity']:.1f} "
              f"(add-one unigram model: {manifest['unigram_test_perplexity']:.1f})")
        save_model(model, pretrained, tokenizer)
    manifest["pretrained_path"] = str(pretrained)
    write_json(shared / "manifest.json", manifest)
    return [str(shared / "manifest.json"), str(pretrained / "config.json")] + \
           [str(t.path) for t in tok.values()]


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
    pretrained = Path(read_manifest(paths)["pretrained_path"])
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    probe_ids = certificate_probe(cfg, paths).to(device)
    model = load_model(pretrained, "float32", device)
    mo = cfg.monotone
    before = certify(model, mo.scope, trials=mo.cert_trials, seed=mo.cert_seed, input_ids=probe_ids)
    names = apply_monotonicity(model, mo.scope, mo.activation, mo.init_eps)
    print(f"[monotone] constrained {len(names)} modules (scope {mo.scope}, activation {mo.activation})")
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
    save_model(model.cpu(), out, tokenizer, extra={"certificate": str(cert_path), "label": cert["label"]})
    return [str(cert_path), str(out / "config.json")]
