"""The one training loop (tiny pretraining now; the recoveries reuse it).

Data order is a pure function of (seed, window index): the token stream is
cut into non-overlapping windows of seq_len + 1 tokens, shuffled per epoch by a
generator seeded with (seed, epoch). Optimizer step s trains on global windows
[s * G, (s + 1) * G) with G = micro_batch_size * grad_accum_steps, whatever the
number of processes: under torchrun each rank takes a contiguous 1/N of them
(utils.run.distributed), so a run's position is one integer and a checkpoint
resumes at any world size. Weights stay fp32 whatever the precision
(utils.run.compute): bf16 master weights make AdamW updates of ~1e-5 vanish
(REFERENCE trap 2).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.experiment_config import TrainConfig
from utils.model.monotonicity import constrained_cache, project_constrained_
from utils.model.next_token import final_hidden, target_nll
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.run_files import PipelineError
from utils.run.signals import Preempted


class PackedBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perm

    def rows(self, first: int, count: int) -> torch.Tensor:
        """The [count, seq_len + 1] token windows number first .. first + count - 1 of the shuffled stream."""
        rows = []
        for g in range(first, first + count):
            start = int(self._permutation(g // self.n_windows)[g % self.n_windows]) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def batch(self, micro_step: int) -> torch.Tensor:
        """The windows of global micro-step `micro_step` (batch_size of them)."""
        return self.rows(micro_step * self.batch_size, self.batch_size)


def budget_tokens(t: TrainConfig, seq_len: int) -> int:
    """Tokens a recipe trains on: max_tokens rounded up to whole optimizer steps."""
    per_step = t.micro_batch_size * t.grad_accum_steps * seq_len
    return max(1, math.ceil(t.max_tokens / per_step)) * per_step


def passes(run: str, budget: int, n_tokens: int, seq_len: int, max_epochs: float | None) -> dict:
    """Passes a budget makes over the packed training tokens (printed); more than max_epochs is refused."""
    per_epoch = (n_tokens - 1) // seq_len * seq_len          # whole windows, as PackedBatches reads them
    epochs = budget / max(per_epoch, 1)
    if distributed.is_main():
        print(f"[{run}] {budget:,} tokens = {epochs:.2f} passes over {per_epoch:,} distinct training tokens"
              + (" (repeating data)" if epochs > 1 else ""))
    if max_epochs is not None and epochs > max_epochs * (1 + 1e-9):
        raise PipelineError(
            f"{run}: {budget:,} tokens are {epochs:.2f} passes over the {per_epoch:,} training tokens, more than "
            f"data.max_epochs={max_epochs:g}; rerun stage 0 with more training documents (data.train_docs), lower "
            f"{run}.max_tokens, or allow the repetition with --set data.max_epochs={math.ceil(epochs * 100) / 100:g}")
    return {"training_tokens": n_tokens, "tokens_per_epoch": per_epoch, "epochs": epochs}


def lr_at(step: int, total_steps: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_fraction, or (wsd) constant and a linear decay to it
    over the last cooldown_fraction of the steps (steps are optimizer steps)."""
    warmup = int(t.warmup_fraction * total_steps)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.schedule == "wsd":
        decay = max(1, round(t.cooldown_fraction * total_steps))
        return cooldown_lr(step - (total_steps - decay), decay, t.lr, t) if step >= total_steps - decay else t.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return t.lr * (t.min_lr_fraction + (1 - t.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def cooldown_lr(step: int, steps: int, start_lr: float, t: TrainConfig) -> float:
    """Step `step` of a linear decay over `steps` steps from start_lr to the floor (reached at the last one)."""
    floor = t.lr * t.min_lr_fraction
    return start_lr + (floor - start_lr) * (step + 1) / steps


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of [rows, seq_len + 1] windows (no full logits: utils.model.next_token)."""
    return target_nll(model, final_hidden(model, batch[:, :-1]), batch[:, 1:], every=True).mean()


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int,
                    compute: Compute) -> float:
    """Mean next-token loss over the first `max_windows` disjoint windows (a training monitor;
    the reported perplexity is utils.measure.perplexity's).

    Under torchrun the batches are dealt round-robin to the ranks; every rank runs the same
    number of forwards (a sharded model's forward is collective), the spare ones weighted 0.
    """
    was_training = model.training
    model.eval()
    sharded = distributed.is_sharded(model)
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    starts = list(range(0, n, batch_size))
    rank, world = distributed.rank(), distributed.world_size()
    total = 0.0
    for k in range(rank, math.ceil(len(starts) / world) * world, world):
        i = starts[k] if k < len(starts) else 0
        rows = [np.asarray(tokens[j * seq_len:j * seq_len + seq_len + 1], dtype=np.int64)
                for j in range(i, min(n, i + batch_size))]
        loss = window_loss(model, torch.from_numpy(np.stack(rows)).to(compute.device), compute, sharded).item()
        total += loss * len(rows) if k < len(starts) else 0.0
    model.train(was_training)
    return distributed.sum_across(total)[0] / n


def window_loss(model, rows: torch.Tensor, compute: Compute, sharded: bool) -> torch.Tensor:
    """Validation's forward of one batch of windows (no gradient). softplus(V) once per forward in one
    process; sharded, a cached W of every layer would outlive its layer's all-gather: a whole unsharded
    copy of the constrained weights on every rank."""
    with torch.no_grad(), compute.autocast(sharded), (nullcontext() if sharded else constrained_cache(model)):
        return lm_loss(model, rows)


def optimizer_step(model, opt, micro_batches: list[torch.Tensor], t: TrainConfig, compute: Compute,
                   sharded: bool, after_backward=None) -> list[torch.Tensor]:
    """One optimizer step over this rank's windows of the step, in micro-batches: each micro-batch's
    mean loss weighted by its share of the rank's windows (FSDP averages the ranks' gradients, which
    are reduce-scattered once, after the last micro-batch); then clipping by the global norm (across
    shards), AdamW, and the projected construction's W <- max(W, 0) (a no-op for the others).
    Returns the weighted losses, as tensors (no device sync here). `after_backward()` is called after
    each micro-batch's backward (utils.train.memory's tracker starts a new module pass there)."""
    n, losses = sum(len(b) for b in micro_batches), []
    for i, batch in enumerate(micro_batches):
        if sharded:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with compute.autocast(sharded):
            loss = lm_loss(model, batch) * len(batch) / n
        loss.backward()
        losses.append(loss.detach())
        if after_backward is not None:
            after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    project_constrained_(model)
    opt.zero_grad(set_to_none=True)
    return losses


def make_optimizer(model, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay only matrices, and never the softplus pre-parameters V: decay on V
    # pulls softplus(V) toward ln 2, not toward 0 (REFERENCE trap 4).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "parametrizations" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def tensorboard_writer(log_dir: Path, start_step: int):
    """A TensorBoard writer if tensorboard is installed (else None); a resumed run drops what
    the interrupted one logged after its checkpoint (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=start_step or None)


def add_segment(segments: list[dict], first: int, last: int, processes: int) -> None:
    """Record that steps [first, last) were trained by `processes` processes (merged when contiguous)."""
    if last <= first:
        return
    if segments and segments[-1]["last_step"] == first and segments[-1]["processes"] == processes:
        segments[-1]["last_step"] = last
    else:
        segments.append({"first_step": first, "last_step": last, "processes": processes})


def train(model, train_tokens: np.ndarray, val_tokens: np.ndarray, t: TrainConfig, seq_len: int,
          seed: int, compute: Compute, desc: str = "train", checkpointer=None, stop=None,
          on_best=None, max_epochs: float | None = None, history_file: Path | None = None, on_step=None,
          branch: tuple[int, int] | None = None) -> dict:
    """Train `model` in place for t.max_tokens tokens; returns the history.

    `branch=(k, c)` (the recipe search): train the run's first k steps (checkpointed at step k: the prefix its
    full run can go on from), then c steps of a linear decay from the lr step k would have to the floor, on the
    run's next tokens, unsaved; the returned val_loss is the one after them.

    With a `checkpointer`, resumes from its newest checkpoint and saves every
    t.checkpoint_every_steps steps / t.checkpoint_every_minutes minutes and at
    the end. With `stop`, a signal makes it checkpoint and raise Preempted.
    `on_best(model, step, val_loss)` is called when the validation loss improves, and
    `on_step(model, step, tokens)` after every optimizer step (the tiny pretraining's snapshots).
    A budget needing more than `max_epochs` passes over the training tokens is refused.
    `history_file` gets every history row as a JSON line as soon as it exists (watch or plot a
    running job); after a resume it is rewritten from the checkpoint's history first. With
    tensorboard installed, the rows also go to TensorBoard event files in tensorboard/<desc>/ beside it.

    Under torchrun (utils.run.distributed initialised) the model is sharded with FSDP2 in place and
    every rank calls this; rank 0 alone prints, logs and writes the history.
    """
    device = compute.device
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    windows_per_step = t.micro_batch_size * t.grad_accum_steps
    if windows_per_step % world:
        raise PipelineError(f"{desc}: {windows_per_step} sequences per optimizer step (micro_batch_size x "
                            f"grad_accum_steps) do not split evenly over {world} processes")
    per_rank = windows_per_step // world
    tokens_per_step = windows_per_step * seq_len
    total_steps = budget_tokens(t, seq_len) // tokens_per_step
    saved_until = total_steps if branch is None else branch[0]       # the last step that belongs to the run itself
    end = total_steps if branch is None else sum(branch)
    batches = PackedBatches(train_tokens, seq_len, t.micro_batch_size, seed)
    data = passes(desc, budget_tokens(t, seq_len), len(train_tokens), seq_len, max_epochs)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sharded = distributed.active()
    if sharded and not distributed.is_sharded(model):     # moves each rank's shard to the device
        distributed.shard(model, device)
    else:                        # the recoveries load the model there already; the tiny pretraining builds it on the CPU
        model.to(device)
    model.train()
    opt = make_optimizer(model, t, device)
    # segments: which steps were trained by how many processes (a run resumed on another world size
    # has several); a checkpoint of an older version has none for the steps before it.
    state = {"step": 0, "history": [], "best_val_loss": None, "best_step": None, "train_seconds": 0.0, "segments": []}
    if checkpointer is not None:
        restored = checkpointer.load_latest(model, opt)
        if restored:
            state = {k: restored.get(k, state[k]) for k in state}
    start_step, t0, last_ckpt = state["step"], time.time(), time.time()
    board = None
    if history_file is not None and main:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history_file.write_text("".join(json.dumps(r) + "\n" for r in state["history"]))
        log_dir = history_file.parent / "tensorboard" / desc
        unlogged = not any(log_dir.glob("events.*"))     # a checkpoint written without a board: a search's prefix
        board = tensorboard_writer(log_dir, start_step)

    def to_board(row: dict) -> None:
        if board is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    board.add_scalar(f"{desc}/{key}", value, row["step"])
            board.flush()

    if board is not None and unlogged:
        for row in state["history"]:
            to_board(row)

    def record(row: dict) -> None:
        state["history"].append(row)
        if history_file is not None and main:
            with history_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        to_board(row)

    def evaluate(step):
        val = validation_loss(model, val_tokens, seq_len, t.micro_batch_size, t.eval_windows, compute)
        if state["best_val_loss"] is None or val < state["best_val_loss"]:
            state["best_val_loss"], state["best_step"] = val, step
            if on_best is not None and step <= saved_until:      # not a branch's weights
                on_best(model, step, val)
        return val

    if start_step == 0:   # the starting point, for the record (and "best" can never be worse)
        record({"step": 0, "tokens": 0, "lr": 0.0, "train_loss": None, "tokens_per_s": None,
                                 "val_loss": evaluate(0)})
    # Redraw often on a terminal, every 30 s in a batch job log.
    bar = tqdm(range(start_step, end), desc=desc, unit="step", initial=start_step, total=end,
               mininterval=1 if sys.stderr.isatty() else 30, disable=not main)
    for step in bar:
        lr = lr_at(step, total_steps, t) if step < saved_until else \
            cooldown_lr(step - saved_until, branch[1], lr_at(saved_until, total_steps, t), t)
        for group in opt.param_groups:
            group["lr"] = lr
        first = step * windows_per_step + rank * per_rank          # this rank's slice of the step's windows
        micro = [batches.rows(first + offset, min(t.micro_batch_size, per_rank - offset)).to(device)
                 for offset in range(0, per_rank, t.micro_batch_size)]
        loss_sum = sum(loss.item() for loss in optimizer_step(model, opt, micro, t, compute, sharded))
        done = step + 1
        if on_step is not None:
            on_step(model, done, done * tokens_per_step)
        tok_s = (done - start_step) * tokens_per_step / (time.time() - t0)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if done % t.log_interval == 0 or done % t.eval_interval == 0 or done == end:
            row = {"step": done, "tokens": done * tokens_per_step, "lr": lr,
                   "train_loss": distributed.sum_across(loss_sum)[0] / world, "tokens_per_s": tok_s}
            if done % t.eval_interval == 0 or done == end:
                row["val_loss"] = evaluate(done)
            record(row)
        if checkpointer is not None and done <= saved_until:
            # One collective: a signal on any rank (or rank 0's clock) stops or checkpoints every rank.
            stopping, overdue = distributed.any_rank(
                stop is not None and stop.requested, time.time() - last_ckpt > 60 * t.checkpoint_every_minutes)
            if done % t.checkpoint_every_steps == 0 or done == saved_until or stopping or overdue:
                state["step"] = done
                state["train_seconds"] += time.time() - t0
                add_segment(state["segments"], start_step, done, world)
                t0, start_step = time.time(), done
                checkpointer.save(done, model, opt, {k: v for k, v in state.items() if k != "step"})
                last_ckpt = time.time()
            if stopping:
                bar.close()
                own = stop is not None and stop.signum is not None
                raise Preempted(f"stopped by {stop.reason if own else 'a signal to another process'} after step "
                                f"{done}/{total_steps}; checkpoint saved, rerun the same command to resume",
                                stop.signum if own else signal.SIGUSR1)
        elif stop is not None and distributed.any_rank(stop.requested)[0]:
            # A run without checkpoints (a value of the recipe search): stop now; the caller keeps what finished.
            bar.close()
            own = stop.signum is not None
            raise Preempted(f"stopped by {stop.reason if own else 'a signal to another process'} at step {done}/"
                            f"{total_steps} of {desc}, a run without checkpoints (the recipe search keeps the values "
                            f"it finished); rerun the same command to go on", stop.signum if own else signal.SIGUSR1)
    bar.close()
    add_segment(state["segments"], start_step, end, world)
    if board is not None:
        board.close()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    final_val = state["history"][-1].get("val_loss") if state["history"] else None
    return {"total_steps": end, "tokens_per_step": tokens_per_step, "tokens": end * tokens_per_step,
            "precision": compute.precision, **data,
            "steps": state["history"], "val_loss": final_val, "best_val_loss": state["best_val_loss"],
            "best_step": state["best_step"], "segments": state["segments"],
            "train_seconds": state["train_seconds"] + time.time() - t0}
