"""Where models compute and in which precision: one object every model-running routine takes.

Precision `fp32` computes in float32. `bf16-mixed` keeps float32 weights (the
master copy the optimizer updates: pure bf16 weights freeze small updates,
REFERENCE trap 2) and runs forwards under torch.autocast in bfloat16, on CUDA
and on CPU alike, so the GPU recipe's numerics can be tested on any machine.
`auto` (the config default) is bf16-mixed on CUDA and fp32 on CPU.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from utils.run.run_files import PipelineError

PRECISIONS = ("auto", "fp32", "bf16-mixed")


def deterministic_from_environment() -> bool:
    """MONO_DETERMINISTIC=1: deterministic kernels only (torch.use_deterministic_algorithms, and the
    cuBLAS workspace setting it needs), so that bitwise checks hold on CUDA as they do on a CPU
    (benchmarks/gpu_check.sh sets it for its resume tests). Off by default: slower kernels."""
    if os.environ.get("MONO_DETERMINISTIC") != "1":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")     # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    # The fused attention kernels' backward passes accumulate with atomics; the math kernel does not.
    for fused in ("flash", "mem_efficient", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{fused}_sdp")(False)
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda requested but no CUDA device is available (use --set device=cpu)")
    return torch.device(name)


@dataclass(frozen=True)
class Compute:
    device: torch.device
    precision: str = "fp32"          # fp32 | bf16-mixed (resolved, never auto)

    @classmethod
    def from_config(cls, device: str, precision: str) -> "Compute":
        dev = resolve_device(device)
        if precision == "auto":
            precision = "bf16-mixed" if dev.type == "cuda" else "fp32"
        return cls(dev, precision)

    def autocast(self, sharded: bool = False):
        """Context for forward passes (and the loss); backward runs outside it.

        `sharded` (an FSDP model) turns off autocast's cache of bf16 weight copies: it would keep
        one of every all-gathered layer until the forward ends, a bf16 copy of the whole model
        on every rank. The numbers are the same; each use of a weight casts it again."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not sharded)
        return nullcontext()

    def describe(self) -> dict:
        """What result files record about how their numbers were computed."""
        return {"device": str(self.device), "precision": self.precision,
                "weights": "float32", "autocast": "bfloat16" if self.precision == "bf16-mixed" else None}


CPU = Compute(torch.device("cpu"), "fp32")


def halving_on_oom(fn, items: list, *rest: list) -> list:
    """fn over a batch (items and the lists beside them); on CUDA OOM in halves, never dropping an item.
    Every batched forward (attack queries, perplexity windows) goes through it.

    The retry runs after the `except` block: inside it the exception's traceback still holds
    the failed attempt's frames and so its activations, the memory the halves need."""
    try:
        return fn(items, *rest)
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
    torch.cuda.empty_cache()
    half = len(items) // 2
    return halving_on_oom(fn, items[:half], *(r[:half] for r in rest)) + \
        halving_on_oom(fn, items[half:], *(r[half:] for r in rest))
