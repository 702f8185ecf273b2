"""Tokenizers and token files.

A token file is the tokenised split as two .npy arrays that later stages open
with numpy.load(mmap_mode='r'):
  <split>.tokens.npy   every document followed by EOS, concatenated (uint16
                       when the vocabulary fits, else uint32)
  <split>.offsets.npy  int64, n_docs + 1 boundaries: document i (with its EOS)
                       is tokens[offsets[i]:offsets[i+1]]
Training reads the stream packed; evaluation reads documents by offsets.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.run.run_files import PipelineError, publish

EOS = "<|endoftext|>"   # id 0, as Pythia's bos = eos = 0


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens=(EOS,)) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-NeoX's (NFC normaliser), trained on `texts` (deterministic); special
    tokens first (EOS = 0)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, model_max_length=10**9)


def normaliser_name(tokenizer) -> str | None:
    normalizer = tokenizer.backend_tokenizer.normalizer
    return type(normalizer).__name__ if normalizer is not None else None


def encoded_utf8_bytes(tokenizer, text: str) -> int:
    """UTF-8 bytes of `text` as the tokenizer sees it: after its normaliser (GPT-NeoX: NFC), so
    bits per byte divide by the bytes that were actually encoded."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    return len((normalizer.normalize_str(text) if normalizer is not None else text).encode("utf-8"))


def load_tokenizer(path: Path):
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise PipelineError(f"tokenizer at {path} has no EOS token")
    return tok


def write_split(texts: Iterable[str], tokenizer, corpus_file: Path | None, token_dir: Path, split: str,
                max_docs: int = 0, max_tokens: int = 0, batch: int = 1000) -> dict:
    """Write a split's documents (jsonl; not with corpus_file None) and token files in one streaming pass.

    Stops after `max_docs` documents or once `max_tokens` tokens are written
    (0: no limit), whichever comes first; whole documents only. Memory stays
    bounded whatever the document count: tokens go to disk a batch at a time,
    and the tokenizer's batch encoding uses every core.
    """
    eos = tokenizer.eos_token_id
    dtype = np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32)
    token_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=token_dir, prefix=f".{split}.") as tmp:
        raw_path, jsonl_path = Path(tmp) / "tokens.raw", Path(tmp) / "corpus.jsonl"
        offsets, n_tokens, n_chars, digest = array("q", [0]), 0, 0, hashlib.sha256()
        with raw_path.open("wb") as raw, jsonl_path.open("w", encoding="utf-8") if corpus_file else \
                contextlib.nullcontext() as jsonl:
            for docs in _batches(texts, batch):
                if max_docs:
                    docs = docs[:max_docs - (len(offsets) - 1)]
                flat = []
                for text, ids in zip(docs, tokenizer(docs, add_special_tokens=False)["input_ids"]):
                    flat += ids
                    flat.append(eos)
                    n_tokens += len(ids) + 1
                    offsets.append(n_tokens)
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    if jsonl:
                        jsonl.write(line)
                    digest.update(line.encode())
                    n_chars += len(text)
                    if max_tokens and n_tokens >= max_tokens:
                        break
                raw.write(np.asarray(flat, dtype=dtype).tobytes())    # not tofile: a full disk keeps its errno
                if (max_tokens and n_tokens >= max_tokens) or (max_docs and len(offsets) - 1 >= max_docs):
                    break
        if len(offsets) == 1:
            raise PipelineError(f"split {split!r} has no documents")
        _raw_to_npy(raw_path, dtype, n_tokens, token_dir / f"{split}.tokens.npy")
        _save_npy(np.frombuffer(offsets, dtype=np.int64), token_dir / f"{split}.offsets.npy")
        if corpus_file:
            corpus_file.parent.mkdir(parents=True, exist_ok=True)
            publish(jsonl_path, corpus_file)
    return {"documents": len(offsets) - 1, "characters": n_chars, "tokens": n_tokens, "dtype": str(dtype),
            "sha256": digest.hexdigest()}


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _raw_to_npy(raw: Path, dtype: np.dtype, n: int, out: Path) -> None:
    """A .npy header, then the raw tokens copied in blocks: never the whole array in memory."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "wb") as f, raw.open("rb") as src:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (n,)})
        shutil.copyfileobj(src, f, 16 << 20)
    publish(Path(tmp), out)


def _save_npy(array: np.ndarray, path: Path) -> None:
    """np.save through Python's file writes: numpy's own (tofile) report a full disk without its errno."""
    array = np.ascontiguousarray(array)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.tobytes())
    publish(Path(tmp), path)


class TokenFile:
    """A tokenised split, memory-mapped."""

    def __init__(self, token_dir: Path, split: str):
        self.path = Path(token_dir) / f"{split}.tokens.npy"
        try:
            self.tokens = np.load(self.path, mmap_mode="r")
            self.offsets = np.load(Path(token_dir) / f"{split}.offsets.npy", mmap_mode="r")
        except (FileNotFoundError, ValueError) as e:
            raise PipelineError(f"cannot open token file for split {split!r} in {token_dir}: {e}") from None
        if self.offsets[-1] != self.tokens.size:
            raise PipelineError(f"{self.path}: offsets do not match the token count (truncated file?)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Document i without its trailing EOS."""
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1] - 1], dtype=np.int64)
