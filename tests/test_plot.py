import argparse
import json
import logging
import subprocess
import sys
import time

import pytest

from gpttrain.errors import DataError, GpttrainError
from gpttrain.plot import (
    _epoch_token_anchors,
    _format_count,
    _interp,
    _loss_figure,
    add_plot_arguments,
    plot_losses,
    plot_run,
    read_metrics,
    run_plot,
)

PDF_MAGIC = b"%PDF"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4096
STEPS_PER_EPOCH = 50


def train_record(step, loss=None, mfu=0.4, **extra):
    rec = {"kind": "train", "step": step, "epoch": step / STEPS_PER_EPOCH, "tokens": step * TOKENS_PER_STEP,
           "loss": 10.0 / (1 + step / 20) if loss is None else loss, "lr": 5e-4 * min(1.0, step / 10),
           "grad_norm": 1.0, "tok_per_s": 20000.0 + step, "tok_per_s_per_gpu": 5000.0, "tflops": 40.0,
           "mfu": mfu, "mem_peak_gib": None, "time": float(step)}
    rec.update(extra)
    return rec


def eval_record(step, val_loss=None):
    train_loss = 10.0 / (1 + step / 20)
    val = train_loss + 0.3 if val_loss is None else val_loss
    return {"kind": "eval", "step": step, "epoch": step / STEPS_PER_EPOCH, "tokens": step * TOKENS_PER_STEP,
            "train_loss": train_loss, "val_loss": val, "val_ppl": 2.718281828 ** val, "time": float(step)}


def write_run(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def normal_run(steps=200, mfu=0.4):
    recs = [{"kind": "config", "note": "ignored"}]
    for s in range(1, steps + 1):
        recs.append(train_record(s, mfu=mfu))
        if s % 5 == 0:
            recs.append(eval_record(s))
    return recs


def assert_plots_valid(paths, run_dir):
    names = sorted(p.name for p in paths)
    assert names == ["loss.pdf", "loss.png", "lr.png", "throughput.png"]
    for p in paths:
        assert p.parent == run_dir
        head = p.read_bytes()[:8]
        assert head.startswith(PDF_MAGIC if p.suffix == ".pdf" else PNG_MAGIC), p
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def test_plot_run_writes_valid_files(tmp_path):
    run = tmp_path / "run"
    write_run(run, normal_run())
    paths = plot_run(run)
    assert_plots_valid(paths, run)
    assert (run / "loss.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    # Rewriting over existing plots (every eval during training) works too.
    assert_plots_valid(plot_run(run), run)


def test_plot_run_is_fast_enough_for_every_eval(tmp_path):
    run = tmp_path / "run"
    write_run(run, normal_run(steps=3000))
    plot_run(run)  # warm up: the first call pays for importing matplotlib
    start = time.perf_counter()
    plot_run(run)
    assert time.perf_counter() - start < 5.0  # generous for slow CI; ~0.5 s on 2 cores


def test_read_metrics_groups_and_ignores_unknown(tmp_path):
    recs = [train_record(1, unknown_key=[1, 2]), {"kind": "something_new", "step": 1}, {"no_kind": 1}, [1, 2],
            eval_record(5), train_record(2)]
    m = read_metrics(write_run(tmp_path, recs))
    assert [r["step"] for r in m["train"]] == [1, 2]
    assert [r["step"] for r in m["eval"]] == [5]
    assert m["something_new"] == [{"kind": "something_new", "step": 1}]


def test_resume_keeps_the_last_record_per_step(tmp_path):
    # Crashed after step 12 with its last checkpoint at step 8: steps 9..12 are logged again after resume.
    before = [train_record(s, loss=100.0 + s) for s in range(1, 13)] + [eval_record(10, val_loss=99.0)]
    after = [{"kind": "resume", "step": 8, "checkpoint": "step-000000008"}]
    after += [train_record(s, loss=float(s)) for s in range(9, 15)] + [eval_record(10, val_loss=1.5)]
    m = read_metrics(write_run(tmp_path, before + after))
    steps = [r["step"] for r in m["train"]]
    assert steps == list(range(1, 15))
    losses = {r["step"]: r["loss"] for r in m["train"]}
    assert losses[8] == 108.0  # before the checkpoint: the original record
    assert all(losses[s] == float(s) for s in range(9, 15))  # repeated steps: the later record wins
    assert [(r["step"], r["val_loss"]) for r in m["eval"]] == [(10, 1.5)]
    assert [r["step"] for r in m["resume"]] == [8]


def test_resume_drops_the_abandoned_steps_not_yet_repeated(tmp_path):
    # Mid-way through catching up: steps 11, 12 of the dead run must not linger beside the new ones.
    before = [train_record(s, loss=100.0) for s in range(1, 13)]
    after = [{"kind": "resume", "step": 8}] + [train_record(s, loss=1.0) for s in (9, 10)]
    m = read_metrics(write_run(tmp_path, before + after))
    assert [r["step"] for r in m["train"]] == list(range(1, 11))
    assert [r["loss"] for r in m["train"]][8:] == [1.0, 1.0]


def test_a_start_drops_every_record_before_it(tmp_path):
    # A run that died before its first checkpoint, then a run started from scratch in the same run dir.
    before = [train_record(s, loss=100.0) for s in range(1, 13)] + [eval_record(10, val_loss=99.0)]
    before += [{"kind": "note"}, {"kind": "resume", "step": 4}]
    after = [{"kind": "start", "step": 0}] + [train_record(s, loss=1.0) for s in (1, 2)]
    m = read_metrics(write_run(tmp_path, before + after))
    assert [(r["step"], r["loss"]) for r in m["train"]] == [(1, 1.0), (2, 1.0)]
    assert set(m) == {"start", "train"}


def test_records_arrive_out_of_order_are_sorted(tmp_path):
    m = read_metrics(write_run(tmp_path, [train_record(3), train_record(1), train_record(2)]))
    assert [r["step"] for r in m["train"]] == [1, 2, 3]


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    path = write_run(run, normal_run(steps=20), tail='{"kind": "train", "step": 21, "epoch": 0.4, "lo')
    with caplog.at_level(logging.WARNING, logger="gpttrain"):
        m = read_metrics(path)
    assert [r["step"] for r in m["train"]] == list(range(1, 21))
    assert any(str(path) in rec.getMessage() and "last line" in rec.getMessage() for rec in caplog.records)
    assert_plots_valid(plot_run(run), run)


def test_bad_line_in_the_middle_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_record(1)) + "\n{not json\n" + json.dumps(train_record(2)) + "\n\n")
    with caplog.at_level(logging.WARNING, logger="gpttrain"):
        m = read_metrics(path)
    assert [r["step"] for r in m["train"]] == [1, 2]
    assert any("line 2" in rec.getMessage() for rec in caplog.records)


def test_missing_run_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope") as e:
        plot_run(missing)
    assert str(missing) in str(e.value)
    assert isinstance(e.value, GpttrainError)


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        plot_run(f)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(DataError) as e:
        plot_run(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n", '{"kind": "resume", "step": 0}\n{"kind": "config"}\n', '{"kin'])
def test_no_train_or_eval_records(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="has no train or eval records yet; plots appear after the first log step"):
        plot_run(tmp_path)
    try:
        plot_run(tmp_path)
    except DataError as e:
        assert str(path) in str(e)
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # nothing half-written


def test_single_eval_point(tmp_path):
    write_run(tmp_path, [eval_record(5)])
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["loss.pdf", "loss.png"]  # no train records: no throughput/lr
    fig = _loss_figure(read_metrics(tmp_path / "metrics.jsonl"))
    (top,) = fig.axes[0].child_axes
    assert top.get_xlabel() == "Tokens seen"


def test_single_train_point(tmp_path):
    write_run(tmp_path, [train_record(1)])
    assert_plots_valid(plot_run(tmp_path), tmp_path)


def test_mfu_null_everywhere(tmp_path):
    write_run(tmp_path, normal_run(steps=30, mfu=None))
    assert_plots_valid(plot_run(tmp_path), tmp_path)


def test_loss_figure_axes_and_labels():
    metrics = {"train": [train_record(s) for s in range(1, 101)], "eval": [eval_record(s) for s in range(5, 101, 5)]}
    fig = _loss_figure(metrics)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Epochs" and ax.get_ylabel() == "Loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Training loss (per step)", "Training loss", "Validation loss"]
    # Each line draws its own series against epochs.
    lines = {line.get_label(): line for line in ax.get_lines()}
    evals, steps = metrics["eval"], metrics["train"]
    for label, records, key in (("Training loss (per step)", steps, "loss"), ("Training loss", evals, "train_loss"),
                                ("Validation loss", evals, "val_loss")):
        assert list(lines[label].get_xdata()) == [r["epoch"] for r in records], label
        assert list(lines[label].get_ydata()) == [r[key] for r in records], label
    (top,) = ax.child_axes
    assert top.get_xlabel() == "Tokens seen"
    fig.draw_without_rendering()  # tick placement runs the forward/inverse functions over the whole axis range
    ticks = [t.get_text() for t in top.get_xticklabels() if t.get_text()]
    assert any(t.endswith("K") for t in ticks), ticks


def test_all_epochs_equal_omits_the_tokens_axis(tmp_path):
    recs = [dict(eval_record(s), epoch=0.0) for s in (5, 10, 15)]
    fig = _loss_figure({"eval": recs})
    assert fig.axes[0].child_axes == []
    write_run(tmp_path, recs)
    assert sorted(p.name for p in plot_run(tmp_path)) == ["loss.pdf", "loss.png"]


def test_epoch_token_anchors():
    assert _epoch_token_anchors({}) is None
    assert _epoch_token_anchors({"eval": [eval_record(5)]}) == ([0.0, 0.1], [0.0, 5 * TOKENS_PER_STEP])
    assert _epoch_token_anchors({"eval": [dict(eval_record(0))]}) is None  # (0, 0): nothing to scale by
    # Non-advancing points (same epoch, fewer tokens) are dropped so both directions stay monotonic.
    recs = [{"epoch": 0.1, "tokens": 100}, {"epoch": 0.2, "tokens": 100}, {"epoch": 0.3, "tokens": 300},
            {"epoch": 0.3, "tokens": 250}, {"epoch": None, "tokens": 9}]
    assert _epoch_token_anchors({"train": recs}) == ([0.1, 0.3], [100, 300])


def test_interp_extends_past_the_ends_and_inverts():
    xs, ys = [1.0, 2.0, 4.0], [10.0, 20.0, 60.0]
    out = _interp([0.0, 1.5, 3.0, 5.0], xs, ys)
    assert list(out) == [0.0, 15.0, 40.0, 80.0]
    assert list(_interp(out, ys, xs)) == [0.0, 1.5, 3.0, 5.0]


def test_format_count():
    assert [_format_count(v) for v in (0, 999, 1234, 4.5e6, 3.0e9, 2e12, -2000)] == \
        ["0", "999", "1.23K", "4.5M", "3B", "2T", "-2K"]
    # rounding up to the next unit takes its suffix
    assert [_format_count(v) for v in (999.7, 999_600, 999_700_000, -999_999)] == ["1K", "1M", "1B", "-1M"]


def test_plot_losses_creates_out_dir(tmp_path):
    out = tmp_path / "a" / "b"
    paths = plot_losses({"eval": [eval_record(5), eval_record(10)]}, out)
    assert [p.name for p in paths] == ["loss.pdf", "loss.png"] and all(p.is_file() for p in paths)


def test_run_plot_cli_helpers(tmp_path, caplog):
    write_run(tmp_path, normal_run(steps=10))
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    args = parser.parse_args([str(tmp_path)])
    with caplog.at_level(logging.INFO, logger="gpttrain"):
        assert run_plot(args) == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("loss.pdf", "loss.png", "throughput.png", "lr.png"):
        assert str(tmp_path / name) in logged
    assert "loss.pdf" in parser.format_help()


def test_import_does_not_load_matplotlib():
    code = "import sys, gpttrain.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
