"""Corpus, tokenizer, token files and the training data order, on real files."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from configs.experiment_config import DataConfig
from utils.data.corpus import documents, local_documents, read_corpus, stdlib_documents
from utils.data.tokenization import TokenFile, encoded_utf8_bytes, normaliser_name, train_bpe, write_split
from utils.run.run_files import PipelineError
from utils.train.training import PackedBatches


def _write_splits(d, tok, out, max_tokens=0):
    return {s: write_split(documents(d, s), tok, out / f"{s}.jsonl", out / "tokens", s, max_docs=d.max_docs(s),
                           max_tokens=max_tokens if s == "train" else 0, batch=100)
            for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_bpe([d["text"] for d in stdlib_documents(200)[:300]], 512)


def test_stdlib_corpus_is_deterministic_and_splits_are_disjoint(tmp_path, small_tokenizer):
    d = DataConfig()
    first = _write_splits(d, small_tokenizer, tmp_path / "a")
    stdlib_documents.cache_clear()          # rebuild from the files, not the cache
    second = _write_splits(d, small_tokenizer, tmp_path / "b")
    for split in ("train", "val", "test"):
        a = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(a).hexdigest() == first[split]["sha256"] == second[split]["sha256"]
        assert (tmp_path / "a" / "tokens" / f"{split}.tokens.npy").read_bytes() == \
               (tmp_path / "b" / "tokens" / f"{split}.tokens.npy").read_bytes()
    texts = {s: {json.loads(l)["text"] for l in (tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()}
             for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    assert first["train"]["documents"] > 1000 and first["test"]["documents"] > 100
    assert all(len(t) >= d.min_chars for t in texts["test"])


def test_streaming_split_matches_one_shot_tokenisation_and_stops_at_the_token_budget(tmp_path, small_tokenizer):
    """Batched streaming gives the tokens of encoding each document alone; a token budget stops
    after the first whole document that reaches it."""
    d, tok = DataConfig(), small_tokenizer
    stats = _write_splits(d, tok, tmp_path, max_tokens=5000)
    tf = TokenFile(tmp_path / "tokens", "train")
    docs = read_corpus(tmp_path / "train.jsonl")
    assert len(tf) == len(docs) == stats["train"]["documents"]
    assert tf.offsets[-2] < 5000 <= tf.offsets[-1] == stats["train"]["tokens"]
    for i, text in enumerate(docs):
        assert tf.document(i).tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tf.tokens.dtype == np.uint16


def test_tokenizer_round_trip_and_determinism():
    docs = [d["text"] for d in stdlib_documents(200)[:300]]
    tok = train_bpe(docs, 512)
    again = train_bpe(docs, 512)
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert tok.eos_token_id == 0 and len(tok) == 512
    for text in docs[:50] + ["Unicode: naïve café — ∑ x² 🙂", "  leading spaces\n\ttabs"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_token_files_match_the_corpus(tiny_run):
    cfg, paths = tiny_run
    from utils.data.corpus import read_corpus
    from utils.data.tokenization import load_tokenizer
    tok = load_tokenizer(paths.shared / "tokenizer")
    tf = TokenFile(paths.shared / "tokens", "test")
    docs = read_corpus(paths.shared / "corpus" / "test.jsonl")
    assert len(tf) == len(docs)
    assert isinstance(np.load(tf.path, mmap_mode="r"), np.memmap)
    for i in (0, len(docs) // 2, len(docs) - 1):
        assert tok.decode(tf.document(i).tolist()) == docs[i]
        assert tf.tokens[tf.offsets[i + 1] - 1] == tok.eos_token_id


def test_truncated_token_file_is_a_clear_error(tiny_run, tmp_path):
    _, paths = tiny_run
    src = TokenFile(paths.shared / "tokens", "val")
    np.save(tmp_path / "val.tokens.npy", np.asarray(src.tokens[:-5]))
    np.save(tmp_path / "val.offsets.npy", np.asarray(src.offsets))
    with pytest.raises(PipelineError, match="truncated"):
        TokenFile(tmp_path, "val")
    with pytest.raises(PipelineError, match="cannot open token file"):
        TokenFile(tmp_path, "test")


DOCS = ["first document, with enough text", "second one\nspans two lines", "third: ünïcödé"]


@pytest.mark.parametrize("source", ["jsonl", "jsonl.zst", "parquet", "text"])
def test_local_sources_read_back_the_documents(tmp_path, source):
    path = tmp_path / f"docs.{source}"
    if source == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(DOCS)))
    elif source == "jsonl.zst":
        raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    elif source == "parquet":
        pq.write_table(pa.table({"text": DOCS}), path)
    else:
        path.write_text("\n\n".join(DOCS) + "\n")
    assert list(local_documents(source, str(path), "text")) == DOCS


def test_local_source_corpus_uses_each_split_file(tmp_path, small_tokenizer):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"body": f"{split} doc {i} " * 5}) + "\n" for i in range(n)))
    d = DataConfig(source="jsonl", text_field="body", min_chars=10, quick=True, quick_train_docs=4,
                   **{f"{s}_file": str(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")})
    stats = _write_splits(d, small_tokenizer, tmp_path / "out")
    assert {s: stats[s]["documents"] for s in stats} == {"train": 4, "val": 2, "test": 3}
    assert "test doc 0" in (tmp_path / "out" / "test.jsonl").read_text()


def test_bad_local_files_give_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: not a JSON object"):
        list(local_documents("jsonl", str(bad), "text"))
    with pytest.raises(PipelineError, match="data file not found"):
        list(local_documents("jsonl", str(tmp_path / "missing.jsonl"), "text"))


def test_packed_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1001, dtype=np.uint16)
    a, b = PackedBatches(tokens, 10, 4, seed=3), PackedBatches(tokens, 10, 4, seed=3)
    assert all(np.array_equal(a.batch(k), b.batch(k)) for k in (0, 7, 30, 24))  # any order
    assert not np.array_equal(a.batch(0), PackedBatches(tokens, 10, 4, seed=4).batch(0))
    # One epoch (100 windows = 25 steps) visits every window exactly once.
    starts = sorted(int(row[0]) for k in range(25) for row in a.batch(k))
    assert starts == list(range(0, 1000, 10))
    assert all(np.array_equal(r[1:] - r[:-1], np.ones(10)) for r in a.batch(3).numpy())


def test_bits_per_byte_count_the_bytes_the_tokenizer_encodes(small_tokenizer):
    """GPT-NeoX normalises to NFC before encoding: decomposed accents are counted as the composed
    bytes that were encoded, not as the raw file's."""
    import copy
    import unicodedata
    decomposed = "Cafe\u0301 na\u0308ive re\u0301sume\u0301"
    composed = unicodedata.normalize("NFC", decomposed)
    assert len(decomposed.encode()) == len(composed.encode()) + 4
    assert normaliser_name(small_tokenizer) == "NFC"
    ids = small_tokenizer(decomposed, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == composed
    assert encoded_utf8_bytes(small_tokenizer, decomposed) == len(composed.encode())
    raw = copy.deepcopy(small_tokenizer)
    raw.backend_tokenizer.normalizer = None                 # a tokenizer that encodes the text as it is
    assert encoded_utf8_bytes(raw, decomposed) == len(decomposed.encode()) and normaliser_name(raw) is None



def _token_file(tmp_path, split, docs, eos=0):
    """A split's token files, written as write_split writes them: each document, then EOS."""
    tokens = np.concatenate([np.append(np.asarray(d), eos) for d in docs]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]).astype(np.int64)
    np.save(tmp_path / f"{split}.tokens.npy", tokens)
    np.save(tmp_path / f"{split}.offsets.npy", offsets)
    return TokenFile(tmp_path, split)


def _containment(doc, train_docs, n=12):
    """Plain-Python reference: the fraction of doc's n-grams found in any training document."""
    grams = lambda d: [tuple(d[i:i + n]) for i in range(len(d) - n + 1)]  # noqa: E731
    seen = {g for d in train_docs for g in grams(list(d))}
    mine = grams(list(doc))
    return sum(g in seen for g in mine) / len(mine)


def test_near_duplicates_of_training_text_are_found_on_constructed_documents(tmp_path):
    from utils.data.overlap import heldout_overlap, sampling_rate
    rng = np.random.default_rng(0)
    train = [rng.integers(1, 5000, 300) for _ in range(20)]
    copy = train[3].copy()
    edited = train[5].copy()
    edited[::10] = rng.integers(1, 5000, 30)              # one token in ten changed: few 12-grams survive
    spliced = np.concatenate([train[7][:100], rng.integers(1, 5000, 60)])   # 100 copied tokens, 60 new
    across = np.concatenate([train[8][-20:], train[9][:20]])   # spans a document boundary of the train split
    fresh = rng.integers(1, 5000, 200)
    held = [copy, edited, spliced, across, fresh, train[2][:8]]     # the last is shorter than one n-gram
    r = heldout_overlap(_token_file(tmp_path, "train", train), _token_file(tmp_path, "test", held), 0, 0.5)
    for doc, got in zip(held[:5], r["containment"]):
        assert got == pytest.approx(_containment(doc, train))
    assert r["containment"][0] == 1.0 and r["containment"][4] == 0.0 and r["containment"][1] < 0.5
    assert 0.5 < r["containment"][2] < 1
    assert r["containment"][3] == pytest.approx(18 / 29)       # the 11 n-grams across the boundary are new
    assert r["near_duplicate_docs"] == [0, 2, 3] and r["too_short_to_check"] == 1 and r["sample_rate"] == 1
    assert sampling_rate(10**9) == 32 and sampling_rate(1 << 25) == 1


def test_stage_0_removes_held_out_near_duplicates_of_the_tiny_corpus(tiny_run):
    """The tiny preset drops them (docstrings repeat each other); what remains is below the threshold."""
    from utils.data.overlap import heldout_overlap
    cfg, paths = tiny_run
    manifest = json.loads((paths.shared / "manifest.json").read_text())
    for split in ("val", "test"):
        report = manifest["heldout_overlap"][split]
        assert report["removed"] == report["near_duplicates"] > 0
        assert manifest["corpus"][split]["documents"] == report["documents"] - report["removed"]
        again = heldout_overlap(TokenFile(paths.shared / "tokens", "train"), TokenFile(paths.shared / "tokens", split),
                                0, cfg.data.near_duplicate_threshold)
        assert again["near_duplicates"] == 0 and again["documents"] == manifest["corpus"][split]["documents"]
