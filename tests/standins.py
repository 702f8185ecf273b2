"""Local stand-ins for what a cluster user downloads, built here (never downloaded):

  pile_layout        the Pile mirror's files: train/00.jsonl.zst, val.jsonl.zst,
                     test.jsonl.zst, one {"text", "meta": {"pile_set_name"}} per line
  pythia_format_dir  a model directory as EleutherAI releases Pythia: GPT-NeoX with
                     Pythia's flags, the released config.json keys, fp16 safetensors,
                     a byte-level BPE tokenizer with <|endoftext|> = 0 and <|padding|> = 1,
                     embedding rows padded past the tokenizer (as 50,277 -> 50,304)
  hf_cache           a Hugging Face hub cache holding given files at a commit, in the
                     layout huggingface_hub writes (blobs, snapshots, refs), as a user
                     who fetched elsewhere and copied the cache would have it

Texts are the docstrings of the local Python standard library (nothing committed).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from configs.experiment_config import TrainConfig
from utils.data.corpus import stdlib_documents, stdlib_split
from utils.data.tokenization import train_bpe
from utils.run.compute import CPU
from utils.train.training import train

PILE_SETS = ("Pile-CC", "Github", "StackExchange", "Wikipedia (en)", "ArXiv")


def pile_documents(split: str, min_chars: int = 1500) -> list[dict]:
    """Stdlib docstrings of one split, joined per module into Pile-length documents."""
    by_module: dict[str, list[str]] = {}
    for doc in stdlib_documents(200):
        if stdlib_split(doc["id"], 0.1, 0.1) == split:
            by_module.setdefault(doc["id"].split(":")[0], []).append(doc["text"])
    out, buf = [], []
    for i, (module, texts) in enumerate(sorted(by_module.items())):
        buf += texts
        if sum(map(len, buf)) >= min_chars:
            out.append({"text": "\n\n".join(buf), "meta": {"pile_set_name": PILE_SETS[i % len(PILE_SETS)]}})
            buf = []
    return out


def pile_layout(root: Path) -> dict[str, Path]:
    """The mirror's three files under `root`; returns {split: path}."""
    files = {"train": root / "train" / "00.jsonl.zst", "val": root / "val.jsonl.zst", "test": root / "test.jsonl.zst"}
    for split, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in pile_documents(split)).encode()
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    return files


# GPT-NeoX-20B's tokenizer (every Pythia) ends in added whitespace-run tokens that are not special.
WHITESPACE_RUNS = [" " * n for n in range(24, 1, -1)][:8]


def pythia_tokenizer(texts: list[str], bpe_vocab: int):
    tokenizer = train_bpe(texts, bpe_vocab, special_tokens=("<|endoftext|>", "<|padding|>"))
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in WHITESPACE_RUNS])
    return tokenizer


def pythia_format_dir(out: Path, *, d_model: int = 64, n_layer: int = 2, n_head: int = 4, bpe_vocab: int = 1000,
                      pretrain_tokens: int = 60_000, seed: int = 0, rows: int | None = None) -> Path:
    """A toy Pythia, briefly pretrained on the stand-in train split so that attacks have a model to hurt
    (`rows`: the embedding rows, Pythia's 50,304 for its shape; default just past the tokenizer)."""
    texts = [d["text"] for d in pile_documents("train")]
    tokenizer = pythia_tokenizer(texts, bpe_vocab)
    rows = rows or -(-len(tokenizer) // 128) * 128 + 128   # padded past the tokenizer, as Pythia's 50,304
    released = {                                            # the keys of Pythia's released config.json
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": d_model, "initializer_range": 0.02, "intermediate_size": 4 * d_model,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox",
        "num_attention_heads": n_head, "num_hidden_layers": n_layer, "rotary_emb_base": 10000,
        "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": rows}
    config = GPTNeoXConfig(**{k: v for k, v in released.items() if k not in ("architectures", "torch_dtype",
                                                                          "transformers_version")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.asarray([t for doc in ids for t in doc + [0]], dtype=np.uint16)
    train(model, stream, stream[:4096], TrainConfig(max_tokens=pretrain_tokens, micro_batch_size=16, lr=3e-3,
                                                    eval_windows=4, log_interval=1000), 64, seed, CPU,
          desc="stand-in pythia")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(released, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="GPTNeoXTokenizer", add_prefix_space=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return out


def hf_cache(cache: Path, repo_id: str, repo_type: str, files: dict[str, Path], revision: str = "main") -> str:
    """Put `files` ({path in repo: local file}) into a hub cache at a commit; returns the commit sha."""
    sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(Path(v).read_bytes()).hexdigest())
                                   for k, v in files.items())).encode()).hexdigest()
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return sha
