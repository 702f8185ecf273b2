"""Building, downloading, saving and loading models (Hugging Face dirs, safetensors only)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from configs.experiment_config import ModelConfig
from utils.monotonicity import materialised_state_dict, reparametrize_loaded
from utils.run_files import PipelineError, atomic_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda requested but no CUDA device is available (use --set device=cpu)")
    return torch.device(name)


def build_tiny_model(m: ModelConfig, seed: int) -> GPTNeoXForCausalLM:
    """A Pythia-shaped GPT-NeoX: parallel residual, exact GELU, rotary on 25% of head dims."""
    config = GPTNeoXConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, intermediate_size=m.d_ff, hidden_act="gelu",
        max_position_embeddings=m.context_length, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def download_hub_model(m: ModelConfig, cache_dir: Path) -> dict:
    """Fetch config, tokenizer and safetensors weights once; record what was fetched."""
    from huggingface_hub import HfApi, snapshot_download
    info = HfApi().model_info(m.hub_id, revision=m.revision, files_metadata=True)
    if not any(s.rfilename.endswith(".safetensors") for s in info.siblings):
        raise PipelineError(f"{m.hub_id}@{m.revision} has no safetensors weights; refusing pickle files")
    path = Path(snapshot_download(m.hub_id, revision=info.sha, cache_dir=str(cache_dir),
                                  allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    return {"hub_id": m.hub_id, "revision": m.revision, "sha": info.sha, "path": str(path),
            "files": {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """Save materialised weights (W = softplus(V)) as a HF directory, atomically."""
    with atomic_dir(Path(path)) as tmp:
        model.save_pretrained(tmp, state_dict=materialised_state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "run_info.json").write_text(json.dumps(extra, indent=2) + "\n")


def load_model(path: Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load any saved model; a monotone one comes back with its softplus parametrisation."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"no saved model at {path} (missing config.json)")
    if not list(path.glob("*.safetensors")):
        raise PipelineError(f"no safetensors weights in {path}; refusing to unpickle other formats")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise PipelineError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    return reparametrize_loaded(model).to(device)
