"""The non-decreasing GELU, registered with transformers as `monotone_gelu`.

Defined in utils/model/portable/modeling_monotone.py, the custom code every saved
monotone model carries (so other programs can load it); importing that module
registers the name in transformers' activation tables, so a saved config with
`hidden_act: monotone_gelu` loads through plain `from_pretrained` here too
(utils/__init__.py imports this module). Exact GELU has a minimum of about
-0.170 at x* ~ -0.7518 and decreases to the left of it (REFERENCE trap 1), so
an MLP with non-negative weights and GELU is *not* monotone.
"""
import torch
from torch import nn

from utils.model.portable.modeling_monotone import GELU_ARGMIN, GELU_MIN, MonotoneGELU  # noqa: F401  (registers)


def is_non_decreasing(act: nn.Module, lo: float = -30.0, hi: float = 30.0, n: int = 200_001) -> bool:
    """Numerical check on a dense grid in float64 (GELU fails it by ~1e-3 per step)."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    with torch.no_grad():
        y = act(x)
    return bool((y[1:] - y[:-1] >= -1e-12).all())
