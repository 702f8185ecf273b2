"""Peak memory of a training step per GPU, simulated on any machine (torchtitan's estimation method).

The real step (utils.train.training.optimizer_step: micro-batches, backward, clipping, AdamW, the
projected clamp; then validation's forward, window_loss; then the state a checkpoint saves) runs on
a model of the preset's shape built on the meta device, under FakeTensorMode (tensors with shapes
and no data) and, for N GPUs, a fake process group of N ranks with FSDP2 sharding as training does
it (utils.run.distributed.shard). torch's FSDPMemTracker (MemTracker for one GPU) records every
tensor allocated, by category; the peak is over two steps (the first, of one micro-batch, allocates
AdamW's moments; the second is a whole step).

What it does not see: the CUDA context, cuBLAS and NCCL workspaces and the caching allocator's
fragmentation (`fits` adds a stated reserve for them), and, on a PyTorch without CUDA, CUDA's
autocast rules: the fake tensors then live on the CPU device and autocast uses CPU's op lists
(bf16 matmuls either way; a few elementwise ops may differ in precision).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from configs.experiment_config import ExperimentConfig
from utils.model.monotonicity import apply_monotonicity
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.time_limits import PYTHIA_SHAPES, PYTHIA_VOCAB
from utils.train.checkpoint import _tensors
from utils.train.training import make_optimizer, optimizer_step, window_loss

GIB = 2 ** 30
RESERVE_GIB, USABLE = 2.0, 0.92     # assumed: CUDA context + workspaces; the allocator's fragmentation


def model_config(cfg: ExperimentConfig) -> GPTNeoXConfig:
    """The architecture a preset trains: Pythia's published shape by hub id, or the tiny model's fields."""
    m = cfg.model
    if m.source == "tiny":
        layers, d, heads, ff, vocab, ctx = m.n_layer, m.d_model, m.n_head, m.d_ff, m.vocab_size, m.context_length
    else:
        name = (m.hub_id or m.path).rstrip("/").split("/")[-1].lower()
        if name not in PYTHIA_SHAPES:
            raise ValueError(f"no known shape for {m.hub_id or m.path}; the estimate knows {', '.join(PYTHIA_SHAPES)}")
        (layers, d, heads), vocab, ctx, ff = PYTHIA_SHAPES[name], PYTHIA_VOCAB, 2048, 4 * PYTHIA_SHAPES[name][1]
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=ff, hidden_act="gelu", max_position_embeddings=ctx,
                           use_parallel_residual=True, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    config._attn_implementation = "sdpa"
    return config


def estimate(cfg: ExperimentConfig, gpus: int, micro_batch: int, arm: str = "monotonic", fake: bool = True,
             device: str = "cpu") -> dict:
    """Peak bytes per GPU of one training step of `arm` at `micro_batch` (the preset's grad_accum_steps),
    by category; `fake=False` allocates for real (the test's reference; one process only)."""
    recipe = cfg.recovery_baseline if arm == "baseline" else cfg.recovery_monotone
    seq, windows = cfg.data.seq_len, micro_batch * recipe.grad_accum_steps
    if windows % gpus:
        raise ValueError(f"{windows} windows per step do not split over {gpus} GPUs")
    dev = torch.device(device)
    compute = Compute(dev, "bf16-mixed" if cfg.precision in ("auto", "bf16-mixed") else "fp32")
    if gpus > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        config = model_config(cfg)
        with torch.device("meta") if fake else contextlib.nullcontext():
            model = GPTNeoXForCausalLM(config)
        if arm != "baseline":
            m = cfg.monotone
            apply_monotonicity(model, m.scope, m.activation, m.init_eps, m.construction, m.init)
        if recipe.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        sharded = gpus > 1
        if sharded:
            distributed.shard(model, dev)
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), \
                _clip_from_local_shards() if fake and sharded else contextlib.nullcontext():
            if fake:
                model.to_empty(device=dev)
            # Training's AdamW is fused on CUDA: no temporaries of the parameters' size. Its stand-in here is
            # the one-tensor-at-a-time loop (foreach would hold several copies of every parameter at once).
            opt = make_optimizer(model, recipe, dev)
            for group in opt.param_groups:
                group.update(foreach=False, fused=False)
            tracker = _tracker(model, opt, sharded)
            per_rank = windows // gpus
            with tracker:
                for step in range(2):        # the first step only allocates AdamW's moments: one micro-batch
                    micro = [torch.randint(0, config.vocab_size, (min(micro_batch, per_rank - o), seq + 1), device=dev)
                             for o in range(0, per_rank, micro_batch)][:None if step else 1]
                    # The tracker's module statistics allow one call of a module per pass: each micro-batch,
                    # validation and the checkpoint are a pass (the peak is over all of them).
                    optimizer_step(model, opt, micro, recipe, compute, sharded, after_backward=tracker.reset_mod_stats)
                    window_loss(model.eval(), micro[0], compute, sharded)
                    tracker.reset_mod_stats()
                    model.train()
                    _tensors(model, opt)                      # what a checkpoint reads
            peak = tracker.get_tracker_snapshot("peak")[dev]
    finally:
        if gpus > 1:
            dist.destroy_process_group()
    by_category = {str(k).split(".")[-1].lower().replace("fsdp", "").strip("_"): v for k, v in peak.items()}
    params = sum(p.numel() for p in model.parameters())
    return {"gpus": gpus, "micro_batch": micro_batch, "grad_accum_steps": recipe.grad_accum_steps, "seq_len": seq,
            "arm": arm, "parameters": params, "gradient_checkpointing": recipe.gradient_checkpointing,
            "precision": compute.precision, "peak_bytes": by_category, "peak_gib": by_category["total"] / GIB}


@contextlib.contextmanager
def _clip_from_local_shards():
    """clip_grad_norm_ computed from each rank's local gradient shards. Under the fake process group,
    DTensor norms allocate full-size temporaries (measured: twice the local gradients during
    clip_grad_norm_, none on real gloo ranks); the same norm from the local shards costs nothing."""
    real = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kwargs):
        local = [g.to_local() if hasattr(g, "to_local") else g for p in parameters if (g := p.grad) is not None]
        total = torch.stack([torch.linalg.vector_norm(g) for g in local]).norm()   # (+ an all-reduce: no memory)
        for g in local:
            g.mul_((max_norm / (total + 1e-6)).clamp(max=1.0))
        return total

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = real


def _tracker(model, opt, sharded: bool):
    if sharded:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        return FSDPMemTracker(model, opt)
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model, opt)
    return tracker


def fits(peak_gib: float, capacity_gib: float) -> bool:
    """The estimate plus RESERVE_GIB within USABLE of the GPU's memory (both stated assumptions)."""
    return peak_gib + RESERVE_GIB <= USABLE * capacity_gib
