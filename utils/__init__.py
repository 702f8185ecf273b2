"""Library of the monotone-LLM robustness pipeline.

Importing it registers the `monotone_gelu` activation with transformers, so a
saved monotone model loads through plain `AutoModelForCausalLM.from_pretrained`.
"""
from transformers.utils import logging as _hf_logging

from utils.model import activations as _activations  # noqa: F401  (registration side effect)

_hf_logging.disable_progress_bar()   # keep job logs readable
