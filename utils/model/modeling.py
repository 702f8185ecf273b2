"""Building, saving and loading models (Hugging Face dirs, safetensors only; fetching is utils.data.hub)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from configs.experiment_config import ModelConfig
from utils.model.monotonicity import materialised_state_dict, reparametrize_loaded
from utils.run.run_files import PipelineError, atomic_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


PORTABLE_CODE = Path(__file__).parent / "portable" / "modeling_monotone.py"


def save_model(model, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """Save materialised weights (W = softplus(V)) as a HF directory, atomically.

    A model with the monotone activation also gets the custom code that defines it and an
    `auto_map` to it, so any Hugging Face tool loads it with trust_remote_code=True."""
    portable = getattr(model.config, "hidden_act", None) == "monotone_gelu"
    if portable:
        if not isinstance(model, GPTNeoXForCausalLM):
            raise PipelineError(f"portable monotone checkpoints are defined for GPT-NeoX, not {type(model).__name__}")
        model.config.auto_map = {"AutoModelForCausalLM": f"{PORTABLE_CODE.stem}.GPTNeoXForCausalLM"}
    with atomic_dir(Path(path)) as tmp:
        model.save_pretrained(tmp, state_dict=materialised_state_dict(model))
        if portable:
            shutil.copyfile(PORTABLE_CODE, tmp / PORTABLE_CODE.name)
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
    # On a GPU the weights go straight from the safetensors files to it: N measuring ranks would
    # otherwise each hold a whole host copy first (6.9B on 8 ranks: 221 GB).
    direct = {"device_map": str(device)} if torch.device(device).type == "cuda" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True,
                                                     attn_implementation="sdpa", **direct)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise PipelineError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    return reparametrize_loaded(model).to(device)


def empty_model(path: Path):
    """The model saved at `path` without its weights: parameters on the meta device (no memory),
    buffers real (rotary frequencies are not in the state dict), the monotone parametrisation
    registered as load_model registers it. Ranks other than 0 shard this and receive their slices
    from rank 0 (utils.run.distributed.shard_from_main), so one process per node reads the weights."""
    from accelerate import init_empty_weights
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"no saved model at {path} (missing config.json)")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return reparametrize_loaded(model)
