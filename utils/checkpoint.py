"""Training checkpoints: atomic, rotated, and free of pickle.

A checkpoint is a directory `step_<N>/` holding
  model.safetensors      raw parameters and buffers (softplus pre-parameters V
                         included, so a resume is bitwise exact)
  optimizer.safetensors  every optimizer state tensor, keyed `<param index>.<name>`
  state.json             step, optimizer param groups, RNG states, history,
                         best validation loss and the config fingerprint
It is written under a temporary name and renamed into place, so a kill at any
moment leaves either the previous checkpoints or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.run_files import PipelineError


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    state["numpy"] = [state["numpy"][0], state["numpy"][1].tolist(), *state["numpy"][2:]]
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class Checkpointer:
    def __init__(self, directory: Path, fingerprint: str, keep: int):
        self.dir, self.fingerprint, self.keep = Path(directory), fingerprint, keep

    def checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".step_{step:08d}."))
        try:
            params = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(params, tmp / "model.safetensors")
            opt = optimizer.state_dict()
            tensors, scalars = {}, {}
            for idx, st in opt["state"].items():
                for name, value in st.items():
                    if torch.is_tensor(value):
                        tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
                    else:
                        scalars[f"{idx}.{name}"] = value
            save_file(tensors, tmp / "optimizer.safetensors")
            state = {"step": step, "fingerprint": self.fingerprint, "param_groups": opt["param_groups"],
                     "optimizer_scalars": scalars, "rng": _rng_state(), **extra}
            (tmp / "state.json").write_text(json.dumps(state))
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            final = self.dir / f"step_{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_latest(self, model, optimizer) -> dict | None:
        """Restore the newest checkpoint into model and optimizer; None if there is none."""
        ckpts = self.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1]
        try:
            state = json.loads((path / "state.json").read_text())
            params = load_file(path / "model.safetensors")
            opt_tensors = load_file(path / "optimizer.safetensors")
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise PipelineError(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); move it aside to resume from an older one") from None
        if state.get("fingerprint") != self.fingerprint:
            raise PipelineError(f"checkpoint {path} was written with a different config; "
                                f"use a new work dir or remove {self.dir} to start over")
        model.load_state_dict(params, strict=True)
        opt_state = {}
        for key, value in [*opt_tensors.items(), *state["optimizer_scalars"].items()]:
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value   # load_state_dict moves it to the param's device
        groups = state["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        _set_rng_state(state["rng"])
        print(f"[checkpoint] resumed from {path} (step {state['step']})")
        return state
