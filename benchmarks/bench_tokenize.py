#!/usr/bin/env python
"""Stage 0's tokenisation at scale: tokens/s and peak memory of utils.data.tokenization.write_split
reading a Pile-layout .jsonl.zst file, at two data sizes (memory must not grow with the data).

    python benchmarks/bench_tokenize.py [--megabytes 40] [--json FILE]

Documents are the local standard library's docstrings repeated to the requested size;
the tokenizer is a byte-level BPE with GPT-NeoX's 50k vocabulary size trained on them.
Each size runs in a fresh process so that its peak RSS is its own.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_inputs(tmp: Path, megabytes: float) -> tuple[Path, Path]:
    import zstandard

    from utils.data.corpus import stdlib_documents
    from utils.data.tokenization import train_bpe
    docs = [d["text"] for d in stdlib_documents(200)]
    tok_dir = tmp / "tokenizer"
    if not tok_dir.exists():
        train_bpe(docs, 50_000).save_pretrained(str(tok_dir))
    path = tmp / f"train_{megabytes:g}MB.jsonl.zst"
    target, written = megabytes * 2**20, 0
    with path.open("wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        while written < target:
            for i, text in enumerate(docs):
                line = (json.dumps({"text": text, "meta": {"pile_set_name": "Github"}}) + "\n").encode()
                w.write(line)
                written += len(line)
    return path, tok_dir


def measure(data: Path, tok_dir: Path, out: Path) -> dict:
    """One run of write_split (called in a child process)."""
    from utils.data.corpus import local_documents
    from utils.data.tokenization import load_tokenizer, write_split
    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    stats = write_split(local_documents("jsonl.zst", str(data), "text"), tok, out / "train.jsonl", out, "train")
    seconds = time.perf_counter() - t0
    return {"documents": stats["documents"], "tokens": stats["tokens"], "seconds": seconds,
            "tokens_per_s": stats["tokens"] / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=40, help="uncompressed size of the smaller input")
    p.add_argument("--json")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*map(Path, args.child))))
        return 0
    res = {"cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in (args.megabytes, 4 * args.megabytes):
            data, tok_dir = make_inputs(tmp, mb)
            out = tmp / f"out_{mb:g}"
            r = subprocess.run([sys.executable, __file__, "--child", str(data), str(tok_dir), str(out)],
                               capture_output=True, text=True, check=True)
            run = {"input_megabytes": mb, **json.loads(r.stdout.strip().splitlines()[-1])}
            res["runs"].append(run)
            print(f"{mb:6g} MB of text: {run['documents']:,} documents, {run['tokens']:,} tokens in "
                  f"{run['seconds']:.1f} s = {run['tokens_per_s']:,.0f} tokens/s on {res['cores']} cores; "
                  f"peak RSS {run['peak_rss_mib']:.0f} MiB")
    small, large = res["runs"]
    print(f"4x the data: peak memory x{large['peak_rss_mib'] / small['peak_rss_mib']:.2f} (bounded: ~1)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
