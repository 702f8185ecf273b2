"""Documents for the three splits, from any supported source.

Sources: `stdlib` (docstrings of the Python standard library found on this
machine, read with `ast`, nothing imported or committed), `hub` (split files of
a dataset on the Hugging Face hub, fetched into its cache by utils.data.hub), and
local `jsonl`, `jsonl.zst` (the Pile's format), `parquet` and `text` files
(plain text: documents separated by a blank line). Everything streams: a split
is never held in memory (utils.data.tokenization.write_split writes it).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from configs.experiment_config import DataConfig
from utils.run.run_files import PipelineError

_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                "turtledemo", "__pycache__", "ensurepip", "pydoc_data"}


@functools.lru_cache(maxsize=2)
def stdlib_documents(min_chars: int) -> tuple[dict, ...]:
    """Docstrings of modules, classes and functions, in a fixed order, deduplicated."""
    return tuple(_iter_stdlib_documents(min_chars))


def _iter_stdlib_documents(min_chars: int) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            name = getattr(node, "name", "<module>")
            yield {"id": f"{rel.as_posix()}:{getattr(node, 'lineno', 0)}:{name}", "text": doc}


def stdlib_split(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def _read_jsonl(stream, text_field: str, where: str) -> Iterator[str]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PipelineError(f"{where}:{lineno}: not a JSON object with a {text_field!r} field") from None


def _text_blocks(f) -> Iterator[str]:
    """Documents separated by blank lines, read line by line."""
    block = []
    for line in f:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip("\n")
            block = []
    if block:
        yield "".join(block).strip("\n")


def local_documents(source: str, path: str, text_field: str) -> Iterator[str]:
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"data file not found: {p}")
    import zstandard
    try:
        if source == "jsonl":
            with p.open(encoding="utf-8") as f:
                yield from _read_jsonl(f, text_field, str(p))
        elif source == "jsonl.zst":
            with p.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zr:
                yield from _read_jsonl(io.TextIOWrapper(zr, encoding="utf-8"), text_field, str(p))
        elif source == "parquet":
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(p)
            if text_field not in pf.schema_arrow.names:
                raise PipelineError(f"{p}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[text_field]):
                yield from batch.column(0).to_pylist()
        elif source == "text":
            with p.open(encoding="utf-8") as f:
                yield from _text_blocks(f)
        else:
            raise PipelineError(f"unsupported local data source {source!r}")
    except (zstandard.ZstdError, UnicodeDecodeError) as e:
        raise PipelineError(f"{p}: unreadable as {source} ({type(e).__name__}: {e})") from None


def _file_format(name: str) -> str:
    for fmt in ("jsonl.zst", "jsonl", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    raise PipelineError(f"cannot tell the format of data file {name!r} (expected .jsonl.zst, .jsonl or .parquet)")


def documents(d: DataConfig, split: str, hub_paths: dict | None = None) -> Iterator[str]:
    """The split's documents of at least d.min_chars characters, in source order.

    Hub datasets are read from the files utils.data.hub.fetch_dataset put in the cache (`hub_paths`)."""
    if d.source == "stdlib":
        texts = (doc["text"] for doc in stdlib_documents(d.min_chars)
                 if stdlib_split(doc["id"], d.stdlib_val_fraction, d.stdlib_test_fraction) == split)
    elif d.source == "hub":
        texts = local_documents(_file_format(getattr(d, f"{split}_file")), hub_paths[split], d.text_field)
    else:
        texts = local_documents(d.source, getattr(d, f"{split}_file"), d.text_field)
    for text in texts:
        if not isinstance(text, str):
            raise PipelineError(f"split {split!r}: field {d.text_field!r} holds {type(text).__name__}, not text")
        if len(text) >= d.min_chars:
            yield text


def read_corpus(path: Path) -> list[str]:
    with Path(path).open(encoding="utf-8") as f:
        return list(_read_jsonl(f, "text", str(path)))
