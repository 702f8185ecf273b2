"""A non-decreasing GELU, registered with transformers as `monotone_gelu`.

Exact GELU x*Phi(x) has a minimum of about -0.170 at x* ~ -0.7518 and decreases
to the left of it (REFERENCE trap 1), so an MLP with non-negative weights and
GELU is *not* monotone. MonotoneGELU(x) = GELU(max(x, x*)): equal to GELU
wherever GELU is increasing, constant at its minimum below.

Registering the name in transformers' activation tables means a saved config with
`hidden_act: monotone_gelu` loads through plain `from_pretrained` once this
module has been imported (utils/__init__.py imports it).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
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


def is_non_decreasing(act: nn.Module, lo: float = -30.0, hi: float = 30.0, n: int = 200_001) -> bool:
    """Numerical check on a dense grid in float64 (GELU fails it by ~1e-3 per step)."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    with torch.no_grad():
        y = act(x)
    return bool((y[1:] - y[:-1] >= -1e-12).all())
