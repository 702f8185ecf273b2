"""Hugging Face custom code shipped inside every saved model with the monotone activation.

Self-contained (torch and transformers only), so that in a Python that never
imported this project
    AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
loads a monotone model: the saved weights are the materialised W = softplus(V),
so the only missing piece is the activation `monotone_gelu`, registered here.
config.json points here through `auto_map`. This file is also the project's
own definition of the activation (utils/model/activations.py imports it).

MonotoneGELU(x) = GELU(max(x, x*)) with x* ~ -0.7518 the minimum of exact GELU
x * Phi(x): equal to GELU wherever GELU increases, constant at its minimum
below, so it is non-decreasing (plain GELU is not).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
import transformers
from transformers import activations as hf_activations


def _gelu_argmin() -> float:
    """Solve d/dx [x Phi(x)] = Phi(x) + x phi(x) = 0 by Newton's method in float64."""
    x = -0.75
    for _ in range(50):
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        Phi = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        f = Phi + x * phi                 # derivative of GELU
        df = 2 * phi - x * x * phi        # second derivative
        x -= f / df
    return x


GELU_ARGMIN = _gelu_argmin()                                               # ~ -0.751791
GELU_MIN = GELU_ARGMIN * 0.5 * (1 + math.erf(GELU_ARGMIN / math.sqrt(2)))  # ~ -0.169971


class MonotoneGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(torch.clamp(x, min=GELU_ARGMIN))


# ACT2FN is a copy of ACT2CLS made at import, so both need the entry.
hf_activations.ACT2CLS["monotone_gelu"] = MonotoneGELU
hf_activations.ACT2FN["monotone_gelu"] = MonotoneGELU


class GPTNeoXForCausalLM(transformers.GPTNeoXForCausalLM):
    """GPT-NeoX whose config names the monotone activation (registered above)."""


# Saved checkpoints use the released Pythia name embed_out for the head; transformers 5 renames it
# to lm_head for its own class but not for custom code unless the mapping is registered.
try:
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
except ImportError:        # transformers 4: the head is called embed_out, nothing to rename
    pass
else:
    register_checkpoint_conversion_mapping(
        "GPTNeoXForCausalLM", [WeightRenaming(source_patterns=r"^embed_out\.", target_patterns="lm_head.")],
        overwrite=True)
