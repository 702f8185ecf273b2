"""A safetensors file written one tensor at a time.

`safetensors.torch.save` and the writers built on it (transformers' save_pretrained, DCP's
HuggingFaceStorageWriter) hold every tensor on the host and then serialise them into one bytes object: twice
the file in host memory. pythia-6.9b's checkpoint shards are ~10 GB per rank, 83 GB per node of 8, before that
doubling. The format allows better: a header (every tensor's dtype, shape and byte range, all known from
shapes alone), then the raw bytes. So the header goes first and each tensor is produced, copied to the host,
written and dropped in turn; the host holds one tensor at a time.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]      # called once, when its bytes are written


def write(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> list[tuple[int, int]]:
    """Write `entries` to `path` (fsynced) and return each one's (offset, length) in the file, in their order.
    The data is laid out as safetensors lays it out (widest dtype first, then by name), so every tensor is
    aligned for a zero-copy load."""
    header, start = {}, 0
    order = sorted(range(len(entries)), key=lambda i: (-entries[i].dtype.itemsize, entries[i].name))
    for e in (entries[i] for i in order):
        length = math.prod(e.shape) * e.dtype.itemsize
        header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [start, start + length]}
        start += length
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                       # the data starts 8-byte aligned, as safetensors writes it
    spans = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in order:
            e = entries[i]
            tensor = e.produce().detach()
            if tensor.dtype != e.dtype or tuple(tensor.shape) != tuple(e.shape):
                raise ValueError(f"{e.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"announced {e.dtype} {tuple(e.shape)}")
            data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            spans[i] = (f.tell(), data.nbytes)
            f.write(data.data)
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    return [spans[i] for i in range(len(entries))]
