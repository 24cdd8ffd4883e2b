"""FSDP2 (`--dist.strategy fsdp`) on 2 gloo ranks: same training as DDP, half the state per rank."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gpttrain.sampling import generate_ids
from tests.helpers import (
    REPO,
    assert_same_steps,
    build_trainer,
    free_port,
    gloo_rank,
    losses_and_norms,
    make_data,
    nan_for_uninitialised_weights,
    run_cli,
    tiny_config,
    torchrun,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("fsdp-data"))


def _rank(rank, world, port, data_dir, run_dir, strategy, out):
    with gloo_rank(rank, world, port) as info:
        cfg = tiny_config(data_dir, run_dir, "--dist.strategy", strategy, "--train.micro_batch_size", "2",
                          "--train.grad_accum_steps", "2", "--optim.eps", "1e-6")
        trainer = build_trainer(cfg, info)
        assert trainer.strategy == strategy
        steps = losses_and_norms(trainer, 5)
        # The full weights after the steps (gathered on every rank: full_tensor is collective).
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
                  for n, p in trainer.model.named_parameters()}
        ev = trainer.evaluate()
        # Decoding with the KV cache, every rank along (FSDP gathers the weights in each forward).
        logits = []
        ids = generate_ids(trainer.model, [1, 2, 3, 4, 5], 6, temperature=0.0,
                           logits_hook=lambda step, start, lg: logits.append(lg[0].tolist()))
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"steps": steps, "params": params, "eval": ev, "ids": ids, "logits": logits}, f)
        trainer.close()  # the wrappers must not outlive the process group


def run_two_ranks(data_dir, tmp_path, strategy):
    out = tmp_path / f"{strategy}.json"
    mp.spawn(_rank, args=(2, free_port(), data_dir, tmp_path / strategy, strategy, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_fsdp_equals_ddp_with_accumulation(data_dir, tmp_path):
    ddp = run_two_ranks(data_dir, tmp_path, "ddp")
    fsdp = run_two_ranks(data_dir, tmp_path, "fsdp")
    assert len(fsdp["steps"]) == 5
    # The gradient norms tell a reduce-scatter that sums where it should average (Adam hides that in the weights).
    assert_same_steps(ddp["steps"], fsdp["steps"], rel=1e-5)
    assert ddp["params"].keys() == fsdp["params"].keys()
    for name, p in ddp["params"].items():
        assert p == pytest.approx(fsdp["params"][name], rel=1e-4, abs=1e-5), name
    for key in ("train_loss", "val_loss"):
        assert ddp["eval"][key] == pytest.approx(fsdp["eval"][key], rel=1e-5)
    assert len(fsdp["logits"]) == 6
    for a, b in zip(ddp["logits"], fsdp["logits"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert ddp["ids"] == fsdp["ids"]


def test_fsdp_holds_half_the_state_per_rank():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp_memory.py"), "--preset", "tiny"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    ddp, fsdp, summary = rows
    assert ddp["grads"] > 0 and fsdp["grads"] > 0
    # The tiny model's 2-rank shards are even up to padding: about half.
    assert summary["fsdp_over_ddp"] == pytest.approx(0.5, abs=0.02)
    # gpttrain info's estimate of weights + grads + AdamW state matches the tensors on CPU.
    assert abs(ddp["estimate_error"]) < 0.02 and abs(fsdp["estimate_error"]) < 0.05


def losses_by_step(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def sharded_run(data_dir, tmp_path_factory):
    """2 FSDP ranks, 8 steps, a sharded checkpoint at step 4 and at the end."""
    root = tmp_path_factory.mktemp("sharded")
    r = torchrun(["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(root / "A"),
                  "--dist.strategy", "fsdp", "--train.max_steps", "8", "--train.checkpoint_every", "4",
                  "--train.log_every", "1", "--train.keep_checkpoints", "5"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "A" / "checkpoints" / "step-000000004" / "sharded" / ".metadata").is_file()
    return root / "A"


def resume_from_step4(sharded_run, dest, nproc, *flags):
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(sharded_run / "checkpoints" / "step-000000004", dest / "checkpoints" / "step-000000004")
    args = ["train", "--preset", "tiny", "--data", str(Path(json.loads(
        (sharded_run / "config.json").read_text())["data"]["path"])), "--run-dir", str(dest), "--resume", "auto",
        "--train.max_steps", "8", "--train.log_every", "1", *flags]
    if nproc == 1:
        return run_cli(args, cwd=dest)
    return torchrun(args, cwd=dest, nproc=nproc)


def test_sharded_checkpoint_resumes_exactly_on_two_ranks(sharded_run, tmp_path):
    r = resume_from_step4(sharded_run, tmp_path / "B", 2, "--dist.strategy", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses_by_step(sharded_run), losses_by_step(tmp_path / "B")
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]


def test_sharded_checkpoint_resumes_on_one_rank(sharded_run, tmp_path):
    # One process, the same global batch (micro-batch 2 x 2 ranks = 4): DCP reshards the state into a plain
    # model. Reductions over 1 rank instead of 2 round differently, so equal to float precision, not bitwise.
    r = resume_from_step4(sharded_run, tmp_path / "C", 1, "--train.micro_batch_size", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    a, c = losses_by_step(sharded_run), losses_by_step(tmp_path / "C")
    for s in range(5, 9):
        assert c[s] == pytest.approx(a[s], rel=1e-5)


def test_an_fsdp_run_continued_on_one_process_resumes_under_torchrun_again(sharded_run, tmp_path):
    """The saved settings say fsdp; one process continues the run (no warning about a flag the user did not give)
    and records that it ran unsharded, so a later 2-rank `--resume auto` takes its full checkpoint as DDP (before,
    it was refused as FSDP: "holds one full copy of the model")."""
    run = tmp_path / "D"
    shutil.copytree(sharded_run, run)
    r = run_cli(["train", "--run-dir", str(run), "--resume", "auto", "--train.max_steps", "10", "--device", "cpu"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "nothing to distribute" not in out
    assert "resume: dist.strategy changed from 'fsdp' to 'auto'" in out
    r = torchrun(["train", "--run-dir", str(run), "--resume", "auto", "--train.max_steps", "12", "--device", "cpu"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(losses_by_step(run)) == 12


def test_generate_and_export_from_a_sharded_checkpoint(sharded_run, tmp_path):
    import gpttrain

    loaded = gpttrain.load(sharded_run)
    assert loaded.checkpoint.name == "step-000000008"
    r = run_cli(["generate", "--checkpoint", str(sharded_run), "--prompt", "Line", "--max-new-tokens", "8",
                 "--temperature", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    r = run_cli(["export", str(sharded_run), "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from gpttrain.export import load_hf

    _, sd = load_hf(out, loaded.config.model)
    for name, p in loaded.model.state_dict().items():
        assert torch.equal(sd[name], p), name
    (tmp_path / "afile").write_text("mine")
    r = run_cli(["consolidate", str(sharded_run), "--out", str(tmp_path / "afile")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --out: {tmp_path / 'afile'} exists and is not a "
                                                      "directory; choose a new folder"), r.stderr
    assert (tmp_path / "afile").read_text() == "mine"
    r = run_cli(["consolidate", str(sharded_run), "--out", str(tmp_path / "one")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    one = gpttrain.load(tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()
    for name, p in loaded.model.state_dict().items():
        assert torch.equal(one.model.state_dict()[name], p), name


def test_load_and_consolidate_fill_every_weight_from_the_shards(sharded_run, tmp_path, monkeypatch):
    import gpttrain
    from gpttrain.checkpoint import consolidate

    nan_for_uninitialised_weights(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process reading shards is what is meant: DCP's warning is not shown
        loaded = gpttrain.load(sharded_run)
    consolidate(sharded_run, tmp_path / "one")
    monkeypatch.undo()
    one = gpttrain.load(tmp_path / "one")
    reference = gpttrain.load(sharded_run)
    for name, p in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
        assert torch.equal(one.model.state_dict()[name], p), name


def test_consolidate_keeps_the_optimizer_state(sharded_run, tmp_path):
    """The consolidated optimizer.pt holds the sharded checkpoint's AdamW state (8 steps of moments), so a run
    resumed from it continues rather than restarting Adam from zero moments."""
    from gpttrain.checkpoint import consolidate, load_sharded, resolve_checkpoint, verify
    from gpttrain.config import from_dict
    from gpttrain.model import build_model
    from gpttrain.optim import build_optimizer

    one = consolidate(sharded_run, tmp_path / "one")
    saved = torch.load(one / "optimizer.pt", weights_only=True)
    src = resolve_checkpoint(sharded_run)
    cfg = from_dict(verify(src)["config"])
    model = build_model(cfg.model, "cpu")
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    load_sharded(model, optimizer, src / "sharded")
    want = optimizer.state_dict()["state"]
    assert len(saved["state"]) == len(want) == len(list(model.parameters()))
    for i, state in want.items():
        assert float(saved["state"][i]["step"]) == 8
        for key, value in state.items():
            assert torch.equal(saved["state"][i][key], value), (i, key)


def _fp16_overflow_rank(rank, world, port, data_dir, run_dir, out):
    with gloo_rank(rank, world, port) as info:
        trainer = build_trainer(tiny_config(data_dir, run_dir, "--dist.strategy", "fsdp"), info)
        # fp16-mixed's scaler (CPU runs refuse fp16 autocast, so the scaler alone, on fp32 compute).
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        weight = trainer.model.tok_emb.weight
        real_unscale = trainer.scaler.unscale_

        def unscale_(optimizer):
            if rank == 1:  # an overflow in rank 1's shard only, as fp16 gradients would have it
                weight.grad.to_local()[0, 0] = float("inf")
            real_unscale(optimizer)

        trainer.scaler.unscale_ = unscale_
        before = weight.detach().full_tensor().clone()
        res = trainer.train_step()
        after = weight.detach().full_tensor()
        torch.save({"finite": res.finite, "unchanged": torch.equal(before, after),
                    "scale": trainer.scaler.get_scale()}, Path(out) / f"rank{rank}.pt")
        trainer.close()


def test_fp16_overflow_in_one_shard_is_skipped_by_every_rank(data_dir, tmp_path):
    """With FSDP each rank checks only its shards for inf; the scaler's check on DTensor gradients reduces the
    verdict over the mesh, so every rank skips the step and halves its scale (else the ranks would diverge)."""
    mp.spawn(_fp16_overflow_rank, args=(2, free_port(), data_dir, tmp_path / "run", tmp_path), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in results:
        assert r == {"finite": True, "unchanged": True, "scale": 512.0}, results


def _init_from_rank(rank, world, port, data_dir, run_dir, hf_dir, out, flags):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with gloo_rank(rank, world, port) as info:
        cfg = tiny_config(data_dir, run_dir, "--dist.strategy", "fsdp", "--run.init_from", str(hf_dir), *flags)
        trainer = build_trainer(cfg, info)
        assert (trainer.model.out_head.weight is trainer.model.tok_emb.weight) == cfg.model.tie_embeddings
        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        loss = trainer.train_step().loss
        if rank == 0:
            torch.save({"weights": full, "loss": loss}, out)
        trainer.close()


@pytest.mark.parametrize("tie", ["false", "true"])
def test_init_from_hf_with_fsdp(data_dir, tmp_path, tie):
    """--init-from into FSDP2's sharded parameters: every weight is the exported one, then training runs."""
    from gpttrain.config import parse_dotted, resolve
    from gpttrain.data.prepare import open_tokenizer
    from gpttrain.export import export_hf, load_hf
    from gpttrain.model import GPT
    from gpttrain.run import resolve_vocab

    flags = ["--model.tie_embeddings", tie]
    run_cfg = resolve("tiny", None, parse_dotted(flags))
    cfg = run_cfg.model
    cfg.vocab_size = resolve_vocab(run_cfg, open_tokenizer(data_dir).vocab_size)  # as build_trainer does
    torch.manual_seed(7)
    export_hf(GPT(cfg), cfg, tmp_path / "hf")
    out = tmp_path / "rank0.pt"
    mp.spawn(_init_from_rank, args=(2, free_port(), data_dir, tmp_path / "run", tmp_path / "hf", str(out), flags),
             nprocs=2, join=True)
    got = torch.load(out)
    _, want = load_hf(tmp_path / "hf", cfg)
    assert set(got["weights"]) == set(want)
    for name, w in got["weights"].items():
        assert torch.equal(w, want[name]), name
    assert math.isfinite(got["loss"])
