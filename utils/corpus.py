"""Documents for the three splits, from any supported source, written as jsonl.

Sources: `stdlib` (docstrings of the Python standard library found on this
machine, read with `ast`, nothing imported or committed), `hub` (a dataset on
the Hugging Face hub, streamed, with separate files per split), and local
`jsonl`, `jsonl.zst` (the Pile's format), `parquet` and `text` files (plain
text: documents separated by a blank line).
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

from configs.experiment_config import SPLITS, DataConfig
from utils.run_files import PipelineError, atomic_write_text

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


def local_documents(source: str, path: str, text_field: str) -> Iterator[str]:
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"data file not found: {p}")
    if source == "jsonl":
        with p.open(encoding="utf-8") as f:
            yield from _read_jsonl(f, text_field, str(p))
    elif source == "jsonl.zst":
        import zstandard
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
        for block in p.read_text(encoding="utf-8").split("\n\n"):
            if block.strip():
                yield block.strip("\n")
    else:
        raise PipelineError(f"unsupported local data source {source!r}")


def hub_documents(d: DataConfig, split: str, revision: str | None = None) -> Iterator[str]:
    """Stream one split file of a hub dataset (needs the hub or a warm HF cache)."""
    from datasets import load_dataset
    data_file = getattr(d, f"{split}_file")
    ds = load_dataset(d.hub_id, revision=revision or d.revision, data_files={split: data_file},
                      split=split, streaming=True)
    for row in ds:
        yield row[d.text_field]


def split_documents(d: DataConfig, split: str, revision: str | None = None) -> Iterator[str]:
    if d.source == "stdlib":
        for doc in stdlib_documents(d.min_chars):
            if stdlib_split(doc["id"], d.stdlib_val_fraction, d.stdlib_test_fraction) == split:
                yield doc["text"]
    elif d.source == "hub":
        yield from hub_documents(d, split, revision)
    else:
        yield from local_documents(d.source, getattr(d, f"{split}_file"), d.text_field)


def write_corpus(d: DataConfig, out_dir: Path, revision: str | None = None) -> dict:
    """Write `<split>.jsonl` for each split; returns per-split counts and hashes.

    `revision` pins a hub dataset to the commit recorded in the manifest."""
    stats = {}
    for split in SPLITS:
        limit = d.max_docs(split)
        lines, n_chars = [], 0
        for text in split_documents(d, split, revision):
            if len(text) < d.min_chars:
                continue
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
            n_chars += len(text)
            if limit and len(lines) >= limit:
                break
        if not lines:
            raise PipelineError(f"split {split!r} has no documents of at least {d.min_chars} characters")
        blob = "\n".join(lines) + "\n"
        atomic_write_text(out_dir / f"{split}.jsonl", blob)
        stats[split] = {"documents": len(lines), "characters": n_chars,
                        "sha256": hashlib.sha256(blob.encode()).hexdigest()}
    return stats


def read_corpus(path: Path) -> list[str]:
    with Path(path).open(encoding="utf-8") as f:
        return list(_read_jsonl(f, "text", str(path)))
