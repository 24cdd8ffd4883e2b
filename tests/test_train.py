import dataclasses
import json
import logging
import os
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gpttrain.errors import ConfigError, DataError, GpttrainError
from gpttrain.metrics import flops_per_token
from gpttrain.optim import lr_at, param_groups
from gpttrain.settings import plan_steps, resolve_precision, round_up
from tests.helpers import (
    as_torchrun_rank,
    assert_same_steps,
    build_trainer,
    copy_checkpoint,
    first_step_grads,
    fit,
    free_port,
    gloo_rank,
    losses_and_norms,
    make_data,
    read_metrics,
    refused_train,
    run_cli,
    single_info,
    steps_of,
    take_steps,
    tiny_config,
    torchrun,
    torchrun_nodes,
    watch_optimizer_step,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _rank_main(rank, world, port, data_dir, run_dir, flags, out):
    with gloo_rank(rank, world, port) as info:
        trainer = build_trainer(tiny_config(data_dir, run_dir, *flags), info)
        draw = torch.rand(4)  # each rank's own random stream (dropout masks): seeded by its rank
        grads = first_step_grads(trainer)
        steps = losses_and_norms(trainer, 3)
        evaluated = trainer.evaluate()  # each rank evaluates its part of the windows; the losses are reduced
        torch.save({"draw": draw, "eval": evaluated}, out.with_suffix(f".rank{rank}.pt"))
        if rank == 0:
            torch.save({"steps": steps, "grads": grads, "params": trainer.model.state_dict()}, out)
        trainer.close()  # DDP must not outlive the process group


# AdamW's first steps divide each gradient by its own magnitude (+ eps): a component whose gradient is
# ~1e-9 turns float rounding of the summation order into a visible update difference. eps 1e-6 keeps the
# comparison about the gradients being those of one big batch, not about that conditioning.
STABLE = ("--optim.eps", "1e-6")


def assert_same_training(a_steps, a_grads, a_params, b):
    """Two runs took the same steps: losses, gradient norms, the first step's gradients (where a wrong scale
    shows: clipping and Adam hide it in the weights) and the weights after."""
    assert_same_steps(a_steps, losses_and_norms(b, 3))
    for name, g in b.grads.items():
        torch.testing.assert_close(a_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name, p in b.model.state_dict().items():
        torch.testing.assert_close(a_params[name], p, rtol=1e-6, atol=1e-6, msg=name)


def _compared(trainer):
    trainer.grads = first_step_grads(trainer)
    return trainer


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_two_ranks_equal_one_process(data_dir, tmp_path, accum):
    """2 ranks x micro-batch 2 x `accum` micro-steps = one process with micro-batch 4 x `accum`."""
    out = tmp_path / "ddp.pt"
    flags = ["--train.micro_batch_size", "2", "--train.grad_accum_steps", str(accum), *STABLE]
    mp.spawn(_rank_main, args=(2, free_port(), data_dir, tmp_path / "r2", flags, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = _compared(build_trainer(tiny_config(data_dir, tmp_path / "r1", "--train.micro_batch_size",
                                                 str(4 * accum), *STABLE), single_info()))
    assert_same_training(ddp["steps"], ddp["grads"], ddp["params"], single)
    ranks = [torch.load(out.with_suffix(f".rank{r}.pt"), weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])  # not the same dropout masks on every rank
    assert ranks[0]["eval"] == ranks[1]["eval"]
    if accum == 1:  # (the same global batch, so the same eval windows, as one process)
        for key, value in single.evaluate().items():
            assert ranks[0]["eval"][key] == pytest.approx(value, rel=1e-5), key


def test_accumulation_equals_one_big_batch(data_dir, tmp_path):
    acc = _compared(build_trainer(tiny_config(data_dir, tmp_path / "a", "--train.micro_batch_size", "2",
                                              "--train.grad_accum_steps", "4", *STABLE), single_info()))
    big = _compared(build_trainer(tiny_config(data_dir, tmp_path / "b", "--train.micro_batch_size", "8", *STABLE),
                                  single_info()))
    assert_same_training(losses_and_norms(acc, 3), acc.grads, acc.model.state_dict(), big)


def test_a_tokenizer_flag_that_contradicts_the_prepared_data_is_refused(tmp_path):
    """--data.tokenizer gpt2 on data prepared with byte: refused (before, ignored, and config.json said gpt2)."""
    line = refused_train(tmp_path, "--data.tokenizer", "gpt2")
    assert line == (f"error: --data.tokenizer gpt2: {tmp_path / 'prepared'} was prepared with the byte tokenizer; "
                    "drop the flag to train with it, or prepare the text again with --tokenizer gpt2 into another "
                    "--out"), line


def test_the_run_records_the_tokenizer_it_trains_with(tmp_path):
    """The demo preset names bpe; on data prepared with byte the run's config says byte."""
    r = run_cli(["train", "--preset", "demo", "--data", str(make_data(tmp_path)), "--run-dir", str(tmp_path / "r"),
                 "--device", "cpu", "--model.n_layers", "1", "--model.emb_dim", "32", "--model.n_heads", "2",
                 "--model.context_length", "32", "--train.micro_batch_size", "2", "--train.max_steps", "1",
                 "--log.sample_every", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["tokenizer"] == "byte"


def test_settings_that_cannot_take_effect_are_said(tmp_path):
    """A warmup longer than the run, and --dist settings in one process: trained, with a warning each."""
    r = run_cli(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir", str(tmp_path / "r"),
                 "--device", "cpu", "--train.max_steps", "3", "--optim.warmup_steps", "10", "--dist.strategy", "fsdp",
                 "--log.sample_every", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "--optim.warmup_steps 10 covers the whole run (3 steps): the learning rate never reaches" in out
    assert "--dist.strategy fsdp: one process (not started by torchrun), so nothing to distribute" in out


def test_data_too_small_is_said_with_trains_flags(tmp_path):
    """prepare's refusal, met through `train --data FILE`: names the file and the flag as train spells it."""
    (tmp_path / "empty.txt").write_text("")
    r = run_cli(["train", "--preset", "tiny", "--data", "empty.txt", "--run-dir", str(tmp_path / "r"), "--device",
                 "cpu"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: --data empty.txt: the train split would hold 0 tokens, each "
                                                 "split needs at least 2: give more text or another "
                                                 "--data.val_fraction (now 0.1)"), r.stderr[-2000:]
    assert not (tmp_path / "r").exists() and not any((tmp_path / "data").glob("*"))


def test_the_largest_seed_trains_and_samples(tmp_path):
    """--train.seed 2^32-1: the evaluation's sample seeds with seed + step, kept in range (it stopped the run)."""
    r = run_cli(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir", str(tmp_path / "r"),
                 "--device", "cpu", "--train.seed", "4294967295", "--train.max_steps", "2", "--train.eval_every", "1",
                 "--log.sample_every", "1", "--log.sample_tokens", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "samples.txt").is_file()


def test_a_refusal_under_torchrun_is_said_once(tmp_path):
    """Every rank refuses the same settings; rank 0 alone prints the line (before: once per rank)."""
    r = torchrun(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir", str(tmp_path / "r"),
                  "--device", "cpu", "--model.n_heads", "3"], cwd=tmp_path)
    assert r.returncode != 0
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: --model.n_heads")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_a_rank_that_cannot_read_its_data_is_named_once(tmp_path):
    """Two nodes without a shared disk, the second's copy of the data with a truncated shard: every rank stops at
    once with the same verdict, which rank 0 prints, naming rank 1 and its file (before: rank 1 said nothing, rank 0
    died in its next collective with gloo's "Connection closed by peer")."""
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    node_a.mkdir()
    make_data(node_a)
    shutil.copytree(node_a / "prepared", node_b / "prepared")
    shard = node_b / "prepared" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    runs = torchrun_nodes(["train", "--preset", "tiny", "--data", "prepared", "--run-dir", "r", "--device", "cpu",
                           "--dist.timeout_s", "60"], [node_a, node_b])
    assert [r.returncode for r in runs] == [1, 1], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    said = [line for r in runs for line in r.stdout.splitlines() if "error:" in line]
    assert len(said) == 1, runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    assert said[0].startswith(f"error: rank 1: shard {Path('prepared') / 'train-00000.bin'}: ")
    assert "truncated" in said[0] and "Connection closed" not in runs[0].stdout
    assert not (node_a / "r").exists()


def test_a_rank_local_error_is_said_by_its_rank(monkeypatch, capsys):
    """Under torchrun an error is printed by rank 0 alone, unless it is marked as the rank's own (rank_local)."""
    from gpttrain import cli, run
    from gpttrain.errors import rank_local

    def fails(error):
        def run_training(*args, **kwargs):
            raise error
        return run_training

    waits = []
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(sleep=waits.append))  # cli's alone, not the process's
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # torchrun's, on rank 0's node (GROUP_RANK 0)
    monkeypatch.setenv("GROUP_RANK", "0")
    for rank, error, said, waited in [("0", DataError("shared"), "error: shared\n", []),
                                      ("1", DataError("shared"), "", [cli.SHARED_ERROR_GRACE_S]),
                                      ("1", rank_local(DataError("mine")), "[rank 1] error: mine\n", []),
                                      ("0", rank_local(DataError("mine")), "[rank 0] error: mine\n", [])]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(run, "run_training", fails(error))
        assert cli.main(["train", "--preset", "tiny"]) == 2
        assert capsys.readouterr().err == said
        assert waits == waited  # a shared verdict's other ranks leave rank 0 the time to say it
        waits.clear()
    monkeypatch.setenv("GROUP_RANK", "1")  # another node's rank: its exit does not stop rank 0 at once
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(run, "run_training", fails(DataError("shared")))
    assert cli.main(["train", "--preset", "tiny"]) == 2 and waits == [] and capsys.readouterr().err == ""
    # A command that runs alone says its error whatever RANK a launcher left in the environment.
    assert cli.main(["consolidate", "no-such-run", "--out", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _on_every_rank(rank, world, port, out):
    from gpttrain import distributed as distmod

    def raises(message):
        raise DataError(message)

    def unreadable():
        raise OSError(5, "Input/output error")

    said = []
    with gloo_rank(rank, world, port) as info:
        for fn in (lambda: rank, lambda: raises("bad") if rank == 1 else rank, lambda: raises(f"bad on {rank}"),
                   lambda: raises("alike"), lambda: unreadable() if rank == 1 else rank):
            try:
                said.append(["ok", distmod.on_every(fn, info)])
            except (GpttrainError, OSError) as e:
                said.append([type(e).__name__, str(e)])
    (out / f"rank{rank}.json").write_text(json.dumps(said))


def test_on_every_raises_one_verdict_on_every_rank(tmp_path):
    mp.spawn(_on_every_rank, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    both = ["DataError", "rank 0: bad on 0; rank 1: bad on 1"]
    io = "rank 1: OSError: [Errno 5] Input/output error"  # not a GpttrainError: still no rank left waiting
    assert said[0] == [["ok", 0], ["GpttrainError", "rank 1: bad"], both, ["DataError", "alike"], ["GpttrainError", io]]
    assert said[1] == [["ok", 1], ["DataError", "rank 1: bad"], both, ["DataError", "alike"], ["GpttrainError", io]]


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("mine")
    r = run_cli(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir",
                 str(tmp_path / "afile"), "--device", "cpu"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: --run-dir: '{tmp_path / 'afile'}' exists and is not a "
                                                 "directory; give a directory"), r.stderr[-2000:]
    assert (tmp_path / "afile").read_text() == "mine"


def test_tiny_model_overfits_a_small_text(tmp_path):
    data = make_data(tmp_path, text="the cat sat on the mat. " * 60)
    cfg = tiny_config(data, tmp_path / "run", "--optim.lr", "3e-3", "--optim.warmup_steps", "10",
                      "--train.max_steps", "150")
    trainer = build_trainer(cfg, single_info())
    losses = steps_of(trainer, 150)
    assert min(losses[-10:]) < 0.5, losses[-10:]


def test_end_to_end_single_process_outputs(data_dir, tmp_path):
    run = tmp_path / "run"
    r = run_cli(["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
                 "--train.max_steps", "12", "--train.eval_every", "6", "--train.log_every", "3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    for name in ("config.json", "metrics.jsonl", "loss.pdf", "loss.png", "samples.txt", "train.log"):
        assert (run / name).is_file(), name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert [r["step"] for r in evals] == [6, 12]
    keys = {"step", "epoch", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "tok_per_s_per_gpu", "tflops", "mfu",
            "mem_peak_gib", "time"}
    assert keys <= set(train[0])
    assert train[0]["mfu"] is None  # CPU: unknown peak, omitted
    assert {"train_loss", "val_loss", "val_ppl", "tokens", "eval_seconds"} <= set(evals[0])
    assert train[-1]["tokens"] == 12 * 4 * 64
    # The process's time by kind, last: the parts add up to its wall time.
    summary = recs[-1]
    assert summary["kind"] == "summary" and summary["step"] == 12
    parts = ("first_step_s", "train_s", "eval_s", "plot_s", "checkpoint_s", "other_s")
    assert all(summary[k] >= 0 for k in parts)
    assert sum(summary[k] for k in parts) == pytest.approx(summary["wall_s"], rel=1e-6)
    assert summary["timed_steps"] == 11 and summary["evals"] == 2
    assert summary["eval_s"] >= sum(r["eval_seconds"] for r in evals)
    assert 0 < summary["eval_share"] < 1 and 0 < summary["bookkeeping_share"] < 1
    assert "time in this process:" in (run / "train.log").read_text()
    log_text = (run / "train.log").read_text()
    assert re.search(r"[\d,]+ tok/s \([\d,]+ per process\), [\d.]+ TFLOP/s per process\n", log_text)  # not GPU
    assert "Every effort moves you" in (run / "samples.txt").read_text()
    assert (run / "loss.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_torchrun_two_ranks_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    r = torchrun(["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
                  "--train.max_steps", "30", "--train.eval_every", "15"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    for name in ("config.json", "metrics.jsonl", "loss.pdf", "loss.png", "samples.txt"):
        assert (run / name).is_file(), name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train[-1]["step"] == 30
    assert train[-1]["tokens"] == 30 * 4 * 64 * 2  # global tokens: both ranks
    assert train[-1]["tok_per_s"] == pytest.approx(2 * train[-1]["tok_per_s_per_gpu"])
    assert "world: 2 process(es)" in r.stdout


@pytest.mark.slow
def test_two_node_job_on_loopback(data_dir, tmp_path):
    run = tmp_path / "run"
    runs = torchrun_nodes(["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
                           "--train.max_steps", "6", "--train.eval_every", "6"], [tmp_path, tmp_path], timeout=300)
    assert [r.returncode for r in runs] == [0, 0], [r.stdout[-3000:] for r in runs]
    assert "world: 2 process(es)" in runs[0].stdout
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in recs if r["kind"] == "train"][-1]["tokens"] == 6 * 4 * 64 * 2


# ---- pure pieces ---------------------------------------------------------------------------------


def test_lr_schedule():
    kw = dict(base_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)
    assert lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(1000, **kw) == pytest.approx(0.1)
    assert lr_at(50, base_lr=5e-4, total_steps=100, schedule="constant") == 5e-4


def test_weight_decay_groups():
    from gpttrain.config import ModelConfig
    from gpttrain.model import GPT

    for tie in (False, True):
        model = GPT(ModelConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, tie_embeddings=tie))
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(p.ndim == 2 and "emb" not in names[id(p)] for p in decay["params"])
        assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
        assert ("out_head.weight" in {names[id(p)] for p in decay["params"]}) == (not tie)
        # Both ways: every matrix but the embeddings decays, at the configured rate; the rest does not.
        assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters()
                                                          if p.ndim == 2 and "emb" not in n}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def _seen_at_optimizer_step(trainer) -> list[tuple[float, float]]:
    """(learning rate, total gradient norm) as each optimizer step is called: what the update uses."""
    seen = []

    def record():
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append((trainer.optimizer.param_groups[0]["lr"], torch.nn.utils.get_total_norm(grads).item()))

    watch_optimizer_step(trainer, record)
    return seen


def test_each_update_uses_its_steps_lr_and_the_clipped_gradients(data_dir, tmp_path):
    """Update k (0-based) takes lr_at(k): with 4 warmup steps, a quarter of the rate first, the full rate at the
    fourth. The gradients it sees are clipped to --optim.grad_clip, and the log keeps the norm before clipping."""
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r", "--optim.warmup_steps", "4", "--optim.grad_clip",
                                        "0.05", "--train.max_steps", "50"), single_info())
    seen = _seen_at_optimizer_step(trainer)
    stats = take_steps(trainer, 5)
    base = trainer.cfg.optim.lr
    assert [lr for lr, _ in seen[:4]] == pytest.approx([base / 4, base / 2, 3 * base / 4, base], rel=1e-12)
    assert seen[4][0] == pytest.approx(lr_at(4, base_lr=base, total_steps=50, warmup_steps=4), rel=1e-12)
    for (_, clipped), s in zip(seen, stats):
        assert s.grad_norm > 0.05 and clipped == pytest.approx(0.05, rel=1e-4), (clipped, s.grad_norm)


def test_gradients_are_clipped_after_the_loss_scale_is_taken_off(data_dir, tmp_path):
    """fp16's loss scale (here on CPU, scale 1024): the logged norm and the clipped gradients are those of the
    unscaled run (clipping before unscaling would clip scaled gradients and log a norm 1024 times too big)."""
    runs = []
    for scaled in (False, True):
        trainer = build_trainer(tiny_config(data_dir, tmp_path / f"r{scaled}", "--optim.grad_clip", "0.05",
                                            *STABLE), single_info())
        if scaled:
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        seen = _seen_at_optimizer_step(trainer)
        runs.append((take_steps(trainer, 2), seen))
    (plain, plain_seen), (scaled, scaled_seen) = runs
    for a, b in zip(plain, scaled):
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    assert [n for _, n in scaled_seen] == pytest.approx([n for _, n in plain_seen], rel=1e-4)


def test_validation_loss_is_the_mean_over_every_window(data_dir, tmp_path):
    """The val loss of evaluate() against a reference computed here, window by window, with a short last batch
    (micro-batch 7): a wrong average, an unweighted mean of batch means or the wrong split would show."""
    from gpttrain.data.loader import WindowLoader

    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r", "--train.micro_batch_size", "7",
                                        "--train.eval_batches", "1000"), single_info())
    take_steps(trainer, 2)
    ref = WindowLoader(data_dir, "val", context_length=trainer.cfg.model.context_length, micro_batch_size=1,
                       shuffle=False)
    losses = []
    model = trainer.model.eval()
    with torch.no_grad():
        for x, y in ref.eval_batches(10_000):
            losses.append(model(x, y).item())
    assert len(losses) % 7 != 0  # the trainer's last batch is short
    assert trainer.evaluate()["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_plan_steps_and_vocab_rounding(data_dir, tmp_path):
    assert round_up(50257, 64) == 50304
    cfg = tiny_config(data_dir, tmp_path, "--train.epochs", "2", "--train.grad_accum_steps", "2")
    assert plan_steps(cfg, batches_per_epoch=10, tokens_per_step=100) == 10
    cfg.train.max_steps = 3
    assert plan_steps(cfg, 10, 100) == 3
    cfg.train.max_tokens = 150
    assert plan_steps(cfg, 10, 100) == 2


def test_a_resume_at_another_batch_plans_what_is_left(data_dir, tmp_path, caplog, monkeypatch):
    """--train.max_tokens and --train.epochs hold across a resume whose global batch differs (another micro-batch
    or world size): the steps left are planned at the new batch, from the tokens and the data's cursor."""
    cfg = tiny_config(data_dir, tmp_path, "--train.epochs", "2", "--train.grad_accum_steps", "2")
    # 100 windows of batches of 8: 12 a epoch; the cursor at window 30 of epoch 1 leaves 70 // 8 = 8 in it
    assert plan_steps(cfg, 12, 100, step=20, tokens=2000, batches_done=12 + 4) == 20 + (24 - 16) // 2
    cfg.train.epochs, cfg.train.max_tokens = None, 3000
    assert plan_steps(cfg, 12, 100, step=20, tokens=2000, batches_done=16) == 30
    assert plan_steps(cfg, 12, 100, step=20, tokens=3100, batches_done=16) == 20  # past it: nothing left

    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gpttrain")

    def fit_run(run, *flags):
        caplog.clear()
        trainer = fit(data_dir, run, *flags)
        trainer.said = caplog.text
        return trainer

    a = fit_run(tmp_path / "a", "--train.max_tokens", "2048", "--train.micro_batch_size", "2",
                "--train.checkpoint_every", "3", "--train.keep_checkpoints", "10")
    assert (a.step, a.tokens, a.tokens_per_step) == (16, 2048, 128)
    b_run = copy_checkpoint(tmp_path / "a" / "checkpoints" / "step-000000003", tmp_path / "b").parent
    b = fit_run(b_run.parent, "--train.max_tokens", "2048", "--train.micro_batch_size", "4",
            "--run.resume", "auto")
    assert (b.step, b.tokens) == (3 + 7, 384 + 7 * 256)  # the first to reach 2048 tokens at 256 a step
    saved = json.loads((b_run / "step-000000003" / "state.json").read_text())["trainer"]
    assert (saved["timed_steps"], saved["timed_tokens"]) == (2, 2 * 128)  # (each process's first step is untimed)
    # The average tokens/s counts each step at its own batch (not every step at 256).
    assert (b.timed_steps, b.timed_tokens) == (2 + 6, 2 * 128 + 6 * 256)
    assert b.average_tok_s() == b.timed_tokens / b.train_time
    mine = 6 * 256 / (b.train_time - saved["train_time"])  # the last line also says this process's own
    done = re.search(r"done: 10 steps, 2,176 tokens, average ([\d,]+) tok/s over the run's timed steps, ([\d,]+) in "
                     r"this process\n", b.said)
    assert done and [int(g.replace(",", "")) for g in done.groups()] == [round(b.average_tok_s()), round(mine)]
    assert "done: 16 steps" in a.said and "over the run's" not in a.said  # a run in one process: one figure
    loader = b.train_loader  # 547 windows, 4 a batch: 136 a epoch; the cursor at window 3 * 2 + 7 * 4 = 34
    # 8 whole batches of 4 behind it, and half of one: that one counts as still to do (it is: 128 batches left)
    assert (loader.num_windows, loader.index, loader.batches_done) == (547, 34, 8) == (547, 34, 136 - 513 // 4)


def test_lr_scales_with_world_size_when_asked(data_dir, tmp_path):
    from gpttrain.distributed import DistInfo

    cfg = tiny_config(data_dir, tmp_path, "--optim.lr", "5e-4", "--optim.scale_lr_with_world", "true")
    assert build_trainer(cfg, single_info()).base_lr == 5e-4
    fake_world = DistInfo(0, 0, 4, torch.device("cpu"), None)  # no process group needed to read the lr
    tr = build_trainer(cfg, fake_world)
    assert tr.base_lr == pytest.approx(2e-3)


# ---- bad input --------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    r = run_cli(["train", "--preset", "tiny", "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")],
                cwd=tmp_path)
    assert r.returncode == 2
    assert "--data" in r.stderr and "nope" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "r").exists()


def test_vocab_smaller_than_tokenizer(data_dir, tmp_path):
    r = run_cli(["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(tmp_path / "r"),
                 "--model.vocab_size", "100"], cwd=tmp_path)
    assert r.returncode == 2
    assert "--model.vocab_size: 100 is smaller than the data's tokenizer vocabulary (257)" in r.stderr
    assert not (tmp_path / "r").exists()


def test_context_longer_than_the_data(data_dir, tmp_path):
    with pytest.raises(DataError, match="fewer than one window"):
        build_trainer(tiny_config(data_dir, tmp_path, "--model.context_length", "100000"), single_info())


def test_micro_batch_below_one(tmp_path):
    r = run_cli(["train", "--preset", "tiny", "--train.micro_batch_size", "0"], cwd=tmp_path)
    assert r.returncode == 2 and "--train.micro_batch_size: 0 must be at least 1" in r.stderr
    r = run_cli(["train", "--preset", "tiny", "--train.grad_accum_steps", "0"], cwd=tmp_path)
    assert r.returncode == 2 and "--train.grad_accum_steps: 0 must be at least 1" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_asked_where_there_is_none(data_dir, tmp_path):
    r = run_cli(["train", "--preset", "tiny", "--data", str(data_dir), "--device", "cuda",
                 "--run-dir", str(tmp_path / "r")], cwd=tmp_path)
    assert r.returncode == 2 and "--device: cuda was asked for but torch sees no CUDA GPU" in r.stderr


def test_bf16_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match="--train.precision: bf16-mixed needs bf16, which Tesla V100 lacks"):
        resolve_precision("bf16-mixed", torch.device("cuda", 0))
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16-mixed"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_oom_is_answered_with_a_batch_that_fits(data_dir, tmp_path, monkeypatch):
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r", "--train.micro_batch_size", "8"), single_info())

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    from gpttrain.memory import estimate_training_memory

    # A GPU where micro-batch 2 fits and 8 does not.
    fits = estimate_training_memory(trainer.cfg.model, 2, "fp32").total
    too_big = estimate_training_memory(trainer.cfg.model, 4, "fp32").total
    gpu_bytes = (fits + too_big) / 2 / 0.9
    monkeypatch.setattr(trainer, "train_step", boom)
    monkeypatch.setattr(trainer, "device_memory", lambda: gpu_bytes)
    with pytest.raises(GpttrainError, match=r"CUDA out of memory at --train.micro_batch_size 8 .*gpttrain info "
                                            r"estimates .* Try --train.micro_batch_size 2 --train.grad_accum_steps 4"):
        trainer.fit()


def test_oom_message_points_to_recomputed_weight_casts_where_they_apply(data_dir, tmp_path, monkeypatch):
    hints = {}
    for name, flags in (("kept", ("--train.compile", "on")),
                        ("recast", ("--train.compile", "on", "--train.recompute_weight_casts", "true")),
                        ("eager", ("--train.compile", "off")),
                        ("checkpointed", ("--train.compile", "on", "--train.activation_checkpointing", "true"))):
        cfg = tiny_config(data_dir, tmp_path / name, "--train.precision", "bf16-mixed", *flags)
        trainer = build_trainer(cfg, single_info())
        monkeypatch.setattr(trainer, "device_memory", lambda: 1 << 20)  # nothing fits
        hints[name] = "--train.recompute_weight_casts true would save about" in trainer._oom_message()
    # Compiled bf16-mixed without the flag only (activation checkpointing already recasts in backward).
    assert hints == {"kept": True, "recast": False, "eager": False, "checkpointed": False}


def test_oom_message_points_to_the_16_bit_residual_stream_where_it_applies(data_dir, tmp_path, monkeypatch):
    hints = {}
    for name, flags in (("fp32 stream", ("--train.precision", "bf16-mixed", "--train.compile", "on")),
                        ("16-bit stream", ("--train.precision", "bf16-mixed", "--train.compile", "on",
                                           "--train.residual_dtype", "compute")),
                        ("eager", ("--train.precision", "bf16-mixed", "--train.compile", "off")),
                        ("fp32 run", ("--train.precision", "fp32"))):
        trainer = build_trainer(tiny_config(data_dir, tmp_path / name.replace(" ", "-"), *flags), single_info())
        monkeypatch.setattr(trainer, "device_memory", lambda: 1 << 20)  # nothing fits
        hints[name] = re.search(r"--train.residual_dtype compute would save about \d+\.\d GiB", trainer._oom_message())
    # Compiled mixed precision with an fp32 stream only: eager autograd saves fp32 copies of the LayerNorm inputs
    # of a 16-bit stream too (autocast runs LayerNorm in fp32 on CUDA).
    assert {name: bool(hint) for name, hint in hints.items()} == {"fp32 stream": True, "16-bit stream": False,
                                                                   "eager": False, "fp32 run": False}


def test_oom_message_points_to_redrawn_dropout_masks_where_they_apply(data_dir, tmp_path, monkeypatch):
    hints = {}
    drop = ("--model.drop_rate", "0.1")
    for name, flags in (("kept", (*drop, "--train.compile", "on")),
                        ("redrawn", (*drop, "--train.compile", "on", "--train.recompute_dropout_masks", "true")),
                        ("no dropout", ("--train.compile", "on")),
                        ("eager", (*drop, "--train.compile", "off")),
                        ("checkpointed", (*drop, "--train.compile", "on", "--train.activation_checkpointing", "true"))):
        cfg = tiny_config(data_dir, tmp_path / name.replace(" ", "-"), "--train.precision", "bf16-mixed", *flags)
        trainer = build_trainer(cfg, single_info())
        monkeypatch.setattr(trainer, "device_memory", lambda: 1 << 20)  # nothing fits
        hints[name] = re.search(r"--train.recompute_dropout_masks true would save about \d+\.\d GiB",
                                trainer._oom_message())
    # Compiled, with dropout, without the flag only (activation checkpointing recomputes the masks already).
    assert {name: bool(hint) for name, hint in hints.items()} == {"kept": True, "redrawn": False, "no dropout": False,
                                                                   "eager": False, "checkpointed": False}


def _train_benchmark(tmp_path, *args: str):
    import subprocess
    import sys

    from tests.helpers import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--device", "cpu", "--steps", "2",
                        "--warmup", "1", "--run-dir", str(tmp_path / "b"), *args], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def test_train_benchmark_rows_a_failed_run_and_the_summary(tmp_path):
    """benchmarks/train.py, which the GPU figures come from: one row per run, a failed, timed-out or unstarted
    run's row with its error (a failure's traceback end on stderr), then the summary."""
    (ran, failed, summary), err = _train_benchmark(tmp_path, "--runs", "tiny:2x1", "tiny:2x1+train.attention=bogus")
    assert ran["preset"] == "tiny" and ran["variant"] == {} and ran["tok_per_s"] > 0 and ran["wall_s"] > 0
    assert (failed["preset"], failed["micro_batch_size"], failed["grad_accum_steps"]) == ("tiny", 2, 1)
    assert failed["variant"] == {"train.attention": "bogus"} and "tok_per_s" not in failed
    assert failed["error"].startswith("error: --train.attention: 'bogus' is not allowed")
    assert "failed (exit 2); its last lines:" in err
    assert [row.get("error") for row in summary["summary"]] == [None, failed["error"]]

    (timed_out, summary), err = _train_benchmark(tmp_path, "--runs", "tiny:2x1", "--run-timeout-s", "0.01")
    assert timed_out["error"] == "timed out after --run-timeout-s 0.01" and "timed out; its last lines:" in err
    (summary,), _ = _train_benchmark(tmp_path, "--runs", "tiny:2x1", "tiny:4x1", "--budget-s", "0")
    assert [(row["micro_batch_size"], row["error"]) for row in summary["summary"]] == [
        (2, "not run: --budget-s 0 spent"), (4, "not run: --budget-s 0 spent")]


def test_bench_cpu_reports_overhead(tmp_path):
    r = run_cli(["bench", "--preset", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "3", "--reads",
                 "--run-dir", str(tmp_path / "b")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("tok_per_s", "tflops", "mfu", "mem_peak_gib", "overhead", "plain_step_s"):
        assert key in row
    assert row["reads"]["steps"] == 3 and row["reads"]["late_step_s"] > 0  # --steps 3 // 2, at least 3
    assert row["mfu"] is None and row["tok_per_s"] > 0
    tiny_tokens = 4 * 64  # tiny: micro-batch 4 x context 64, no accumulation
    assert row["tok_per_s"] == pytest.approx(tiny_tokens / row["step_s"], rel=1e-9)
    assert row["tflops"] == pytest.approx(row["tok_per_s_per_gpu"] * row["flops_per_token"] / 1e12, rel=1e-9)
    # The estimate of this layout on a GPU, as gpttrain info gives it (fp32: CPU's auto precision; eager).
    from gpttrain.config import resolve
    from gpttrain.memory import GIB, estimate_training_memory, run_layout

    tiny = resolve("tiny")  # synthetic tokens: the preset's vocabulary
    assert row["flops_per_token"] == flops_per_token(tiny.model)
    layout = run_layout(tiny.model, tiny.train, "fp32", False, 0)  # on a GPU, the loss it would pick there
    assert row["mem_estimate_gib"] == pytest.approx(estimate_training_memory(
        tiny.model, tiny.train.micro_batch_size, **layout).total / GIB)


def test_bench_eval_times_evaluation_eager_and_compiled(tmp_path):
    for compile_flag, compiled in (("off", False), ("on", True)):
        r = run_cli(["bench", "--preset", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--eval",
                     "--train.compile", compile_flag, "--train.eval_batches", "3", "--train.eval_every", "7",
                     "--log.sample_every", "0" if compiled else "2", "--run-dir", str(tmp_path / "b")], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout.strip().splitlines()[-1])
        ev = row["eval"]
        assert ev["batches"] == 3 and ev["eval_every"] == 7 and ev["eager_ms_per_batch"] > 0
        assert (ev["compiled_ms_per_batch"] is not None) == compiled and (ev["compile_s"] is not None) == compiled
        per_eval = 2 * 3 * (ev["compiled_ms_per_batch"] if compiled else ev["eager_ms_per_batch"]) / 1000
        if compiled:
            assert ev["sample_ms"] is None  # --log.sample_every 0
        else:
            assert ev["sample_ms"] > 0
            per_eval += ev["sample_ms"] / 1000 / 2
        assert ev["share_at_cadence"] == pytest.approx(per_eval / (per_eval + 7 * row["step_s"]))


def test_bench_eval_under_fsdp_on_synthetic_tokens(tmp_path):
    """FSDP's evaluation asks its loader how many global batches every rank runs: bench's synthetic tokens answer
    too (the row's eval held an AttributeError). With 2 ranks there is no overhead against a one-process loop."""
    r = torchrun(["bench", "--preset", "tiny", "--device", "cpu", "--dist.strategy", "fsdp", "--eval", "--warmup", "1",
                  "--steps", "2", "--train.compile", "off", "--train.eval_batches", "2", "--log.sample_every", "0",
                  "--run-dir", str(tmp_path / "b")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["strategy"] == "fsdp" and "error" not in row["eval"], row["eval"]
    assert row["eval"]["batches"] == 2 and row["eval"]["eager_ms_per_batch"] > 0
    assert row["overhead"] is None and row["plain_step_s"] is None  # a plain loop of one process: no comparison


def test_bench_reads_reads_each_step_at_once_or_after_the_next_is_queued(monkeypatch):
    """bench --reads' three patterns on a fake trainer that logs each step queued and each read: unread steps
    are never read, `at_once` reads each step before the next is queued, `late` reads step k only once step
    k+1 is queued, and no step is read twice."""
    from gpttrain import bench
    from gpttrain import steps as steps_mod

    events = []
    real = steps_mod.read_steps

    def logged_read(stats):
        events.extend(("read", s.n) for s in stats)
        real(stats)

    class FakeTrainer:
        n = 0

        def train_step(self):
            FakeTrainer.n += 1
            stats = steps_mod.StepStats(torch.zeros(4), 1, False)
            stats.n = FakeTrainer.n
            events.append(("queue", stats.n))
            return stats

    monkeypatch.setattr(steps_mod, "read_steps", logged_read)
    out = bench.time_reads(FakeTrainer(), torch.device("cpu"), steps=3, rounds=2)
    assert out["steps"] == 3 and out["rounds"] == 2
    for name in ("at_once", "late"):
        assert out[f"{name}_cost"] == pytest.approx(out[f"{name}_step_s"] / out["unread_step_s"] - 1)
    reads = [n for kind, n in events if kind == "read"]
    assert len(reads) == len(set(reads))
    queued_at = {n: i for i, (kind, n) in enumerate(events) if kind == "queue"}
    read_at = {n: i for i, (kind, n) in enumerate(events) if kind == "read"}
    # Each timing is 1 warm-up + 3 steps: per round unread 1-4, at_once 5-8, late 9-12 (the last unread).
    for r in (0, 12):
        assert not any(r + k in read_at for k in range(1, 5))
        assert all(queued_at[r + k] < read_at[r + k] < queued_at[r + k + 1] for k in range(5, 9))
        assert all(queued_at[r + k + 1] < read_at[r + k] for k in range(9, 12)) and r + 12 not in read_at


def test_bench_profile_says_where_the_step_time_goes(tmp_path):
    r = run_cli(["bench", "--preset", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--profile",
                 "--run-dir", str(tmp_path / "b")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout.strip().splitlines()[-1])["profile"]
    assert prof["profiled_steps"] == 2 and 0 < prof["busy_ms"] <= prof["step_ms"]
    kinds = prof["ms_by_kind"]
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["optimizer"] > 0
    assert sum(kinds.values()) == pytest.approx(prof["busy_ms"], rel=0.01)
    mm = next(t for t in prof["top"] if t["name"] == "aten::mm")
    assert mm["calls"] == int(mm["calls"]) > 0  # per step: the same matmuls each step


def test_bench_keeps_the_timed_row_when_the_profiler_fails(tmp_path, monkeypatch):
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve

    def boom(*args, **kwargs):
        raise RuntimeError("CUPTI is gone")

    monkeypatch.setattr(bench, "profile_steps", boom)
    cfg = resolve("tiny", None, parse_dotted(["--run.dir", str(tmp_path), "--run.device", "cpu"]))
    rows = []
    logging.getLogger("gpttrain").setLevel(logging.DEBUG)  # an API caller's level
    assert bench.run_bench(cfg, rows.append, warmup=1, steps=1, profile=True) == 0
    assert rows[-1]["tok_per_s"] > 0 and rows[-1]["profile"] == {"error": "RuntimeError: CUPTI is gone"}
    assert logging.getLogger("gpttrain").level == logging.DEBUG  # bench quiets the library only while it runs


def test_bench_times_its_plain_loop_with_the_trainers_residual_stream(tmp_path, monkeypatch):
    """bench's baseline loop runs the model as the trainer does: the residual stream's dtype is the trainer's."""
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve

    seen = []
    real = bench.plain_loop_step_time

    def plain(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("residual_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "plain_loop_step_time", plain)
    cfg = resolve("tiny", None, parse_dotted(["--run.dir", str(tmp_path), "--run.device", "cpu", "--train.precision",
                                              "bf16-mixed", "--train.residual_dtype", "compute"]))
    rows = []
    assert bench.run_bench(cfg, rows.append, warmup=1, steps=1) == 0
    assert seen == [torch.bfloat16] and rows[-1]["residual_dtype"] == "bfloat16"


def test_profile_summary_kinds_and_busy_time():
    from gpttrain.bench import summarize_profile, work_kind

    assert [work_kind(n) for n in ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "flash_fwd_kernel",
                                   "sm90_xmma_gemm_bf16bf16_bf16f32", "triton_poi_fused_add_gelu_3",
                                   "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
                                   "Memcpy HtoD (Pageable -> Device)", "cudnn_generated_fort_native_sdpa_sm90",
                                   "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "elementwise_kernel",
                                   "triton_tem_fused_addmm_1", "triton_poi_fused__scaled_dot_product_flash_3")] == [
        "matmul", "attention", "matmul", "compiled elementwise", "optimizer", "copy", "attention",
        "communication", "other", "matmul", "compiled elementwise"]
    # Two steps in 100 us of wall time; the matmul overlaps the copy for 5 us, so the device was busy 45 us.
    spans = [("gemm_a", 0, 20), ("Memcpy HtoD", 15, 25), ("triton_poi_x", 40, 50), ("gemm_a", 60, 70)]
    out = summarize_profile(spans, steps=2, wall_us=100)
    assert out["step_ms"] == pytest.approx(0.05) and out["busy_ms"] == pytest.approx(0.0225)
    assert out["idle_share"] == pytest.approx(0.55)
    assert out["ms_by_kind"] == {"matmul": 0.015, "copy": 0.005, "compiled elementwise": 0.005}
    assert out["top"][0] == {"name": "gemm_a", "ms": 0.015, "calls": 1.0}


def test_average_throughput_counts_only_timed_steps(data_dir, tmp_path):
    # Each process's first step (compile, warm-up) is untimed; after a resume the average must still be
    # tokens of timed steps over their time, not steps since the start over it.
    tr = build_trainer(tiny_config(data_dir, tmp_path), single_info())
    tr.load_state_dict({"step": 10, "tokens": 10 * tr.tokens_per_step, "train_time": 2.0, "timed_steps": 8})
    assert tr.average_tok_s() == pytest.approx(tr.tokens_per_step * 8 / 2.0)
    assert tr.state_dict()["timed_steps"] == 8


def test_nan_or_infinite_settings_are_refused(tmp_path):
    r = run_cli(["info", "--preset", "tiny", "--optim.lr", "nan"], cwd=tmp_path)
    assert r.returncode == 2 and "--optim.lr: 'nan' is not a finite number" in r.stderr
    r = run_cli(["info", "--preset", "tiny", "--optim.grad_clip", "inf"], cwd=tmp_path)
    assert r.returncode == 2 and "--optim.grad_clip: 'inf' is not a finite number" in r.stderr


SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("read_late", [True, False])
def test_training_steps_read_nothing_back_between_log_steps(data_dir, tmp_path, monkeypatch, read_late):
    """A training step must never wait for the device (no `.item()`, `.tolist()`, `if tensor:`...): the loop
    reads the steps' numbers at log steps only, and on CUDA (`read_late`) a log step's once the next step is
    queued behind it (on a GPU a read at the log step itself would leave the device idle until the host had
    queued more); a CPU run reads it at the log step itself."""
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "run", "--train.max_steps", "8", "--train.log_every",
                                        "4", "--train.eval_every", "8", "--log.sample_every", "0"), single_info())
    assert trainer.optimizer.defaults["fused"]  # the default on CPU too: it skips bad steps on the device
    assert not trainer.read_late
    trainer.read_late = read_late  # True: as on CUDA
    reads: list[tuple[int, str, bool]] = []  # (step counter, method, inside train_step)
    inside = [False]
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            reads.append((trainer.step, _name, inside[0]))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_step = trainer.train_step

    def step(stop_requested=False):
        inside[0] = True
        try:
            return real_step(stop_requested)
        finally:
            inside[0] = False

    trainer.train_step = step
    assert trainer.fit() == 0
    monkeypatch.undo()
    assert not [r for r in reads if r[2]], reads  # nothing inside any step
    # The first step (untimed, read at once), step 4's numbers (with step 5 queued, if read late), the last step.
    assert {s for s, _, _ in reads} == ({1, 5, 8} if read_late else {1, 4, 8})
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"] == [4, 8]


def test_records_read_a_step_late_equal_those_read_at_once(data_dir, tmp_path):
    """The train records of log steps read once the next step is queued carry that step's counters and numbers:
    the same records as a run that reads every step at once (an evaluation at each step forces the read)."""
    runs = {}
    for name, every in (("late", "100"), ("at_once", "1")):
        cfg = tiny_config(data_dir, tmp_path / name, "--train.max_steps", "9", "--train.log_every", "2",
                          "--train.eval_every", every, "--train.eval_batches", "1", "--log.sample_every", "0",
                          "--optim.warmup_steps", "3")
        trainer = build_trainer(cfg, single_info())
        trainer.read_late = True  # as on CUDA
        assert trainer.fit() == 0
        runs[name] = [{k: r[k] for k in ("step", "epoch", "tokens", "lr", "loss", "grad_norm")}
                      for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
    assert [r["step"] for r in runs["late"]] == [2, 4, 6, 8, 9]
    assert runs["late"] == runs["at_once"]
    assert len({r["lr"] for r in runs["late"]}) > 3  # the schedule moves between the records compared


@pytest.mark.parametrize("read_late", [False, True])
def test_each_train_record_times_its_own_steps_on_cpu(data_dir, tmp_path, monkeypatch, read_late):
    """Steps of 10 ms on a fake clock, a record at each: on CPU (the default) every record after the untimed first
    says 10 ms a step. Read late, as on CUDA, a record would count the next step's time, run on the CPU before the
    read, as its own (so they differ: that is why CPU reads at once). The model TFLOP/s and MFU follow from the
    rate: FLOPs per token (checked against the issue's figures in test_metrics) and --log.peak_tflops."""
    trainer = _clocked_trainer(data_dir, tmp_path / "run", monkeypatch, "--log.peak_tflops", "0.5",
                               eval_s=0.0, step_s=0.01)
    trainer.cfg.train.log_every = 1
    assert trainer.read_late is False
    trainer.read_late = read_late
    assert trainer.fit() == 0
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    rates = [r["tok_per_s"] for r in records]
    assert len(rates) == 8 and rates[0] is None
    assert records[0]["tflops"] is None and records[0]["mfu"] is None
    want = trainer.tokens_per_step / 0.01
    if read_late:
        assert rates[1:] != pytest.approx([want] * 7)
    else:
        assert rates[1:] == pytest.approx([want] * 7)
    timed = [r for r in records if r["tok_per_s"] is not None]  # read late, a step may time none
    assert len(timed) >= 4
    for r in timed:
        assert r["tok_per_s_per_gpu"] == r["tok_per_s"]  # one process
        assert r["tflops"] == pytest.approx(r["tok_per_s"] * flops_per_token(trainer.cfg.model) / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-9)


def test_a_record_of_several_steps_counts_the_tokens_of_each(data_dir, tmp_path, monkeypatch):
    """--train.log_every 2: a record's rate is the tokens of every step it times over their time, not one step's."""
    trainer = _clocked_trainer(data_dir, tmp_path / "run", monkeypatch, "--train.eval_every", "4", eval_s=0.0,
                               step_s=0.01, steps=4)
    trainer.cfg.train.log_every = 2
    assert trainer.fit() == 0
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2, 4]  # step 1 is not timed: the first record times one step
    assert [r["tok_per_s"] for r in records] == pytest.approx([trainer.tokens_per_step / 0.01] * 2)


def test_a_bad_step_is_skipped_without_a_fused_optimizer(data_dir, tmp_path):
    """--optim.fused off: the optimizer cannot skip on the device, so the step asks the host (one sync)."""
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r", "--optim.fused", "off"), single_info())
    assert not trainer.optimizer.defaults["fused"]
    weight = trainer.model.tok_emb.weight
    before = weight.detach().clone()
    handle = weight.register_hook(lambda g: g * float("nan"))
    assert not trainer.train_step().finite
    handle.remove()
    assert torch.equal(weight, before)
    assert trainer.train_step().finite and not torch.equal(weight, before)


def test_quiet_train_prints_nothing_even_while_preparing(tmp_path):
    """`gpttrain train -q` on a text file: the data is prepared on the way, without progress bars."""
    text = tmp_path / "corpus.txt"
    text.write_text("a few words of text for a tiny model.\n" * 300, encoding="utf-8")
    r = run_cli(["train", "-q", "--preset", "tiny", "--data", str(text), "--run-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--train.max_steps", "2", "--log.sample_every", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (r.stdout, r.stderr) == ("", "")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "step 2/2" in log_text and "time in this process" in log_text  # -q quiets the console, not the log
    # and the lines from before train.log opened are in it, once, first
    assert log_text.count("data: ") == log_text.count("resolved config") == 1
    assert log_text.index("data: ") < log_text.index("resolved config") < log_text.index("step 2/2")


def test_quiet_run_logging_hands_on_warnings_only_and_restores_the_logger():
    """run_logging(quiet=True): the root's handlers (the console) get warnings once and no info lines, the
    gpttrain logger's own handlers (train.log) get both; on exit the logger propagates as before."""
    import logging

    from gpttrain import monitor

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    console, own = Collect(), Collect()
    root, lg = logging.getLogger(), logging.getLogger("gpttrain")
    root.addHandler(console)
    try:
        with monitor.run_logging(True, quiet=True):
            lg.addHandler(own)
            lg.info("an info line")
            lg.warning("a warning")
            lg.removeHandler(own)
        lg.warning("after the run")
    finally:
        root.removeHandler(console)
    assert console.seen == ["a warning", "after the run"]
    assert own.seen == ["an info line", "a warning"]
    assert lg.propagate and monitor._onward is None and not any(isinstance(h, monitor._Onward) for h in lg.handlers)


def test_run_logging_keeps_the_last_resort_and_leaves_no_handler_behind(capsys):
    """A library caller with no logging set up still sees a run's warnings on stderr (Python's last resort),
    quiet or not, once each, and no info lines; overlapping runs' logging leaves none of its handlers behind."""
    import logging

    from gpttrain import monitor

    root, lg = logging.getLogger(), logging.getLogger("gpttrain")
    saved = root.handlers[:]
    root.handlers.clear()  # pytest's own capture handlers would count as takers
    try:
        for quiet in (False, True):
            with monitor.run_logging(True, quiet=quiet):
                lg.warning("a warning, quiet=%s", quiet)
                lg.info("an info line")
    finally:
        root.handlers[:] = saved
    err = capsys.readouterr().err
    assert err.count("a warning, quiet=False") == err.count("a warning, quiet=True") == 1, err
    assert "an info line" not in err
    with monitor.run_logging(True, quiet=True), monitor.run_logging(True, quiet=False):
        pass
    assert not [h for h in lg.handlers if isinstance(h, (monitor._Onward, monitor._Early))]
    assert monitor._onward is None and monitor._early is None and lg.propagate


@pytest.mark.parametrize("progress", ["lines", "bar"])
def test_quiet_train_still_prints_warnings_once(data_dir, tmp_path, progress):
    """Under -q a warning reaches the console once (through the bar's writer while it lives), info lines none."""
    r = run_cli(["train", "-q", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--train.max_steps", "3", "--log.progress", progress, "--log.sample_every", "0",
                 "--log.sample_every_epochs", "1e-6"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("is less than one step") == 1, out
    assert "resolved config" not in out and "time in this process" not in out
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "is less than one step" in log_text and "time in this process" in log_text


def _plotting_trainer(data_dir, run_dir, monkeypatch, *, steps: int, eval_every: int, share: float,
                      seconds: float = 0.0, before_step=None):
    """A tiny trainer whose loss plot is replaced by a recorder of the step each drawing happens at (each
    taking `seconds`), with PLOT_COST_SHARE = `share`; `before_step(trainer)` runs before every step."""
    import time

    import gpttrain.plot

    monkeypatch.setattr("gpttrain.reporting.PLOT_COST_SHARE", share)
    trainer = build_trainer(tiny_config(data_dir, run_dir, "--train.max_steps", str(steps), "--train.eval_every",
                                        str(eval_every), "--log.sample_every", "0"), single_info())
    drawn: list[int] = []

    def plot(metrics, out_dir):
        drawn.append(trainer.step)
        time.sleep(seconds)
        return []

    monkeypatch.setattr(gpttrain.plot, "plot_losses", plot)
    if before_step is not None:
        real_step = trainer.train_step

        def step(stop_requested=False):
            before_step(trainer)
            return real_step(stop_requested)

        trainer.train_step = step
    return trainer, drawn


def _clocked_trainer(data_dir, run_dir, monkeypatch, *flags, eval_s: float, step_s: float, steps: int = 8):
    """A tiny trainer, evaluating every 2 steps, whose loop reads a fake clock that each evaluation moves by
    `eval_s` and each step by `step_s` seconds (nothing else moves it): the shares are exact."""
    import time
    import types

    trainer = build_trainer(tiny_config(data_dir, run_dir, "--train.max_steps", str(steps), "--train.eval_every", "2",
                                        "--log.sample_every", "0", *flags), single_info())
    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time)
    monkeypatch.setattr("gpttrain.trainer.time", clock)
    monkeypatch.setattr("gpttrain.reporting.time", clock)  # where evaluations are timed
    real_eval, real_step = trainer.evaluate, trainer.train_step

    def evaluate():
        now[0] += eval_s
        return real_eval()

    def step(stop_requested=False):
        now[0] += step_s
        return real_step(stop_requested)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr(trainer, "train_step", step)
    return trainer


def test_costly_evaluation_is_said_once_with_the_flags_that_cut_it(data_dir, tmp_path, monkeypatch, caplog):
    # An evaluation of 0.3 s every 2 steps of 0.01 s: 0.3 / 0.32 of the time. Said at the second evaluation
    # (the first may compile), once.
    trainer = _clocked_trainer(data_dir, tmp_path / "run", monkeypatch, eval_s=0.3, step_s=0.01)
    with caplog.at_level("WARNING", logger="gpttrain"):
        assert trainer.fit() == 0
    hints = [r.getMessage() for r in caplog.records if "evaluation takes" in r.getMessage()]
    assert hints == ["evaluation takes 94% of this run's time: every 2 steps (0.02 s), 0.30 s for the losses over "
                     "2 batches of each split and 0.00 s for samples, on average; raise --train.eval_every or lower "
                     "--train.eval_batches to train faster"]
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["evals"] == 4
    assert summary["eval_s"] == pytest.approx(4 * 0.3) and summary["train_s"] == pytest.approx(7 * 0.01)
    assert summary["first_step_s"] == pytest.approx(0.01) and summary["eval_share"] == pytest.approx(0.3 / 0.32)


def test_cheap_evaluation_is_not_remarked(data_dir, tmp_path, monkeypatch, caplog):
    # 0.01 s every 2 steps of 0.05 s: 9% of the time, under EVAL_SHARE_HINT.
    trainer = _clocked_trainer(data_dir, tmp_path / "run", monkeypatch, eval_s=0.01, step_s=0.05)
    with caplog.at_level("WARNING", logger="gpttrain"):
        assert trainer.fit() == 0
    assert not [r for r in caplog.records if "evaluation takes" in r.getMessage()]
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["eval_share"] == pytest.approx(0.01 / 0.11)


def test_samples_every_so_many_epochs_between_evaluations(data_dir, tmp_path, caplog):
    """--log.sample_every_epochs: a sample at the step that passes each multiple, with or without an evaluation
    there, on top of (here: instead of) the ones at evaluations; the summary counts the time of those between."""
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(data_dir, run, "--train.eval_every", "1000", "--log.sample_every", "0",
                                        "--log.sample_every_epochs", "0.5", "--train.epochs", "2"), single_info())
    loader = trainer.train_loader
    per_epoch, windows, batch = loader.batches_per_epoch, loader.num_windows, loader.global_batch_size
    assert trainer.total_steps == 2 * per_epoch

    def progress(step):  # epochs done after `step` steps (an epoch's last windows, short of a batch, are dropped)
        return step // per_epoch + (step % per_epoch) * batch / windows

    # The first step at or past 0.5, 1, 1.5 and 2 epochs; the last is also the final evaluation's.
    want = [next(s for s in range(1, 2 * per_epoch + 1) if progress(s) >= k / 2) for k in (1, 2, 3, 4)]
    assert want[0] != per_epoch / 2  # half an epoch falls inside a step
    with caplog.at_level("INFO", logger="gpttrain"):
        assert trainer.fit() == 0
    steps = [int(line.split()[2]) for line in (run / "samples.txt").read_text().splitlines() if line.startswith("---")]
    assert steps == want
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["sample_s"] > 0 and summary["evals"] == 1
    assert any("samples between them" in r.getMessage() for r in caplog.records)


def test_samples_more_often_than_steps_are_warned_of(data_dir, tmp_path, caplog):
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "run", "--train.max_steps", "2",
                                        "--log.sample_every_epochs", "1e-6"), single_info())
    with caplog.at_level("WARNING", logger="gpttrain"):
        assert trainer.fit() == 0
    assert [r.getMessage() for r in caplog.records if "sample_every_epochs" in r.getMessage()] == [
        f"--log.sample_every_epochs 1e-06 is less than one step (an epoch is "
        f"{trainer.train_loader.batches_per_epoch:.1f} steps): a sample at every step, each making the host wait "
        "for the device; raise it"]


def test_loop_clock_shares():
    from gpttrain.steps import LoopClock

    clock = LoopClock(start=0.0, train_at_start=10.0, steps_at_start=5)
    assert clock.cadence(20.0, 15) is None  # no evaluation after the process's first yet
    clock.evals = [{"losses": 9.0, "sample": 0.0}, {"losses": 1.0, "sample": 0.5}, {"losses": 2.0, "sample": 0.5}]
    parts, per_step = clock.cadence(20.0, 15)  # 10 s over 10 steps; the first evaluation left out
    assert parts == {"losses": 1.5, "sample": 0.5} and per_step == 1.0
    assert clock.eval_share(20.0, 15, eval_every=8) == pytest.approx(2.0 / (2.0 + 8.0))
    # 40 s of wall time: 1 s first step, 10 s of steps, 13 s of evaluations, 2 s of plots, 1 s of checkpoints.
    clock.first_step, clock.plots, clock.checkpoints = 1.0, 2.0, 1.0
    split = clock.split(40.0, 20.0, 15, eval_every=8)
    assert (split["wall_s"], split["train_s"], split["eval_s"], split["other_s"]) == (40.0, 10.0, 13.0, 13.0)
    assert split["timed_steps"] == 10 and split["evals"] == 3
    assert split["bookkeeping_share"] == pytest.approx((39.0 - 10.0) / 39.0)


def test_loss_plot_redraws_cost_about_one_percent_and_the_end_always_draws(data_dir, tmp_path, monkeypatch):
    """Evaluations every step: after the warm-up drawing, a drawing waits for 1/PLOT_COST_SHARE times the
    last one's duration, so the plot costs the loop about 1%; the run's end draws its final state."""
    # Waits of 100 s: longer than this run.
    trainer, drawn = _plotting_trainer(data_dir, tmp_path / "run", monkeypatch, steps=12, eval_every=1, share=1e-4,
                                       seconds=0.01)
    assert trainer.fit() == 0
    # The first drawing (matplotlib's import and warm-up) does not set the wait; the second does.
    assert drawn == [1, 2, 12]


def test_loss_plot_is_redrawn_at_each_eval_when_drawing_is_cheap(data_dir, tmp_path, monkeypatch):
    # Any interval is enough.
    trainer, drawn = _plotting_trainer(data_dir, tmp_path / "run", monkeypatch, steps=6, eval_every=2, share=1e9)
    assert trainer.fit() == 0
    assert drawn == [2, 4, 6]  # once each: the last evaluation's drawing is the end's


def test_a_run_that_fails_redraws_the_plot_it_had_on_the_way_out(data_dir, tmp_path, monkeypatch):
    def fail_at_step_8(trainer):
        if trainer.step == 7:
            raise RuntimeError("a data error at step 8")

    trainer, drawn = _plotting_trainer(data_dir, tmp_path / "run", monkeypatch, steps=20, eval_every=2, share=1e-4,
                                       seconds=0.01, before_step=fail_at_step_8)
    with pytest.raises(RuntimeError, match="step 8"):
        trainer.fit()
    assert drawn == [2, 4, 7]  # 6 waited (throttled); the exit drew the records up to step 7


def test_a_stopped_run_draws_its_plot_at_the_stop(data_dir, tmp_path, monkeypatch):
    import signal

    def sigterm_before_step_5(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; fit() turns it into a saved stop

    trainer, drawn = _plotting_trainer(data_dir, tmp_path / "run", monkeypatch, steps=20, eval_every=4, share=1e-4,
                                       seconds=0.01, before_step=sigterm_before_step_5)
    assert trainer.fit() == 0
    # The step already asked for learns of the signal at the next one (6), whose vote a CPU run reads at once (log
    # every step); step 6 stops: no evaluation at 8.
    assert trainer.step == 6 and drawn == [4, 6]
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["step"] == 6 and summary["checkpoint_s"] > 0


# ---- evaluation through the compiled forward ----------------------------------------------------------------


def test_evaluation_compiles_where_training_compiles_the_whole_model(data_dir, tmp_path):
    for flags, compiles in ((("--train.compile", "on"), True),
                            (("--train.compile", "on", "--train.compile_eval", "false"), False),
                            (("--train.compile", "on", "--train.compile_scope", "blocks"), False),
                            (("--train.compile", "off"), False)):
        trainer = build_trainer(tiny_config(data_dir, tmp_path / "run", *flags), single_info())
        assert trainer.eval_compiles is compiles, flags


def test_compiled_evaluation_equals_eager_with_a_short_last_batch(data_dir, tmp_path):
    from torch._dynamo.utils import counters

    # 30 batches ask for more windows than the val split has: all of them, the last batch short (a second graph).
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "run", "--train.eval_batches", "30",
                                        "--train.micro_batch_size", "7"), single_info())
    assert trainer.val_loader.eval_count(30) % 7 != 0
    eager = trainer.evaluate()
    trainer.eval_compiles = True  # the evaluation of a compiled run, with eager training (cheaper to test)
    torch._dynamo.reset()
    counters.clear()
    compiled = trainer.evaluate()
    assert isinstance(trainer._eval_model, torch._dynamo.eval_frame.OptimizedModule) and trainer.eval_compiles
    assert counters["stats"]["unique_graphs"] == 2  # full batches and the short last one
    assert trainer.evaluate() == compiled and counters["stats"]["unique_graphs"] == 2  # no recompiles
    for key in ("train_loss", "val_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
    assert trainer.model.training  # evaluation puts the model back in training mode


def test_a_failing_evaluation_compile_falls_back_to_eager_once(data_dir, tmp_path, monkeypatch, caplog):
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "run"), single_info())
    eager = trainer.evaluate()
    calls = []

    def broken_compile(model, **kwargs):
        def forward(x, y):
            calls.append(1)
            raise RuntimeError("inductor: a lowering failed\nmore detail")
        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    trainer.eval_compiles = True
    with caplog.at_level("WARNING", logger="gpttrain"):
        first = trainer.evaluate()
        second = trainer.evaluate()
    assert first == second == eager
    assert len(calls) == 1  # tried once, then eager
    warnings = [r.getMessage() for r in caplog.records if "compiled evaluation failed" in r.getMessage()]
    assert warnings == ["the compiled evaluation failed (RuntimeError: inductor: a lowering failed); "
                        "evaluating eagerly from now on (--train.compile_eval false skips the attempt)"]


def test_bench_sweep_stops_where_larger_sizes_stopped_paying_or_would_not_fit(tmp_path, monkeypatch, caplog):
    """Off CUDA no out-of-memory error ends a sweep: before, a CPU sweep ran all 9 sizes (to 256), each compiled
    and compared with the plain loop, for many minutes, or was killed by the system. It now stops after two sizes
    in a row no faster than the best, and before a size whose estimated memory exceeds what the machine has."""
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve
    from gpttrain.distributed import DistInfo
    from gpttrain.memory import GIB, estimate_training_memory

    cfg = resolve("gpt2-124m", None, parse_dotted([]))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    # A CPU run's layout: fp32, eager, the full logits (CPU computes no chunked loss).
    layout = dict(precision="fp32", compiled=False, fused_loss=False)

    def stops(*tok_per_s, info=info):
        rows = [dict(micro_batch_size=2**i, tok_per_s=t) for i, t in enumerate(tok_per_s)]
        return bench._sweep_stops(cfg.model, rows, layout, 2 ** len(rows), info)

    monkeypatch.setattr(bench, "host_memory_available", lambda: None)  # unknown: only the speed counts
    assert stops(10, 20) is None
    assert stops(10, 20, 19) is None  # one slower size may be noise
    assert stops(10, 20, 19, 25, 24) is None  # the best moved on
    assert stops(10, 20, 19, 18) == ("micro-batch 2 was the fastest (20 tokens/s) and the 2 sizes after it were no "
                                     "faster")
    assert stops(10, 20, 20, 20) is not None  # equal is no faster
    assert stops(10, 20, 19, 18, info=dataclasses.replace(info, rank=1)) is None  # the speed is rank 0's to judge
    # The memory: micro-batch 4 of gpt2-124m with its full fp32 logits (4 x 1024 x 50257) and the rest.
    need = estimate_training_memory(cfg.model, 4, **layout).total
    assert need > 4 * 1024 * 50257 * 4 * 2
    monkeypatch.setattr(bench, "host_memory_available", lambda: int(need / 0.9) + 1)
    assert stops(10, 20) is None
    monkeypatch.setattr(bench, "host_memory_available", lambda: int(need / 0.9) - 1)
    assert stops(10, 20) == (f"its training memory is estimated at {need / GIB:.1f} GiB, over 90% of the "
                             f"{(int(need / 0.9) - 1) / GIB:.1f} GiB available")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # each of this machine's ranks needs as much
    monkeypatch.setattr(bench, "host_memory_available", lambda: int(need / 0.9) + 1)
    assert stops(10, 20).startswith(f"its training memory is estimated at {2 * need / GIB:.1f} GiB "
                                    f"({need / GIB:.1f} GiB for each of this machine's 2 ranks), over 90% of")
    monkeypatch.setattr(bench, "host_memory_available", lambda: int(2 * need / 0.9) + 1)
    assert stops(10, 20) is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # A whole sweep of the tiny model that memory ends after its first size: its row, then the best, and why. The
    # estimate is of the run's own layout: on CPU the plain loss, which keeps the full logits.
    monkeypatch.setattr(bench, "host_memory_available", lambda: 1024)
    layouts = []
    real_stops = bench._sweep_stops
    monkeypatch.setattr(bench, "_sweep_stops", lambda *a: layouts.append(a[2]) or real_stops(*a))
    tiny = resolve("tiny", None, parse_dotted(["--run.dir", str(tmp_path), "--run.device", "cpu"]))
    got = []
    with caplog.at_level("WARNING", logger="gpttrain"):
        assert bench.run_bench(tiny, got.append, warmup=0, steps=1, sweep=True) == 0
    assert [r["micro_batch_size"] for r in got] == [1, 1] and got[-1]["best_micro_batch_size"] == 1
    assert len(layouts) == 1 and layouts[0]["fused_loss"] is False and layouts[0]["precision"] == "fp32"
    assert any(r.getMessage().startswith("bench --sweep stops before micro-batch 2: its training memory is "
                                         "estimated at") for r in caplog.records)


def test_host_memory_available_takes_the_least_of_the_machine_and_its_container(tmp_path):
    from gpttrain.bench import host_memory_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "cgroup"
    (cg / "memory").mkdir(parents=True)
    assert host_memory_available(str(meminfo), str(cg)) == 20000000 * 1024  # no cgroup files: the machine's
    # cgroup v1 without a limit (its "no limit" is a huge number), then with 8 GiB, 5 used, 1 of it page cache.
    (cg / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert host_memory_available(str(meminfo), str(cg)) == 20000000 * 1024
    (cg / "memory/memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
    (cg / "memory/memory.usage_in_bytes").write_text(f"{5 * 2**30}\n")
    (cg / "memory/memory.stat").write_text(f"cache 1234\ntotal_inactive_file {2**30}\n")
    assert host_memory_available(str(meminfo), str(cg)) == 4 * 2**30
    # cgroup v2 ("max": no limit; else its limit), the least of all.
    (cg / "memory.max").write_text("max\n")
    assert host_memory_available(str(meminfo), str(cg)) == 4 * 2**30
    (cg / "memory.max").write_text(f"{3 * 2**30}\n")
    (cg / "memory.current").write_text(f"{2 * 2**30}\n")
    (cg / "memory.stat").write_text("anon 5\ninactive_file 0\n")
    assert host_memory_available(str(meminfo), str(cg)) == 2**30
    assert host_memory_available(str(tmp_path / "none"), str(tmp_path / "none")) is None  # not Linux


def test_bench_sweep_ends_where_the_data_is_too_small_for_the_batch(tmp_path, monkeypatch, caplog):
    """A sweep on real data too small for the larger sizes' batches keeps the rows of the sizes that fit and still
    prints the best (before, a DataError at that size lost them all). A configured micro-batch the data is too
    small for does not stop the sweep before it starts."""
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve

    monkeypatch.setattr(bench, "SWEEP_PATIENCE", 9)  # only the data ends it
    monkeypatch.setattr(bench, "host_memory_available", lambda: None)
    data = make_data(tmp_path, "".join(f"line {i} of a short text\n" for i in range(100)))  # 2.5 kB: ~35 windows
    cfg = resolve("tiny", None, parse_dotted(["--run.dir", str(tmp_path / "run"), "--run.device", "cpu",
                                              "--data.path", str(data), "--train.micro_batch_size", "64"]))
    got = []
    with caplog.at_level("WARNING", logger="gpttrain"):
        assert bench.run_bench(cfg, got.append, warmup=0, steps=1, sweep=True) == 0
    sizes = [r["micro_batch_size"] for r in got[:-1]]
    assert sizes == [2**i for i in range(len(sizes))] and 2 <= len(sizes) < 9, sizes
    assert got[-1]["best_micro_batch_size"] in sizes and {r["source"] for r in got} == {"data"}
    said = [r.getMessage() for r in caplog.records if "bench --sweep stops" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"bench --sweep stops at micro-batch {2 * sizes[-1]}: "), said


def _sweep_rank(rank, world, port, run_dir, out, data):
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve

    as_torchrun_rank(rank, world, port)
    flags = ["--run.dir", str(run_dir), "--run.device", "cpu", "--dist.timeout_s", "60"]
    if data is None:
        # Rank 0's machine is full, rank 1's has room: rank 1 deciding alone would go on alone.
        bench.host_memory_available = (lambda: 1024) if rank == 0 else (lambda: None)
    else:
        # Rank 1 alone finds too little data for micro-batch 4: rank 0 would go on alone.
        bench.host_memory_available, bench.SWEEP_PATIENCE = (lambda: None), 9
        if rank == 1:
            real = bench._loader_or_why
            bench._loader_or_why = lambda c, *a: ((None, "too few windows here") if c.train.micro_batch_size >= 4
                                                  else real(c, *a))
        flags += ["--data.path", str(data)]
    cfg = resolve("tiny", None, parse_dotted(flags))
    rows, said = [], []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("gpttrain").addHandler(handler)
    assert bench.run_bench(cfg, rows.append, warmup=0, steps=1, sweep=True) == 0
    (out / f"rank{rank}.json").write_text(json.dumps([[r["micro_batch_size"] for r in rows], said]))
    # Done, the process group torn down. Without this, the memory variant's ranks aborted in the interpreter's own
    # teardown ("terminate called without an active exception", no Python frame) in 5 of 13 runs with a cold
    # compile cache (none of 8 warm), only where the process had imported pytest (as mp.spawn's children of this
    # module do): never in 6 torchrun runs of the command, nor in 16 spawned runs without pytest imported.
    os._exit(0)


@pytest.mark.parametrize("why", ["memory", "data"])
def test_bench_sweep_stops_on_every_rank_where_one_rank_must(tmp_path, why):
    """Each rank's reason to stop the sweep (rank 0's timings, each rank's own machine's memory, its data) is one
    verdict for every rank: ranks that chose alone could part, one building the next size's DDP while the other
    had left (a hang). Rank 0 says it, naming the rank where that is not rank 0."""
    data = make_data(tmp_path) if why == "data" else None
    mp.spawn(_sweep_rank, args=(2, free_port(), tmp_path / "run", tmp_path, data), nprocs=2, join=True)
    rows, said = json.loads((tmp_path / "rank0.json").read_text())
    if why == "memory":
        assert rows == [1, 1]  # the size's row, then the best
        assert len(said) == 1 and said[0].startswith("bench --sweep stops before micro-batch 2: its training memory")
    else:
        assert rows[:-1] == [1, 2] and rows[-1] in (1, 2)
        assert said == ["bench --sweep stops at micro-batch 4: rank 1: too few windows here"]
    assert json.loads((tmp_path / "rank1.json").read_text()) == [[], []]  # rank 0 emits the rows and says why


def test_bench_sweep_closes_the_trainer_of_a_size_that_does_not_fit(tmp_path, monkeypatch):
    """A sweep stops at the first micro-batch that runs out of memory; that size's trainer is closed too (under DDP
    its wrapper must not outlive the process group), and the rows of the sizes that fit stand."""
    from gpttrain import bench
    from gpttrain.config import parse_dotted, resolve
    from gpttrain.trainer import Trainer

    closed = []
    real_step, real_close = Trainer.train_step, Trainer.close

    def step(self, *args, **kwargs):
        if self.cfg.train.micro_batch_size >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    def close(self):
        closed.append(self.cfg.train.micro_batch_size)
        real_close(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "close", close)
    cfg = resolve("tiny", None, parse_dotted(["--run.dir", str(tmp_path), "--run.device", "cpu"]))
    rows = []
    assert bench.run_bench(cfg, rows.append, warmup=1, steps=1, sweep=True) == 0
    assert closed == [1, 2, 4]
    assert [r["micro_batch_size"] for r in rows[:-1]] == [1, 2] and rows[-1]["best_micro_batch_size"] in (1, 2)


def test_a_steps_numbers_read_as_every_rank_shares_them():
    """The packed numbers of a step (summed over ranks, then one memory slot per rank on CUDA): the mean loss and
    norm, a stop voted by any rank, and the worst rank's memory, not rank 0's."""
    from gpttrain.steps import StepStats

    stats = StepStats(torch.tensor([6.0, 1.0, 0.0, 4.0, 1.5, 3.25]), 2, False)
    assert (stats.loss, stats.grad_norm, stats.stop, stats.finite, stats.mem_peak_gib) == (3.0, 2.0, True, True, 3.25)
    assert StepStats(torch.tensor([6.0, 0.0, 1.0, 4.0]), 2, False).mem_peak_gib is None  # off CUDA: no slots
    assert not StepStats(torch.tensor([6.0, 0.0, 1.0, 4.0]), 2, False).finite  # a rank's gradients were not finite
    assert StepStats(torch.tensor([6.0, 0.0, 1.0, 4.0]), 2, True).finite  # fp16's scaler skips those itself


def test_a_second_ctrl_c_interrupts_at_once():
    """The first SIGINT asks for a save at the next step the loop reads; the second is a KeyboardInterrupt."""
    import signal

    from gpttrain.steps import StopFlag

    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
