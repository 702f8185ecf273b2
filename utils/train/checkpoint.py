"""Training checkpoints: sharded, resumable at any world size, atomic, rotated, free of pickle.

A checkpoint is a directory `step_<N>/` holding
  shard-<r>-model-00001-of-00001.safetensors
                 one file per rank that held tensors (torch.distributed.checkpoint
                 with its safetensors storage, each file written one tensor at a
                 time: _StreamingWriter): model parameters and buffers
                 (softplus pre-parameters V included, so a resume is bitwise
                 exact) and optimizer state, keyed by parameter name; each
                 shard records its offsets, so any number of ranks (one
                 process without torchrun included) reads its own slices
  state.json     step, world size, optimizer hyper-parameters, every rank's RNG
                 state, history, best validation loss and the config fingerprint
`best/` holds the weights of the best validation loss so far in the same sharded form
(no optimizer state), written by every rank at each improvement without a gather; the
run exports it as a Hugging Face directory once, at the end.
Loading parses safetensors headers and JSON only; nothing is unpickled. All
ranks write into `.step_<N>.partial/`; rank 0 renames it into place once every
file is on disk, so a kill at any moment leaves either the previous
checkpoints or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import _hf_utils as hf
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from utils.run import distributed, streamed_safetensors
from utils.run.run_files import PipelineError


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


def _tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Model and optimizer state as one flat {name: tensor} dict (DTensor shards when sharded),
    and the optimizer's param_groups as get_state_dict keys them.

    Optimizer state is keyed by parameter name, not index, so it survives resharding.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for param, state in optim_state["state"].items():
        for name, value in state.items():
            flat[f"optim.{param}.{name}"] = value
    return flat, optim_state["param_groups"]


class _StreamingWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer, each rank's shard file written one tensor at a time: the stock one copies the
    whole shard to the host and serialises it into one bytes object (pythia-6.9b on 8 GPUs: ~165 GB per node
    for one checkpoint). Same file, same reader (HuggingFaceStorageReader)."""

    def write_data(self, plan, planner) -> Future:
        if any(item.type == WriteItemType.BYTE_IO for item in plan.items):
            raise TypeError("a checkpoint holds tensors only")
        name = hf._gen_file_name(1, 1, plan.storage_data.get("shard_index"))
        entries = [streamed_safetensors.Entry(item.index.fqn, item.tensor_data.properties.dtype,
                                              tuple(item.tensor_data.chunk.sizes),
                                              lambda item=item: planner.resolve_data(item))
                   for item in plan.items]
        offsets = {item.index.fqn: list(item.tensor_data.chunk.offsets) for item in plan.items}
        metadata = {hf.CUSTOM_METADATA_KEY: json.dumps({k: {hf.SAVED_OFFSETS_KEY: v} for k, v in offsets.items()}),
                    hf.DCP_VERSION_KEY: str(hf.HF_DCP_VERSION), hf.FORMAT_KEY: hf.FORMAT_VALUE}
        spans = streamed_safetensors.write(Path(self.path) / name, entries, metadata) if entries else []
        done: Future = Future()
        done.set_result([WriteResult(index=item.index, size_in_bytes=length,
                                     storage_data=_StorageInfo(name, offset, length))
                         for item, (offset, length) in zip(plan.items, spans)])
        return done


@contextmanager
def _single_process_quiet():
    """Without torchrun DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


class Checkpointer:
    """Every method is collective: all ranks call it (one process: just call it)."""

    def __init__(self, directory: Path, fingerprint: str, keep: int):
        self.dir, self.fingerprint, self.keep = Path(directory), fingerprint, keep

    def checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        rng = distributed.gather_objects(_rng_state())
        final = self._write(f"step_{step:08d}", _tensors(model, optimizer)[0],
                            {"step": step, "param_groups": groups, "rng": rng, **extra})
        self.prune(self.keep)
        return final

    def prune(self, keep: int) -> None:
        """Remove all but the newest `keep` checkpoints (1 once an arm has finished: a requeued stage only
        needs the last one to see the arm is done; the best weights stay for the export)."""
        if distributed.is_main():
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def save_best(self, model, step: int, val_loss: float) -> Path:
        """The model's weights alone (no optimizer), sharded like a checkpoint, into `best/`: each rank
        writes its own shard, nothing is gathered (the training loop's on_best). At step 0 they are the
        starting model's, already on disk: only the record is written."""
        if step == 0:
            return self._write("best", {}, {"step": 0, "val_loss": val_loss, "weights": "start"})
        state = get_model_state_dict(model)
        return self._write("best", {f"model.{k}": v for k, v in state.items()}, {"step": step, "val_loss": val_loss})

    def load_best_into(self, model) -> dict:
        """Read `best/` into a whole, unsharded `model` in place (no second copy of the weights), in this
        process; returns its {step, val_loss, start}. `start` is True where the best was the start model,
        whose weights are on disk already: `model` is left as it is."""
        path = self.dir / "best"
        if not (path / "state.json").exists():
            raise PipelineError(f"no best weights in {path}: training saved none")
        info = json.loads((path / "state.json").read_text())
        record = {"step": info["step"], "val_loss": info["val_loss"], "start": info.get("weights") == "start"}
        if record["start"]:
            return record
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        with _single_process_quiet(), torch.no_grad():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
        return record

    def _write(self, name: str, tensors: dict, state: dict) -> Path:
        """DCP-save `tensors` (every rank its shards) and rank 0's state.json into `name/`, atomically."""
        final, tmp = self.dir / name, self.dir / f".{name}.partial"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)          # left by a killed run
            tmp.mkdir(parents=True)
        distributed.barrier()
        try:
            if tensors:
                with _single_process_quiet():
                    dcp.save(tensors, storage_writer=_StreamingWriter(str(tmp), save_distributed=True))
            distributed.barrier()
            if distributed.is_main():
                state = {**state, "fingerprint": self.fingerprint, "world_size": distributed.world_size()}
                (tmp / "state.json").write_text(json.dumps(state))
                _fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier()
        return final

    def load_latest(self, model, optimizer) -> dict | None:
        """Restore the newest checkpoint into model and optimizer; None if there is none."""
        ckpts = self.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1]
        if (path / "model.safetensors").exists() and not list(path.glob("shard-*.safetensors")):
            raise PipelineError(f"checkpoint {path} is in the pre-sharding format of an older version of this "
                                f"code; remove {self.dir} to start this training stage over")
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise self._corrupt(path, e) from None
        if state.get("fingerprint") != self.fingerprint:
            raise PipelineError(f"checkpoint {path} was written with a different config; "
                                f"use a new work dir or remove {self.dir} to start over")
        shards = sorted(path.glob("shard-*.safetensors"))
        try:                                        # headers first: DCP reports a bad file with a traceback
            if len(shards) != state["world_size"]:
                raise FileNotFoundError(f"{len(shards)} shard files for {state['world_size']} processes")
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    f.keys()
        except (OSError, SafetensorError) as e:
            raise self._corrupt(path, e) from None
        tensors, param_groups = _tensors(model, optimizer)   # the slices this rank holds, filled in place
        try:
            with _single_process_quiet():
                dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
        except Exception as e:                     # truncated or missing shard: say so in one line
            raise self._corrupt(path, e) from None
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        optim_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                param, name = key[len("optim."):].rsplit(".", 1)
                optim_state.setdefault(param, {})[name] = value
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict={"state": optim_state, "param_groups": param_groups})
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
        if state["world_size"] == distributed.world_size():
            _set_rng_state(state["rng"][distributed.rank()])
        elif distributed.is_main():   # data order is (seed, step) alone; the models here use no dropout
            print(f"[checkpoint] written by {state['world_size']} process(es), resumed by "
                  f"{distributed.world_size()}: random number generators are not restored")
        # A best/ saved after this checkpoint by the interrupted run stays: the resumed run, comparing with the
        # checkpoint's best loss, saves over it when it reaches that step again (the same weights at the same
        # world size), and the end of training always finds one to export.
        if distributed.is_main():
            print(f"[checkpoint] resumed from {path} (step {state['step']})")
        return state

    @staticmethod
    def _corrupt(path: Path, e: Exception) -> PipelineError:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return PipelineError(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {first}); "
                             f"move it aside to resume from an older one")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, in this process (`model.<name>`, `optim.<param>.<state>`),
    whatever number of processes wrote it: for inspection and tests."""
    reader = HuggingFaceStorageReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    with _single_process_quiet():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return tensors
