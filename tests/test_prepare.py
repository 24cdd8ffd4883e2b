"""prepare: inputs, tokenizing in pieces, the split, shards + meta.json, atomicity, reuse, the CLI flags."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpttrain.data import prepare as prep
from gpttrain.data import shards, sources
from gpttrain.data.encode import Encoder
from gpttrain.data.loader import open_split
from gpttrain.data.prepare import default_corpus_files, load_meta, open_tokenizer, prepare, resolve_inputs
from gpttrain.errors import ConfigError, DataError
from gpttrain.tokenizer import BPETokenizer, GPT2Tokenizer
from tests.helpers import TEXT, run_cli

BYTE_EOT = 256


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def stream(out: Path, split: str) -> np.ndarray:
    s = open_split(out, split)
    return s.get(0, len(s))


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def run(inputs, out, **kw) -> dict:
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare([str(i) for i in inputs], out, **kw)


# ---- reference data ---------------------------------------------------------------------------------------


def test_tinyshakespeare_gpt2_counts_and_90_10_split(tmp_path, shared_data):
    text_file, ranks = shared_data("tinyshakespeare.txt"), shared_data("gpt2.tiktoken")
    out = tmp_path / "ts"
    meta = run([text_file], out, tokenizer="gpt2", tokenizer_file=ranks)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["eot_tokens"] == va["eot_tokens"] == 1 and meta["split_mode"] == "tail"
    assert tr["tokens"] - tr["eot_tokens"] + va["tokens"] - va["eot_tokens"] == 338_025
    assert abs(va["tokens"] / (tr["tokens"] + va["tokens"]) - 0.1) < 0.01
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["tokenizer_file"] == "gpt2.tiktoken"
    assert meta["dtype"] == "uint16" and meta["total_text_bytes"] == 1_115_394

    # Exactly the original's split: the first 90% of characters, tokenized on their own, then the rest.
    text = text_file.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    tok = open_tokenizer(out)
    assert tok.spec() == GPT2Tokenizer(ranks).spec()
    assert stream(out, "train").tolist() == tok.encode(text[:cut]) + [tok.eot_id]
    assert stream(out, "val").tolist() == tok.encode(text[cut:]) + [tok.eot_id]


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_pieces_tokenize_exactly_as_the_whole(shared_data, kind):
    """Pieces cut at the safe points give the same tokens as one call on the whole text: English prose
    (Shakespeare with the gpt2 ranks from ../shared/data; the tests' own lines for bpe, which needs neither)
    and Python code."""
    if kind == "gpt2":
        prose = shared_data("tinyshakespeare.txt").read_text(encoding="utf-8")[:150_000]
    else:
        prose = (TEXT * 3)[:150_000]
    code = "".join(p.read_text(encoding="utf-8") for p in default_corpus_files()[:40])[:150_000]
    text = prose + "  \n\n   x \t\n" + code + "\n\n\u00e9t\u00e9 \u2003 end\n  "
    if kind == "gpt2":
        tok = GPT2Tokenizer(shared_data("gpt2.tiktoken"))
    else:
        tok = BPETokenizer.train([text], 2000)
    chunks = [text[i:i + 777] for i in range(0, len(text), 777)]
    pieces = list(sources._cut_pieces(chunks, 2048))
    assert "".join(p for p, _ in pieces) == text
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len(pieces) > 50
    assert np.median([len(p) for p, _ in pieces]) <= 2048  # about the target: under it where a safe point allows
    ids = [i for p, _ in pieces for i in tok.encode(p)]
    assert ids == tok.encode(text)
    assert Encoder(tok)([(0, text, True)])[0][1].tolist() == tok.encode(text) + [tok.eot_id]


# ---- the embedded default corpus -------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib_sources():
    files = default_corpus_files()
    assert len(files) > 500
    assert sum(f.stat().st_size for f in files) > 10_000_000
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "test", "tests", "idle_test"} & set(f.parts) for f in files)
    assert files == default_corpus_files()  # a fixed order


def test_no_inputs_prepares_the_default_corpus_offline(tmp_path, monkeypatch):
    subset = default_corpus_files()[:12]
    monkeypatch.setattr(prep, "default_corpus_files", lambda: subset)
    meta = run([], tmp_path / "out", tokenizer="bpe", bpe_vocab_size=400)
    assert meta["default_corpus"] is True
    assert [s["path"] for s in meta["sources"]] == [str(p.resolve()) for p in subset]
    nonempty = sum(1 for p in subset if p.stat().st_size)
    assert meta["splits"]["train"]["documents"] == nonempty  # few documents: each one cut 90/10
    assert meta["tokenizer"]["vocab_size"] == 400 and meta["tokenizer_file"] == "tokenizer.json"
    tok = open_tokenizer(tmp_path / "out")
    train = stream(tmp_path / "out", "train")
    first = subset[0].read_text(encoding="utf-8")
    assert tok.decode(train[:50]) == first[:len(tok.decode(train[:50]))]


# ---- inputs -------------------------------------------------------------------------------------------------


def capture_bpe_training(monkeypatch) -> list[str]:
    """Stand in for bpe training: the texts it is given are collected in the returned list (a tiny fixed
    tokenizer is trained instead)."""
    seen: list[str] = []
    stub = BPETokenizer.train(["word text line"], 260)

    def train(texts, vocab_size):
        seen.extend(texts)
        return stub

    monkeypatch.setattr(BPETokenizer, "train", staticmethod(train))
    return seen


def make_corpus(root: Path, n: int = 150) -> list[Path]:
    files = [write(root / f"part{i % 3}" / f"doc{i:03d}.txt", f"document {i}\n" + "word " * (i % 17 + 3))
             for i in range(n)]
    write(root / "part0" / "skip.bin", "not text")
    write(root / ".hidden" / "skip.txt", "hidden")
    return files


def test_directory_of_many_documents_splits_by_document(tmp_path):
    files = make_corpus(tmp_path / "corpus")
    meta = run([tmp_path / "corpus"], tmp_path / "out")
    assert meta["split_mode"] == "document"
    assert [s["path"] for s in meta["sources"]] == sorted(str(f.resolve()) for f in files)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["documents"] + va["documents"] == 150 and 5 <= va["documents"] <= 30
    assert tr["eot_tokens"] == tr["documents"] and va["eot_tokens"] == va["documents"]
    total_bytes = sum(f.stat().st_size for f in files)
    assert tr["tokens"] + va["tokens"] == total_bytes + 150
    # Every document whole in one split, in corpus order, each followed by end-of-text.
    docs = [byte_ids(f.read_text()) + [BYTE_EOT] for f in sorted(files, key=lambda f: f.relative_to(tmp_path))]
    train_docs = _split_docs(stream(tmp_path / "out", "train").tolist())
    val_docs = _split_docs(stream(tmp_path / "out", "val").tolist())
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert train_docs == [d for d in docs if d in train_docs]  # corpus order kept
    # Deterministic: the same corpus somewhere else splits the same way.
    again = run([tmp_path / "corpus"], tmp_path / "out2")
    assert again["splits"]["val"]["documents"] == va["documents"]
    assert (tmp_path / "out2" / "val-00000.bin").read_bytes() == (tmp_path / "out" / "val-00000.bin").read_bytes()


def _split_docs(ids: list[int]) -> list[list[int]]:
    docs, cur = [], []
    for i in ids:
        cur.append(i)
        if i == BYTE_EOT:
            docs.append(cur)
            cur = []
    return docs


def test_glob_and_extensions(tmp_path):
    make_corpus(tmp_path / "c", n=6)
    write(tmp_path / "c" / "part1" / "notes.md", "markdown")
    write(tmp_path / "c" / "part1" / "data.csv", "a,b")
    assert [p.name for p in resolve_inputs([tmp_path / "c" / "part1" / "*.txt"])] == ["doc001.txt", "doc004.txt"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "c" / "**" / "doc00[12].txt")])] == ["doc001.txt",
                                                                                               "doc002.txt"]
    names = [p.name for p in resolve_inputs([tmp_path / "c" / "part1"], extensions=("csv", ".MD"))]
    assert names == ["data.csv", "notes.md"]
    # A file named explicitly is read whatever its extension.
    assert resolve_inputs([tmp_path / "c" / "part1" / "data.csv"]) == [(tmp_path / "c/part1/data.csv").resolve()]
    meta = run([tmp_path / "c" / "part*" / "doc00[0-2].txt"], tmp_path / "out")
    assert len(meta["sources"]) == 3


def test_an_input_named_twice_is_read_once(tmp_path):
    """A file given twice, or by name and through its directory or a glob, is one document: tokenized once."""
    files = make_corpus(tmp_path / "c", n=6)
    one = files[0]
    got = resolve_inputs([one, tmp_path / "c", str(tmp_path / "c" / "part0" / "*.txt"), one])
    assert got[0] == one.resolve() and sorted(got) == sorted(f.resolve() for f in files)
    meta = run([one, one], tmp_path / "out")
    assert [s["path"] for s in meta["sources"]] == [str(one.resolve())]
    assert meta["total_text_bytes"] == one.stat().st_size


def test_jsonl_documents_and_text_field(tmp_path):
    docs = ["first document", "second \u00e9t\u00e9\nline", "third"]
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)]
    src = write(tmp_path / "d.jsonl", lines[0] + "\n\n" + lines[1] + "\n" + lines[2])  # blank line, no final newline
    meta = run([src], tmp_path / "out", text_field="body")
    assert meta["splits"]["train"]["documents"] == 3 and meta["split_mode"] == "tail"
    train, val = [], []
    for d in docs:  # each document cut at 90% of its characters
        cut = int(0.9 * len(d))
        train += byte_ids(d[:cut]) + [BYTE_EOT]
        val += byte_ids(d[cut:]) + [BYTE_EOT]
    assert stream(tmp_path / "out", "train").tolist() == train
    assert stream(tmp_path / "out", "val").tolist() == val


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        run([bad], tmp_path / "out")
    nofield = write(tmp_path / "nofield.jsonl", '{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:3: no string field 'text'.*--text-field"):
        run([nofield], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="input '.*nowhere.txt' does not exist"):
        run([tmp_path / "nowhere.txt"], tmp_path / "out")
    with pytest.raises(DataError, match=r"glob '.*\*.zzz' matches no file"):
        run([tmp_path / "*.zzz"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="input directory .*empty holds no files ending in .txt, .md; .*--ext"):
        run([tmp_path / "empty"], tmp_path / "out")


# ---- the split ------------------------------------------------------------------------------------------------


def test_single_document_tail_split_by_characters(tmp_path):
    text = "\u00e9" * 30 + "abc\n" * 10  # 2-byte characters: the cut counts characters, not bytes
    meta = run([write(tmp_path / "one.txt", text)], tmp_path / "out")
    cut = int(0.9 * len(text))
    assert stream(tmp_path / "out", "train").tolist() == byte_ids(text[:cut]) + [BYTE_EOT]
    assert stream(tmp_path / "out", "val").tolist() == byte_ids(text[cut:]) + [BYTE_EOT]
    assert meta["splits"]["val"]["eot_tokens"] == 1


def test_a_split_with_under_two_tokens_is_refused(tmp_path):
    with pytest.raises(DataError, match="train split would hold 0 tokens.*more text or another --val-fraction"):
        run([write(tmp_path / "tiny.txt", "a")], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_big_file_streams_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_CHARS", 1000)
    monkeypatch.setattr(prep, "PIECE_CHARS", 3000)
    text = "".join(f"line {i} of the text\n" for i in range(5000))
    tasks = []
    real = Encoder.__call__
    monkeypatch.setattr(Encoder, "__call__", lambda self, task: tasks.append(task) or real(self, task))
    run([write(tmp_path / "big.txt", text)], tmp_path / "out", val_fraction=0.25)
    assert len(tasks) > 20 and max(sum(len(text) for _, text, _ in t) for t in tasks) <= 3000  # bounded pieces
    assert sum(last for t in tasks for _, _, last in t) == 2  # one end of each split's side, no EOT in between
    cut = int(0.75 * len(text))
    assert stream(tmp_path / "out", "train").tolist() == byte_ids(text[:cut]) + [BYTE_EOT]


# ---- shards, atomicity, reuse ------------------------------------------------------------------------------


def test_many_shards_hold_the_same_stream(tmp_path):
    make_corpus(tmp_path / "c")
    one = run([tmp_path / "c"], tmp_path / "one")
    many = run([tmp_path / "c"], tmp_path / "many", shard_tokens=500)
    assert len(one["splits"]["train"]["shards"]) == 1
    assert len(many["splits"]["train"]["shards"]) == -(-many["splits"]["train"]["tokens"] // 500) > 5
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "one", split), stream(tmp_path / "many", split))
    assert many["splits"]["train"]["shards"][:2] == ["train-00000.bin", "train-00001.bin"]


def test_crash_mid_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    make_corpus(tmp_path / "c")
    out = tmp_path / "out"
    calls = []
    real = shards.ShardWriter._finalize

    def crash_after_first(self):
        real(self)
        calls.append(self.names[-1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "_finalize", crash_after_first)
    with pytest.raises(OSError, match="No space"):
        run([tmp_path / "c"], out, shard_tokens=300)
    assert calls == ["train-00000.bin"]
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == ["c"]  # no temp dir left behind
    monkeypatch.undo()
    meta = run([tmp_path / "c"], out, shard_tokens=300)
    assert load_meta(out)["fingerprint"] == meta["fingerprint"]

    # A crash while rebuilding leaves the previous complete version in place.
    write(tmp_path / "c" / "part0" / "doc000.txt", "changed")
    monkeypatch.setattr(shards.ShardWriter, "_finalize", crash_after_first)
    with pytest.raises(OSError):
        run([tmp_path / "c"], out, shard_tokens=300)
    assert load_meta(out) == meta
    assert shards.verify_dir(out, meta) is None


def test_second_run_reuses_and_changes_rebuild_with_a_reason(tmp_path, caplog, monkeypatch):
    # caplog listens at the root logger; another test's logging setup may have stopped propagation.
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    src = write(tmp_path / "a.txt", "hello there\n" * 50)
    out = tmp_path / "out"
    first = run([src], out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.set_level(logging.INFO, logger="gpttrain")

    caplog.clear()
    assert run([src], out) == first
    assert "up to date, reusing" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    caplog.clear()
    write(src, "new text\n" * 40)
    run([src], out)
    assert "sources changed" in caplog.text and "1 modified (a.txt)" in caplog.text

    caplog.clear()
    run([src], out, val_fraction=0.2)
    assert "setting val_fraction changed: 0.1 -> 0.2" in caplog.text

    caplog.clear()
    meta = run([src], out, val_fraction=0.2, tokenizer="bpe", bpe_vocab_size=300)
    assert "tokenizer changed" in caplog.text
    assert meta["tokenizer"]["kind"] == "bpe" and (out / "tokenizer.json").is_file()

    # A damaged shard is noticed even when the fingerprint matches.
    caplog.clear()
    (out / "val-00000.bin").write_bytes(b"junk")
    run([src], out, val_fraction=0.2, tokenizer="bpe", bpe_vocab_size=300)
    assert "rebuilding" in caplog.text and "val-00000.bin" in caplog.text
    assert shards.verify_dir(out, load_meta(out)) is None


def test_unrelated_files_in_out_survive(tmp_path):
    src = write(tmp_path / "a.txt", "some text\n" * 30)
    write(tmp_path / "out" / "notes.txt", "mine")
    write(tmp_path / "out" / "train-00007.bin", "stale shard of an older run")
    run([src], tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out" / "train-00007.bin").exists()


def test_a_document_split_far_from_the_fraction_asked_is_said(tmp_path, caplog, monkeypatch):
    """Documents go whole to one side: one large text among many small ones takes its share of the tokens with it
    (val held 96% of a walkthrough's tokens, and bpe trained on the other 4%, without a word)."""
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gpttrain")
    lines = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(150))
    small = write(tmp_path / "docs.jsonl", lines)
    meta = run([small], tmp_path / "even")
    share = meta["splits"]["val"]["tokens"] / meta["total_tokens"]
    assert 0.05 <= share <= 0.2 and "val holds" not in caplog.text  # 150 like documents: near 10%, no warning
    big = write(tmp_path / "book.txt", "a line of a long book\n" * 20000)
    meta = run([small, big], tmp_path / "skewed")
    share = meta["splits"]["val"]["tokens"] / meta["total_tokens"]
    assert not 0.05 <= share <= 0.2
    assert (f"{tmp_path / 'skewed'}: val holds {100 * share:.1f}% of the tokens, for --val-fraction 0.1: documents go "
            "whole to one side, picked by a hash of each, and a few large ones decide the share; to split a large "
            "text by position (its tail to val), prepare it in a set of fewer than 100 documents") in caplog.text
    caplog.clear()
    meta = run([big], tmp_path / "alone")  # by itself: its tail goes to val
    assert meta["splits"]["val"]["tokens"] / meta["total_tokens"] == pytest.approx(0.1, abs=0.01)
    assert "val holds" not in caplog.text


@pytest.mark.parametrize("what", ["run", "dead-run", "checkpoint", "checkpoints", "interrupted-save"])
def test_a_run_dir_is_no_out(tmp_path, what):
    """Shards written among a run's files (checkpoints/, config.json, metrics.jsonl) would mix data into a run: a
    training run's folder, even one that died before its first checkpoint, or a checkpoint, is refused."""
    src = write(tmp_path / "a.txt", "some text\n" * 30)
    run_dir = tmp_path / "runs" / "demo"
    write(run_dir / "metrics.jsonl", "{}\n")
    out = run_dir
    if what != "dead-run":
        write(run_dir / "checkpoints" / "step-000000600" / "COMPLETE", "{}")
    if what == "checkpoint":
        out = run_dir / "checkpoints" / "step-000000600"
    if what == "checkpoints":  # the folder of a run's checkpoints
        out = run_dir / "checkpoints"
    if what == "interrupted-save":  # a checkpoint folder without its COMPLETE marker
        out = run_dir / "checkpoints" / "step-000000700"
        write(out / "model.safetensors", "half")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    message = f"--out {out}: is a training run's folder, its checkpoints/ or one of them; prepared data goes in a " \
        "directory of its own, e.g. data/NAME"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        run([src], out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---- tokenizers and workers ------------------------------------------------------------------------------


def test_bpe_training_is_deterministic(tmp_path):
    make_corpus(tmp_path / "c", n=40)
    a = run([tmp_path / "c"], tmp_path / "a", tokenizer="bpe", bpe_vocab_size=300)
    b = run([tmp_path / "c"], tmp_path / "b", tokenizer="bpe", bpe_vocab_size=300)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a["tokenizer"] == b["tokenizer"] and a["fingerprint"] == b["fingerprint"]
    tok = open_tokenizer(tmp_path / "a")
    assert tok.spec() == a["tokenizer"] and tok.decode(tok.encode("document 7\n")) == "document 7\n"
    # Another process (other hash seeds, other thread timing) trains the same tokenizer.
    code = ("import sys; from gpttrain.data.prepare import prepare; "
            "prepare([sys.argv[1]], sys.argv[2], tokenizer='bpe', bpe_vocab_size=300, workers=1, progress=False)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c"), str(tmp_path / "p")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "123"})
    assert (tmp_path / "p" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    # An existing tokenizer.json is used as is instead of training.
    c = run([tmp_path / "c"], tmp_path / "c2", tokenizer="bpe", tokenizer_file=tmp_path / "a" / "tokenizer.json")
    assert c["tokenizer"] == a["tokenizer"] and np.array_equal(stream(tmp_path / "a", "val"),
                                                                 stream(tmp_path / "c2", "val"))


def test_bpe_trains_on_an_even_sample_of_a_corpus_over_the_cap(tmp_path, caplog, monkeypatch):
    """--bpe-train-mb: the sample is drawn from the whole train split, not its first megabytes: with a quarter
    of the text, words found only in the last files still become single tokens."""
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gpttrain")
    for i, word in enumerate(("alpha", "bravo", "charlie", "zulutime")):  # zulutime: only in the last files
        for k in range(40):  # a document is a piece here; pieces are what the sample keeps or leaves
            text = "".join(f"{word} {word}{j % 7} said {word}.\n" for j in range(10))
            write(tmp_path / "c" / f"{i}-{k:02d}.txt", text)
    total = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    meta = run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=total / 4e6)
    assert meta["tokenizer_request"]["train_bytes"] == math.ceil(total / 4)
    assert "of text sampled from all" in caplog.text
    tok = open_tokenizer(tmp_path / "s")
    for word in ("alpha", "bravo", "charlie", "zulutime"):
        assert len(tok.encode(f" {word}")) <= 2, (word, tok.encode(f" {word}"))
    # A different cap trains another tokenizer: the data is rebuilt, saying why.
    caplog.clear()
    run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=total / 2e6)
    assert "tokenizer changed" in caplog.text


def test_bpe_trains_on_the_train_split_only(tmp_path, monkeypatch):
    """The val split is held out from the tokenizer as from the model: no val text reaches bpe training, in
    either split mode (whole documents to val, or the tail of a few documents)."""
    from gpttrain.data.sources import _goes_to_val

    seen = capture_bpe_training(monkeypatch)
    for i in range(200):  # document mode: each document has its own word
        write(tmp_path / "d" / f"doc{i:03d}.txt", f"shared text uniq{i:03d}x\n" * 5)
    meta = run([tmp_path / "d"], tmp_path / "s1", tokenizer="bpe", bpe_vocab_size=300)
    assert meta["split_mode"] == "document" and meta["tokenizer_trained_on"] == "train split"
    val_docs = {i for i in range(200) if _goes_to_val(f"doc{i:03d}.txt", 0.1)}
    assert 5 < len(val_docs) < 40
    text = "".join(seen)
    assert {i for i in range(200) if f"uniq{i:03d}x" in text} == set(range(200)) - val_docs

    seen.clear()  # tail mode: one document, its last tenth goes to val
    write(tmp_path / "t" / "book.txt", "early words here\n" * 900 + "closing lines there\n" * 50)  # < a tenth
    meta = run([tmp_path / "t"], tmp_path / "s2", tokenizer="bpe", bpe_vocab_size=300)
    assert meta["split_mode"] == "tail"
    assert "early words" in "".join(seen) and "closing lines" not in "".join(seen)


def test_the_bpe_cap_is_measured_against_the_train_split(tmp_path, monkeypatch):
    """The sample's share is the cap over the train split's bytes, counted: which documents go to val is a hash's
    choice, so a large one there leaves a train split far below (1 - val_fraction) of the inputs. Here the
    train split is within the cap, so all of it is used."""
    from gpttrain.data.sources import _goes_to_val

    seen = capture_bpe_training(monkeypatch)
    for i in range(200):
        write(tmp_path / "c" / f"doc{i:03d}.txt", f"uniq{i:03d}x " * 100)  # 1.1 KB each
    big = next(f"big{k}.txt" for k in range(1000) if _goes_to_val(f"big{k}.txt", 0.1))
    write(tmp_path / "c" / big, "val only text\n" * 150_000)  # 2.1 MB, all of it in val
    meta = run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=1.0)
    assert meta["tokenizer_request"]["train_bytes"] == 1_000_000  # the inputs are over the cap: it samples
    train_docs = {i for i in range(200) if not _goes_to_val(f"doc{i:03d}.txt", 0.1)}
    text = "".join(seen)
    assert {i for i in range(200) if f"uniq{i:03d}x" in text} == train_docs and "val only" not in text


def test_a_dir_whose_bpe_saw_both_splits_is_kept_with_a_notice(tmp_path, caplog, monkeypatch):
    """Dirs prepared before the tokenizer was held off the val split keep their tokenizer (runs and checkpoints
    on them stay valid), and reusing one says how to prepare it anew."""
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gpttrain")
    make_corpus(tmp_path / "c", n=40)
    first = run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300)
    legacy = {k: v for k, v in first.items() if k != "tokenizer_trained_on"}
    (tmp_path / "s" / "meta.json").write_text(json.dumps(legacy))
    caplog.clear()
    again = run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300)
    assert again["tokenizer"] == first["tokenizer"] and "up to date, reusing" in caplog.text
    assert "its bpe tokenizer was trained on both splits, by an earlier gpttrain" in caplog.text


def test_the_bpe_sample_takes_short_and_long_documents_alike(tmp_path, monkeypatch):
    """800 short documents (1.2 KB) with a long one (60 KB) after every 25th: each kind gives about the asked
    share. A rule that kept a piece while the kept total lagged the share kept a piece about in proportion
    to its size, so the long ones crowded out the short (the reviewer's case: 4.5% short instead of half)."""
    for i in range(800):
        write(tmp_path / "c" / f"doc{i:03d}a.txt", "shortword line\n" * 80)
        if i % 25 == 0:
            write(tmp_path / "c" / f"doc{i:03d}b.txt", "longword line\n" * 4300)
    seen = capture_bpe_training(monkeypatch)
    total = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    run([tmp_path / "c"], tmp_path / "s", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=total / 4e6)
    short = sum(t.count("shortword") for t in seen) / (800 * 80)  # the share of each kind's lines kept
    long = sum(t.count("longword") for t in seen) / (32 * 4300)
    assert 0.15 < short < 0.35 and 0.15 < long < 0.35, (short, long)


def test_a_tiny_bpe_cap_still_samples_and_bad_types_are_refused(tmp_path):
    make_corpus(tmp_path / "c", n=40)
    meta = run([tmp_path / "c"], tmp_path / "a", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=1e-7)
    assert meta["tokenizer_request"]["train_bytes"] == 1  # not 0, which would mean all of the text
    for bad in (True, "5", -1, float("inf")):
        with pytest.raises(ConfigError, match="--bpe-train-mb"):
            run([tmp_path / "c"], tmp_path / "b", tokenizer="bpe", bpe_train_mb=bad)
    assert not (tmp_path / "b").exists()


def test_a_corpus_within_the_bpe_cap_is_trained_whole_and_keeps_its_fingerprint(tmp_path):
    make_corpus(tmp_path / "c", n=40)
    whole = run([tmp_path / "c"], tmp_path / "a", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=0)
    capped = run([tmp_path / "c"], tmp_path / "b", tokenizer="bpe", bpe_vocab_size=300, bpe_train_mb=1000)
    assert "train_bytes" not in capped["tokenizer_request"]
    assert whole["fingerprint"] == capped["fingerprint"] and whole["tokenizer"] == capped["tokenizer"]


def test_two_workers_give_the_same_tokens_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PIECE_CHARS", 2000)  # many tasks, so both workers take part
    make_corpus(tmp_path / "c", n=200)
    one = run([tmp_path / "c"], tmp_path / "w1", tokenizer="bpe", bpe_vocab_size=320, workers=1)
    two = run([tmp_path / "c"], tmp_path / "w2", tokenizer="bpe", bpe_vocab_size=320, workers=2)
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "w1", split), stream(tmp_path / "w2", split))


# ---- meta and CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_a_script_without_a_main_guard_gets_the_error_not_a_hang(tmp_path, tokenizer):
    """Spawned workers re-run such a script and die at start. With the bpe payload (hundreds of KB) sent
    inline, spawn blocked for good writing it to a worker that had died; now the payload goes by file."""
    import random

    rng = random.Random(0)  # varied words: enough merges for a tokenizer.json well over a pipe's 64 KiB
    for i in range(20):
        write(tmp_path / "c" / f"{i}.txt", " ".join("".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 9)))
                                                    for _ in range(3000)))
    script = tmp_path / "unguarded.py"
    script.write_text(f"from gpttrain.data.prepare import prepare\n"
                      f"prepare([{str(tmp_path / 'c')!r}], {str(tmp_path / 'out')!r}, tokenizer={tokenizer!r}, "
                      f"bpe_vocab_size=6000, workers=2, progress=False)\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 1
    assert "DataError: a tokenizer worker process died before finishing" in r.stderr
    assert "__main__" in r.stderr and not (tmp_path / "out" / "meta.json").exists()


def _spawned_workers(pid: int) -> list[int]:
    """The pids of `pid`'s multiprocessing spawn children (its resource tracker left out), from /proc."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"--multiprocessing-fork" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("target, when", [("process", "encoding"), ("group", "encoding"), ("group", "start")])
def test_ctrl_c_exits_130_at_once_and_leaves_nothing(tmp_path, target, when):
    """SIGINT to the process alone (`timeout -s INT`) or to its process group (Ctrl-C in a terminal, which reaches
    the workers too), while the workers encode or while they start (import numpy and the rest). It hung at times
    after printing "interrupted" (multiprocessing's exit joined the pool's queue feeder thread, blocked writing a
    task to workers that were gone), and a Ctrl-C while workers started printed their tracebacks
    (KeyboardInterrupt in a worker's imports), once an InvalidStateError from the pool's manager thread."""
    import signal
    import time

    line = "".join(f"Line {i}: every effort moves you {'forward' if i % 3 else 'onward'}, said painter {i % 97}.\n"
                   for i in range(4000))
    src = write(tmp_path / "big.txt", line * 36)  # 8.5 MB: seconds of bpe encoding on 2 workers
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpttrain", "prepare", "-q", str(src), "--out", str(out), "--tokenizer", "bpe",
         "--vocab-size", "300", "--bpe-train-mb", "0.2", "--workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # A test run started in the background of a shell without job control (`x; pytest &`) ignores SIGINT,
        # and a child inherits that: Ctrl-C's default, as in a terminal, for the command under test.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (_spawned_workers(proc.pid) if when == "start"  # in their imports: they take ~0.5 s
                   # mid-encoding: the first results are in the temp dir's train shard, more are on their way
                   else any(f.stat().st_size > 4096 for f in tmp_path.glob(".out.tmp-*/train-*.bin"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"nothing to interrupt after 60 s ({when})"
            time.sleep(0.005)
        (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert (proc.returncode, stderr, stdout) == (130, "interrupted\n", "")
    assert took < 15, f"{took:.1f} s from SIGINT to exit"  # a hang was for good; an exit takes under 1 s
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]  # no temp dir left either


def test_load_meta_names_the_dir(tmp_path):
    with pytest.raises(DataError, match="has no meta.json; run `gpttrain prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(DataError, match="lacks the tokenizer or the train/val split"):
        load_meta(tmp_path)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prep.add_prepare_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("flags, match", [
    (["--val-fraction", "1.5"], r"--val-fraction 1.5: must lie strictly between 0 and 1"),
    (["--val-fraction", "0"], r"--val-fraction 0.0"),
    (["--vocab-size", "100"], r"--vocab-size 100: .* >= 258"),
    (["--workers", "-1"], r"--workers -1: must be >= 0"),
    (["--shard-tokens", "0"], r"--shard-tokens 0"),
    (["--tokenizer", "byte", "--tokenizer-file", "x"], r"--tokenizer-file x: the byte tokenizer takes no file"),
    (["--bpe-train-mb", "-1"], r"--bpe-train-mb -1.0: must be a number >= 0 \(0 = train on all of the train split\)"),
    (["--bpe-train-mb", "nan"], r"--bpe-train-mb nan: must be a number >= 0"),
])
def test_cli_flags_are_validated(tmp_path, flags, match):
    args = parse([str(write(tmp_path / "a.txt", "text")), "--out", str(tmp_path / "out"), *flags])
    with pytest.raises(ConfigError, match=match):
        prep.run_prepare(args)
    assert not (tmp_path / "out").exists()


def test_cli_defaults_and_a_run(tmp_path):
    args = parse([])
    assert (args.inputs, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.workers) == (
        [], "data/prepared", "bpe", None, 0.1, 0)  # (None: 8192 for a bpe trained here; said where it cannot apply)
    (tmp_path / "c").mkdir()
    write(tmp_path / "c" / "a.rst", "restructured text\n" * 20)
    args = parse([str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--ext", "rst,.txt",
                  "--workers", "1", "--no-progress", "--shard-tokens", "100"])
    assert prep.run_prepare(args) == 0
    meta = load_meta(tmp_path / "out")
    assert meta["settings"]["extensions"] == [".rst", ".txt"] and len(meta["splits"]["train"]["shards"]) == 4


@pytest.mark.parametrize("flags, said", [
    (["--tokenizer", "byte", "--vocab-size", "512"],
     "--vocab-size 512: only a bpe tokenizer trained here takes it; the byte tokenizer has its own vocabulary"),
    (["--tokenizer", "byte", "--vocab-size", "512", "--bpe-train-mb", "10"],
     "--vocab-size 512 and --bpe-train-mb 10: only a bpe tokenizer trained here takes them; the byte tokenizer"),
    (["--tokenizer", "bpe", "--vocab-size", "300"], None),
])
def test_bpe_flags_that_cannot_apply_are_said(tmp_path, caplog, monkeypatch, flags, said):
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="gpttrain")
    args = parse([str(write(tmp_path / "a.txt", "some text here\n" * 40)), "--out", str(tmp_path / "out"),
                  "--workers", "1", "--no-progress", *flags])
    assert prep.run_prepare(args) == 0
    assert (said in caplog.text) if said else "only a bpe tokenizer" not in caplog.text


def test_binary_file_is_refused(tmp_path):
    blob = tmp_path / "weights.dat"
    blob.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError, match=r"weights.dat does not look like UTF-8 text \(NUL bytes\)"):
        prepare([blob], tmp_path / "out", tokenizer="byte", workers=1, progress=False)
    noisy = tmp_path / "latin1.txt"
    noisy.write_bytes("café crème brûlée ".encode("latin-1") * 200)
    with pytest.raises(DataError, match=r"latin1.txt does not look like UTF-8 text \(\d+ undecodable bytes"):
        prepare([noisy], tmp_path / "out", tokenizer="byte", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    ok = tmp_path / "ok.txt"
    ok.write_text("plain text with one stray byte: ", encoding="utf-8")
    with open(ok, "ab") as f:
        f.write(b"\xff" + b" and more text. " * 100)
    prepare([ok], tmp_path / "out", tokenizer="byte", workers=1, progress=False)  # one bad byte is tolerated


def test_quiet_prepare_prints_nothing(tmp_path):
    """`gpttrain prepare -q`: no log lines and no progress bar (a bar on stderr is noise in scripts and logs)."""
    src = write(tmp_path / "a.txt", "some text to tokenize\n" * 200)
    r = run_cli(["prepare", "-q", str(src), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--workers", "1"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert load_meta(tmp_path / "out")["splits"]["train"]["tokens"] > 0


def test_prepare_draws_no_bar_into_a_file(tmp_path):
    """stderr not a terminal (a log file, a pipe): the log lines, no progress bar."""
    src = write(tmp_path / "a.txt", "some text to tokenize\n" * 200)
    r = run_cli(["prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--workers", "1"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "tokenize:" not in r.stderr, r.stderr
    assert "(tail split): train " in r.stdout and ", 1 document, 1 shard; val " in r.stdout, r.stdout


def test_an_up_to_date_output_is_reused_without_reading_its_inputs(tmp_path, monkeypatch):
    """Reuse is decided from the inputs' sizes and times: a big directory is not re-read (its text check
    included) at every `train --data DIR` start. A rebuild still checks every input."""
    make_corpus(tmp_path / "c", n=30)
    run([tmp_path / "c"], tmp_path / "out")
    opened: list[str] = []
    real_open = open

    def counting_open(file, *a, **k):
        if str(file).startswith(str(tmp_path / "c")):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    run([tmp_path / "c"], tmp_path / "out")
    assert opened == []
    write(tmp_path / "c" / "zz.txt", "one more document\n" * 20)
    run([tmp_path / "c"], tmp_path / "out")
    assert any(p.endswith("zz.txt") for p in opened)
    (tmp_path / "c" / "zz.txt").write_bytes(b"\x00binary" * 100)
    with pytest.raises(DataError, match="zz.txt does not look like UTF-8 text"):
        run([tmp_path / "c"], tmp_path / "out")
