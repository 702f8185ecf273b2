"""Building, saving and loading models (Hugging Face dirs, safetensors only; fetching is utils.data.hub)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from configs.experiment_config import ModelConfig
from utils.model.monotonicity import reparametrize_loaded
from utils.run import streamed_safetensors
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


def saved_name(model, name: str) -> str:
    """The name the model's tensor `name` has in its saved files: transformers renames some on saving
    (GPT-NeoX's lm_head.weight is saved as embed_out.weight, Pythia's own name)."""
    renamed = list(revert_weight_conversion(model, {name: torch.empty(0, device="meta")}))
    if len(renamed) != 1:
        raise PipelineError(f"{type(model).__name__} converts {name} into {renamed} on saving: not supported")
    return renamed[0]


def _saved_tensors(model) -> list[streamed_safetensors.Entry]:
    """What save_pretrained would write, under its names, each computed only when written: the materialised
    W (softplus(V), s * softplus(V)) of a constrained module under its plain `.weight` name (a whole
    materialised state dict would be ~57% of pythia-1.4b again on the host); V and signed_units' signs
    are not saved (loading recovers them from W); tied copies are left out as save_pretrained leaves them."""
    like, produce = {}, {}
    for key, tensor in model.state_dict().items():
        if ".parametrizations." not in key:
            like[key], produce[key] = tensor, (lambda t=tensor: t)
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            like[f"{name}.weight"] = mod.parametrizations.weight.original     # its shape, dtype and storage
            produce[f"{name}.weight"] = lambda m=mod: m.weight
    kept = remove_tied_weights_from_state_dict(like, model)
    return [streamed_safetensors.Entry(saved_name(model, k), like[k].dtype, tuple(like[k].shape), produce[k])
            for k in sorted(kept)]


def save_model(model, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """Save materialised weights (W = softplus(V)) as a HF directory, atomically, one tensor at a time
    (utils.run.streamed_safetensors: the host never holds the model twice).

    A model with the monotone activation also gets the custom code that defines it and an
    `auto_map` to it, so any Hugging Face tool loads it with trust_remote_code=True."""
    portable = getattr(model.config, "hidden_act", None) == "monotone_gelu"
    if portable:
        if not isinstance(model, GPTNeoXForCausalLM):
            raise PipelineError(f"portable monotone checkpoints are defined for GPT-NeoX, not {type(model).__name__}")
        model.config.auto_map = {"AutoModelForCausalLM": f"{PORTABLE_CODE.stem}.GPTNeoXForCausalLM"}
    with atomic_dir(Path(path)) as tmp:
        model.config.dtype = str(model.dtype).split(".")[1]          # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        streamed_safetensors.write(tmp / "model.safetensors", _saved_tensors(model), {"format": "pt"})
        if portable:
            shutil.copyfile(PORTABLE_CODE, tmp / PORTABLE_CODE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "run_info.json").write_text(json.dumps(extra, indent=2) + "\n")


class SavedWeights(Mapping):
    """A saved model's tensors by `model`'s own names (a model of its structure), read from its safetensors
    files one at a time when asked: what a whole loaded copy would give, without the copy on the host."""

    def __init__(self, path: Path, model):
        self._files = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                self._files.update(dict.fromkeys(f.keys(), file))
        names = [k for k in model.state_dict() if ".parametrizations." not in k] + \
            [f"{n}.weight" for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
        self._names = {name: saved for name in names if (saved := saved_name(model, name)) in self._files}

    def __getitem__(self, name: str) -> torch.Tensor:
        saved = self._names[name]
        with safe_open(str(self._files[saved]), framework="pt") as f:
            return f.get_tensor(saved)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


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
