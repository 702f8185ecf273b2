"""Several processes training one model: torchrun's environment, FSDP2 sharding, collectives.

A process started by torchrun (or by srun with the same variables: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is one rank. `init` joins the
process group: NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU,
which is how the tests run several ranks on one machine. Without torchrun none
of this is initialised and every helper below answers as the only process.

Sharding follows torchtitan: `fully_shard` on every transformer layer, then on
the root. The monotone parametrisations must already be registered: FSDP2
shards the parameters it finds (the pre-parameters V), and the parametrisation
recomputes W = softplus(V) from the gathered V inside each layer's forward.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from utils.run.run_files import PipelineError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Started by torchrun (or an equivalent launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join the process group of a torchrun launch (NCCL for device cuda/auto-with-GPU, else gloo)."""
    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise PipelineError(f"incomplete launcher environment (missing {', '.join(missing)}); start with torchrun")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Long enough for rank 0 to write a model export while the others wait at the next collective.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))


def destroy() -> None:
    if active():
        dist.destroy_process_group()


def _reduce(values: list[float], op) -> list[float]:
    if not active():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def any_rank(*flags: bool) -> list[bool]:
    """For each flag: is it set on any rank? (One collective: every rank must call it.)"""
    return [v > 0 for v in _reduce([float(f) for f in flags], dist.ReduceOp.MAX)]


def sum_across(*values: float) -> list[float]:
    return _reduce(list(values), dist.ReduceOp.SUM)


def from_main(value: int) -> int:
    """Rank 0's integer, on every rank."""
    if not active():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's JSON-able object, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def my_share(n: int) -> range:
    """This rank's contiguous share of n items (all of them in one process)."""
    r, w = rank(), world_size()
    return range(r * n // w, (r + 1) * n // w)


def gather_shares(items: list) -> list:
    """Every rank's list of results for its `my_share`, concatenated in rank order, on every rank."""
    return [x for part in gather_objects(items) for x in part]


def barrier() -> None:
    if active():
        dist.barrier()


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (gpt_neox.layers, model.layers, ...)."""
    lists = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")]
    if len(lists) != 1:
        raise PipelineError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return lists[0]


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over every rank: each layer one unit, the root (embeddings, head) another.

    Parameters stay float32 and are all-gathered in float32; bf16-mixed computes under
    torch.autocast exactly as one process does (utils.run.compute). FSDP's bf16 param_dtype
    would halve the all-gather traffic but compute something else than one process: W =
    softplus(V) from a bf16-rounded V (relative error of W 5.7e-3 instead of 1.4e-3 on
    Pythia-like weights), embeddings and norms in bf16, the residual stream cast to bf16 at
    every layer. A 1-GPU and an 8-GPU run must train the same thing (REFERENCE trap 2:
    master weights stay fp32). Gradients are reduced in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shard_from_main(model: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device) -> nn.Module:
    """Shard `model` (its parameters on the meta device, utils.model.modeling.empty_model) and fill
    every rank's slices from rank 0's whole `state` (None elsewhere), broadcast tensor by tensor:
    only rank 0 ever holds the whole model, in host memory. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    real_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    shard(model, device)
    model.to_empty(device=device)       # uninitialised memory for each rank's slices, and every buffer
    with torch.no_grad():
        for name, value in real_buffers.items():      # not in the state dict (rotary frequencies)
            model.get_buffer(name).copy_(value)
    set_model_state_dict(model, state if is_main() else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@torch.no_grad()
def gather_into(sharded: nn.Module, whole: nn.Module | None) -> None:
    """Copy a sharded model's weights into `whole`, rank 0's unsharded model of the same structure (None on
    the others), one tensor at a time: rank 0's host holds the model once, not a gathered state dict beside
    it (get_model_state_dict's full_state_dict). Collective."""
    from torch.distributed.tensor import DTensor
    targets = whole.state_dict() if is_main() else {}
    for name, value in sharded.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main():
            targets[name].copy_(value)