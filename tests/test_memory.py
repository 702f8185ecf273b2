"""What decides a large run's memory: no KV cache outside generation, an OOM retry that frees the
failed attempt, and losses that never hold [batch, length, vocab] float32 logits."""
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from configs.experiment_config import ModelConfig
from utils.attacks.core import Victim, target_mask
from utils.measure.perplexity import document_nll
from utils.model import next_token
from utils.model.modeling import build_tiny_model
from utils.model.monotonicity import apply_monotonicity, capture_mlp_inputs
from utils.run.compute import CPU, halving_on_oom
from utils.train.training import lm_loss, validation_loss

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=128, context_length=64)


def caches_built(model):
    """A list that gets, for every forward of the model's decoder stack, the cache it returned."""
    seen = []
    model.base_model.register_forward_hook(lambda m, args, out: seen.append(out.past_key_values))
    return seen


def test_no_forward_outside_generation_builds_a_kv_cache():
    model = build_tiny_model(SMALL, 0).eval()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6, "softplus_abs")
    seen = caches_built(model)
    tokens = np.random.default_rng(0).integers(2, 128, 2000)
    seqs = [torch.tensor([0, *tokens[i:i + 20]]) for i in range(0, 60, 20)]
    routines = {
        "training loss": lambda: lm_loss(model, torch.from_numpy(tokens[:66].reshape(2, 33))),
        "validation": lambda: validation_loss(model, tokens, 32, 4, 8, CPU),
        "perplexity": lambda: document_nll(model, [tokens[:100], tokens[100:150]], 0, 32, 16, 4, CPU),
        "attack scoring": lambda: Victim(model, CPU, 4).nll(seqs),
        "attack gradient": lambda: Victim(model, CPU, 4).grads(seqs, [target_mask(len(s)) for s in seqs]),
        "certificate": lambda: capture_mlp_inputs(model, torch.from_numpy(tokens[:32])[None]),
    }
    for name, run in routines.items():
        seen.clear()
        run()
        assert seen and all(c is None for c in seen), f"{name} built a KV cache"
    seen.clear()
    model(input_ids=torch.from_numpy(tokens[:8])[None])        # the check can fail: HF's default builds one
    assert seen[0] is not None


def test_an_oom_retry_frees_the_failed_attempt_before_the_halves_run():
    """A simulated CUDA OOM after the attempt allocated its activations: when the halves run, nothing
    of the failed attempt may still be alive (an exception's traceback keeps its frames alive)."""
    failed_attempt, alive_at_retry = [], []

    def fn(seqs, targets):
        if failed_attempt:
            alive_at_retry.append(failed_attempt[0]() is not None)
        if len(seqs) > 2:
            activations = torch.ones(1000, 1000)
            failed_attempt.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("simulated")
        return [s * 2 for s in seqs]

    seqs = [torch.tensor([i]) for i in range(4)]
    out = halving_on_oom(fn, seqs, [None] * 4)
    gc.collect()
    assert [int(o) for o in out] == [0, 2, 4, 6]          # every sequence, in order, none dropped
    assert alive_at_retry == [False, False]


def test_a_single_sequence_that_does_not_fit_is_reported_not_dropped():
    def fn(seqs, targets):
        raise torch.cuda.OutOfMemoryError("simulated")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        halving_on_oom(fn, [torch.tensor([1])], [None])


def test_perplexity_retries_a_batch_that_does_not_fit_in_halves_with_the_same_sums(monkeypatch):
    """Perplexity and the attacks share one OOM rule: a batch of windows that 'does not fit' (more than
    one window here) is scored in halves, and every document's sums are those of the whole batch."""
    from utils.measure import perplexity
    model = build_tiny_model(SMALL, 0).eval()
    docs = [np.random.default_rng(i).integers(2, 128, n) for i, n in enumerate((90, 40, 70))]
    whole = document_nll(model, docs, 0, 32, 16, 8, CPU)
    real, sizes = perplexity.score_windows, []

    def tight(model, seqs, compute):
        sizes.append(len(seqs))
        if len(seqs) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, seqs, compute)

    monkeypatch.setattr(perplexity, "score_windows", tight)
    halved = document_nll(model, docs, 0, 32, 16, 8, CPU)
    assert [n for _, n in halved] == [n for _, n in whole]
    assert [x for x, _ in halved] == pytest.approx([x for x, _ in whole], rel=1e-6)
    windows = sum(len(perplexity.rolling_windows(len(d) + 1, 32, 16)) for d in docs)
    assert max(sizes) == 8 and sizes.count(1) == windows          # every window scored once, alone


class VocabTensors(TorchDispatchMode):
    """Records the largest number of rows of any op output whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_losses_project_the_vocabulary_one_chunk_at_a_time_and_equal_full_logits(monkeypatch):
    """Training loss (forward and backward), perplexity and attack gradients: no op ever outputs more
    than LOGIT_ROWS rows of vocabulary scores, and the values equal the full-logits computation."""
    monkeypatch.setattr(next_token, "LOGIT_ROWS", 40)   # more rows than d_model (the head weight transposed is [d, vocab])
    model = build_tiny_model(SMALL, 0).double()
    batch = torch.from_numpy(np.random.default_rng(1).integers(2, 128, (5, 33)))   # 160 positions: no dimension but the vocabulary is 128
    with VocabTensors(128) as seen:
        loss = lm_loss(model, batch)
        loss.backward()
    assert seen.rows == 40
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with VocabTensors(128) as full:                       # what it replaced: the check can fail
        logits = model(input_ids=batch[:, :-1]).logits
        reference = F.cross_entropy(logits.reshape(-1, 128), batch[:, 1:].reshape(-1))
        reference.backward()
    assert full.rows == 5 * 32
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    assert all(torch.allclose(a, p.grad, atol=1e-12) for a, p in zip(chunked, model.parameters()))
    model = model.float().eval()
    docs = [batch[0].numpy(), batch[1, :20].numpy()]
    with VocabTensors(128) as seen:
        document_nll(model, docs, 0, 16, 8, 4, CPU)
        Victim(model, CPU, 4).grads([batch[0]], [target_mask(33)])
    assert seen.rows <= 40


def test_the_simulated_memory_of_a_training_step_is_what_it_really_allocates():
    """benchmarks/estimate_memory.py's estimate (fake tensors, no data) against the same step with real
    tensors on this CPU (torch's MemTracker both times): the tiny preset, one process, grad accumulation 2."""
    from configs.presets import load_config
    from utils.train.memory import estimate
    cfg = load_config("tiny", [("recovery_monotone.grad_accum_steps", "2")])
    simulated, real = estimate(cfg, 1, 8, fake=True), estimate(cfg, 1, 8, fake=False)
    assert simulated["peak_bytes"]["param"] == real["peak_bytes"]["param"] == 4 * simulated["parameters"]
    assert simulated["peak_bytes"]["opt"] == real["peak_bytes"]["opt"]           # AdamW's two moments
    assert simulated["peak_bytes"]["total"] == pytest.approx(real["peak_bytes"]["total"], rel=0.05)
    two = estimate(cfg, 2, 8, fake=True)                                         # 2 fake ranks, FSDP2
    assert two["peak_bytes"]["sharded_param"] == pytest.approx(simulated["peak_bytes"]["param"] / 2, rel=0.02)


def _rss_peak_growth_kib(fn) -> int:
    """How far this process's peak resident memory rose above its current size while `fn` ran (VmHWM,
    restarted through /proc/self/clear_refs). Large tensors are mmapped and returned to the system when freed."""
    from pathlib import Path

    def field(name):
        return int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                        if l.startswith(name + ":")).split()[1])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start = field("VmRSS")
    fn()
    return field("VmHWM") - start


def test_a_monotone_model_is_saved_one_materialised_weight_at_a_time(tmp_path):
    """save_model writes W = softplus(V) of each constrained module as it writes the file, not a materialised
    state dict beside the model (pythia-1.4b: 57% of the model again on rank 0's host at every export): saving
    a model with 64 MiB of constrained weights (16 of 4 MiB) grows the host peak by less than 16 MiB (with a
    materialised state dict, measured: 60), and every saved tensor is the model's effective one, bitwise."""
    from torch.nn.utils import parametrize
    from utils.model.modeling import SavedWeights, load_model, save_model
    model = build_tiny_model(ModelConfig(n_layer=8, d_model=512, n_head=8, d_ff=2048, vocab_size=128,
                                         context_length=64), 0)
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    save_model(model, tmp_path / "warm")                 # imports and first-call set-up, outside the measure
    grown = _rss_peak_growth_kib(lambda: save_model(model, tmp_path / "model"))
    assert grown < 16 * 1024, f"saving grew the host peak by {grown / 1024:.1f} MiB"
    saved = SavedWeights(tmp_path / "model", model)
    effective = {**model.state_dict(), **{f"{n}.weight": m.weight for n, m in model.named_modules()
                                          if parametrize.is_parametrized(m, "weight")}}
    assert len(saved) == len([k for k in effective if ".parametrizations." not in k]) == 100
    assert all(torch.equal(saved[k], effective[k]) for k in saved)
    assert load_model(tmp_path / "model").config.monotone == model.config.monotone
