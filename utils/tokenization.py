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

import os
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.corpus import read_corpus
from utils.run_files import PipelineError

EOS = "<|endoftext|>"   # id 0, as Pythia's bos = eos = 0


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-NeoX's, trained on `texts` (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, model_max_length=10**9)


def load_tokenizer(path: Path):
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise PipelineError(f"tokenizer at {path} has no EOS token")
    return tok


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    os.close(fd)
    np.save(tmp, array)
    os.replace(tmp, path)


def tokenize_split(tokenizer, corpus_file: Path, out_dir: Path, split: str, batch: int = 1000) -> dict:
    docs = read_corpus(corpus_file)
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    pieces, lengths = [], []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
            lengths.append(len(ids) + 1)
    tokens = np.concatenate(pieces)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(out_dir / f"{split}.tokens.npy", tokens)
    _save_npy(out_dir / f"{split}.offsets.npy", offsets)
    return {"documents": len(docs), "tokens": int(tokens.size), "dtype": str(tokens.dtype)}


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
