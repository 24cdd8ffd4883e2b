"""Shard reading, token streams and the window loader: order, rank slices, resume, eval sets."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gpttrain.data.loader import TokenStream, WindowLoader, read_shard
from gpttrain.data.shards import FORMAT_VERSION, HEADER_SIZE, ShardWriter, load_meta
from gpttrain.errors import DataError


def make_data_dir(root: Path, train: np.ndarray, val: np.ndarray | None = None, shard_tokens: int = 10**9) -> Path:
    """A prepared dir holding exactly these tokens, written without a tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    val = np.arange(50, dtype=np.int64) if val is None else val
    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        w = ShardWriter(root, name, np.dtype("<u2"), shard_tokens)
        w.write(tokens)
        splits[name] = {"shards": w.close(), "tokens": len(tokens), "documents": 1, "eot_tokens": 1}
    meta = {"format_version": FORMAT_VERSION, "tokenizer": {"kind": "byte", "vocab_size": 257, "eot_id": 256},
            "tokenizer_file": None, "fingerprint": "test", "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tokens_of(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7) % 60000  # distinct neighbours, fits uint16


def loader(d: Path, **kw) -> WindowLoader:
    args = dict(context_length=8, micro_batch_size=2, seed=3)
    args.update(kw)
    return WindowLoader(d, "train", **args)


# ---- shards and streams ---------------------------------------------------------------------------


def test_read_shard_checks_header_and_size(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(100))
    shard = d / "train-00000.bin"
    assert np.array_equal(read_shard(shard), tokens_of(100))

    raw = shard.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[:-3])
    with pytest.raises(DataError, match="truncated.bin.*truncated"):
        read_shard(truncated)
    short = tmp_path / "short.bin"
    short.write_bytes(raw[:10])
    with pytest.raises(DataError, match="short.bin"):
        read_shard(short)
    bad_magic = tmp_path / "magic.bin"
    bad_magic.write_bytes(b"X" + raw[1:])
    with pytest.raises(DataError, match="magic.bin.*magic"):
        read_shard(bad_magic)
    bad_version = tmp_path / "version.bin"
    bad_version.write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    with pytest.raises(DataError, match="version.bin.*version 99"):
        read_shard(bad_version)
    bad_dtype = tmp_path / "dtype.bin"
    bad_dtype.write_bytes(raw[:12] + (3).to_bytes(4, "little") + raw[16:])
    with pytest.raises(DataError, match="dtype.bin"):
        read_shard(bad_dtype)
    assert len(raw) == HEADER_SIZE + 2 * 100


def test_shard_writer_rotates_and_stream_runs_across_boundaries(tmp_path):
    tokens = tokens_of(1000)
    d = make_data_dir(tmp_path / "d", tokens, shard_tokens=128)
    meta = load_meta(d)
    assert len(meta["splits"]["train"]["shards"]) == 8  # 7 full shards of 128, one of 104
    stream = TokenStream([d / n for n in meta["splits"]["train"]["shards"]])
    assert len(stream) == 1000
    for start, length in [(0, 1000), (120, 20), (127, 1), (128, 0), (250, 300), (999, 1)]:
        got = stream.get(start, length)
        assert got.dtype == np.int64
        assert np.array_equal(got, tokens[start:start + length])
    with pytest.raises(IndexError):
        stream.get(990, 11)


@pytest.mark.parametrize("dtype, tokens", [
    ("<u2", [0, 32767, 32768, 50256, 2**16 - 1, 5]),  # ids past 2^15 (gpt2's): unsigned, not wrapped negative
    ("<u4", [0, 70000, 2**32 - 1, 5]),
])
def test_shards_round_trip_every_id_of_their_dtype(tmp_path, dtype, tokens):
    tokens = np.array(tokens, dtype=np.int64)
    w = ShardWriter(tmp_path, "train", np.dtype(dtype), 3)
    w.write(tokens)
    names = w.close()
    assert np.array_equal(TokenStream([tmp_path / n for n in names]).get(0, len(tokens)), tokens)


# ---- windows and batches ---------------------------------------------------------------------------


def test_sequential_windows_are_the_text(tmp_path):
    tokens = tokens_of(1000)
    d = make_data_dir(tmp_path / "d", tokens, shard_tokens=100)
    T, s = 8, 5
    ld = loader(d, stride=s, shuffle=False, micro_batch_size=3)
    assert ld.num_windows == (1000 - (T + 1)) // s + 1
    x, y = ld.next_batch()
    assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.int64
    for row in range(3):
        window = tokens[row * s:row * s + T + 1]
        assert np.array_equal(x[row].numpy(), window[:-1])
        assert np.array_equal(y[row].numpy(), window[1:])
    x2, _ = ld.next_batch()
    assert np.array_equal(x2[0].numpy(), tokens[3 * s:3 * s + T])


def test_default_stride_is_context_length_without_overlap(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(100))
    ld = loader(d, shuffle=False, micro_batch_size=1)
    assert ld.stride == 8 and ld.num_windows == (100 - 9) // 8 + 1
    x0, _ = ld.next_batch()
    x1, _ = ld.next_batch()
    assert np.array_equal(x1[0].numpy(), tokens_of(100)[8:16])
    assert x0[0, -1] != x1[0, 0]


def test_epoch_drops_incomplete_batch_and_advances(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 23 + 1))  # 23 windows
    ld = loader(d, micro_batch_size=2, world_size=2, rank=0)
    assert ld.num_windows == 23 and ld.batches_per_epoch == 5  # 5 global batches of 4, 3 windows dropped
    assert ld.windows_per_epoch == 23
    for i in range(5):
        assert ld.epoch == 0 and ld.index == 4 * i
        ld.next_batch()
    assert ld.epoch == 1 and ld.index == 0 and ld.progress == 1.0


def test_epoch_covers_distinct_windows_and_reshuffles(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 40 + 1))  # 40 windows
    ld = loader(d, micro_batch_size=5, shuffle=True)
    firsts = []
    for _ in range(2 * ld.batches_per_epoch):
        x, _ = ld.next_batch()
        firsts.append(x[:, 0].numpy() // 7 // 8)  # the window index each row starts at
    epoch0, epoch1 = np.concatenate(firsts[:8]), np.concatenate(firsts[8:])
    assert sorted(epoch0) == list(range(40)) == sorted(epoch1)
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.arange(40))


def test_ranks_together_equal_one_rank_with_the_whole_batch(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 50 + 1))
    one = loader(d, micro_batch_size=6, shuffle=True)
    ranks = [loader(d, micro_batch_size=3, rank=r, world_size=2, shuffle=True) for r in range(2)]
    for _ in range(20):  # 8 global batches per epoch: crosses two epoch boundaries
        xa, ya = one.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(xa, torch.cat([p[0] for p in parts]))
        assert torch.equal(ya, torch.cat([p[1] for p in parts]))
    assert one.epoch == ranks[0].epoch == ranks[1].epoch == 2
    assert one.state_dict() == ranks[1].state_dict()


def test_resume_continues_at_the_same_sample_across_an_epoch(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 30 + 1))  # 30 windows, 7 batches of 4
    a = loader(d, micro_batch_size=4)
    for _ in range(5):
        a.next_batch()
    sd = a.state_dict()
    b = loader(d, micro_batch_size=4, seed=999)  # the saved seed wins
    b.load_state_dict(json.loads(json.dumps(sd)))  # survives a JSON round trip
    for _ in range(6):  # crosses the end of epoch 0
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch == 1


def test_resume_with_another_world_size(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 60 + 1))
    ranks = [loader(d, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for ld in ranks:
            ld.next_batch()
    sd = ranks[0].state_dict()
    assert sd["index"] == 12  # global samples, not per-rank batches
    reference = [ld.next_batch()[0] for ld in ranks]

    single = loader(d, micro_batch_size=4)
    single.load_state_dict(sd)
    x, _ = single.next_batch()
    assert torch.equal(x, torch.cat(reference))


def test_state_of_other_data_is_refused(tmp_path):
    a = loader(make_data_dir(tmp_path / "a", tokens_of(8 * 30 + 1)))
    b = loader(make_data_dir(tmp_path / "b", tokens_of(8 * 31 + 1)))
    with pytest.raises(DataError, match="30 windows.*31"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("stride", [65, 70])  # 1000 tokens: 15 windows at strides 64 and 65, 14 at 70
def test_state_of_other_windows_is_refused_even_when_they_count_the_same(tmp_path, stride):
    d = make_data_dir(tmp_path / "d", tokens_of(1000))
    a = WindowLoader(d, context_length=64, stride=64, micro_batch_size=2, seed=1)
    a.next_batch()
    b = WindowLoader(d, context_length=64, stride=stride, micro_batch_size=2, seed=1)
    with pytest.raises(DataError, match=re.escape(
            f"the saved data cursor is for windows of 64 tokens at stride 64, this run cuts 64 at stride {stride}; "
            "resume with --data.stride 64, or start a new run")):
        b.load_state_dict(a.state_dict())
    older = {k: v for k, v in a.state_dict().items() if k not in ("stride", "context_length")}
    if b.num_windows == a.num_windows:
        b.load_state_dict(older)  # a checkpoint that did not record them: the count is all there is to check
    else:
        with pytest.raises(DataError, match="counts 15 windows"):
            b.load_state_dict(older)


def test_too_few_tokens_or_windows(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(20), val=tokens_of(30))
    with pytest.raises(DataError, match=r"train split of .* holds 20 tokens: fewer than one window of "
                                         r"context_length\+1 = 33; lower --model.context_length"):
        loader(d, context_length=32)
    with pytest.raises(DataError, match=r"holds 2 windows .* global batch .* = 4; lower --train.micro_batch_size"):
        loader(d, micro_batch_size=2, world_size=2)
    # The val split only serves eval_batches: a small one is fine until someone asks it for training batches.
    val = WindowLoader(d, "val", context_length=8, micro_batch_size=4, world_size=2, shuffle=False)
    assert val.num_windows == 3 and val.eval_count(10) == 3
    with pytest.raises(DataError, match="val split"):
        val.next_batch()


def test_missing_meta_names_the_dir(tmp_path):
    d = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"{d} has no meta.json; run `gpttrain prepare .* --out {d}`"):
        loader(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is unreadable"):
        load_meta(tmp_path)


# ---- evaluation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_batches, num_windows", [(3, 100), (5, 13)])
def test_eval_batches_partition_the_same_set_as_one_rank(tmp_path, num_batches, num_windows):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * num_windows + 1))
    world, b = 3, 2
    one = loader(d, micro_batch_size=b * world, shuffle=False, require_full_batch=False)
    ranks = [loader(d, micro_batch_size=b, rank=r, world_size=world, require_full_batch=False) for r in range(world)]

    def starts(ld):
        rows = [x[:, 0].numpy() // 7 // 8 for x, _ in ld.eval_batches(num_batches)]
        assert all(len(r) for r in rows)  # only non-empty batches
        return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)

    full = starts(one)
    expected = min(num_batches * b * world, num_windows)
    assert len(full) == len(set(full)) == expected
    if num_windows > expected:
        assert full[0] == 0 and full[-1] >= num_windows * (expected - 1) // expected  # spread over the split
    per_rank = [starts(ld) for ld in ranks]
    assert sum(len(p) for p in per_rank) == expected
    assert [ld.eval_count(num_batches) for ld in ranks] == [len(p) for p in per_rank]
    assert sorted(np.concatenate(per_rank)) == sorted(full)
    assert len({ld.eval_global_batches(num_batches) for ld in ranks}) == 1


def test_eval_batches_do_not_touch_the_training_cursor(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 40 + 1))
    ld = loader(d, micro_batch_size=4)
    ld.next_batch()
    before = ld.state_dict()
    first = [x for x, _ in ld.eval_batches(2)]
    assert ld.state_dict() == before
    assert all(torch.equal(a, b) for a, b in zip(first, (x for x, _ in ld.eval_batches(2))))
    x_next, _ = ld.next_batch()
    ref = loader(d, micro_batch_size=4)
    ref.next_batch()
    assert torch.equal(ref.next_batch()[0], x_next)


# ---- what a resume hands the loader (mutation tests found these unchecked) ------------------------------


def test_batches_done_counts_a_cursor_saved_at_another_batch(tmp_path):
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 22 + 1))  # 22 windows of 8
    four = loader(d, micro_batch_size=4)  # 5 batches of 4 an epoch, 2 windows dropped
    assert (four.num_windows, four.batches_per_epoch) == (22, 5)
    four.epoch, four.index = 1, 19  # saved by a loader of 1: 19 windows of epoch 1 behind it
    assert four.batches_done == 5 + 5  # 3 windows left: no batch of 4 fits, so epoch 1 is done
    four.index = 9  # 13 left: 3 batches to do, 2 done (the one half-done counts as to do)
    assert four.batches_done == 5 + 2


def test_a_cursor_near_the_end_of_an_epoch_at_a_smaller_batch_goes_on_in_the_next(tmp_path):
    """Saved by a loader of 1 at window 21 of 22, loaded by one of 4: no batch of 4 fits, so the next batch is the
    first of the next epoch (not an IndexError past the windows)."""
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 22 + 1))
    one = loader(d, micro_batch_size=1)
    for _ in range(21):
        one.next_batch()
    four = loader(d, micro_batch_size=4)
    four.load_state_dict(one.state_dict())
    x, _ = four.next_batch()
    assert x.shape == (4, 8) and (four.epoch, four.index) == (1, 4)


def test_a_loaded_state_replaces_the_order_already_drawn(tmp_path):
    """The epoch's order is cached: a loader that drew batches from its own seed then loads another's state must
    draw the other's order (the cache is dropped), shuffle setting included."""
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 30 + 1))
    a, b = loader(d, seed=0), loader(d, seed=999, shuffle=False)
    b.next_batch()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_a_cursor_from_data_prepared_again_is_said(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="gpttrain")
    d = make_data_dir(tmp_path / "d", tokens_of(8 * 30 + 1))
    a = loader(d)
    sd = {**a.state_dict(), "fingerprint": "another"}
    loader(d).load_state_dict(sd)
    assert "was prepared again since this checkpoint (fingerprint differs)" in caplog.text


@pytest.mark.parametrize("windows, want", [(10, 3), (12, 3), (13, 4)])
def test_eval_global_batches_counts_the_short_last_one(tmp_path, windows, want):
    """FSDP's ranks run that many forwards each (a rank without windows in the last one runs dummies): one short of
    the batches yielded, and a rank would wait in a collective the others never enter."""
    d = make_data_dir(tmp_path / "d", tokens_of(8 * windows + 1))
    ranks = [loader(d, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].eval_global_batches(10) == want == -(-windows // 4)
    assert max(sum(1 for _ in r.eval_batches(10)) for r in ranks) == want
