"""FSDP2 (`--dist.strategy fsdp`) on 2 gloo ranks: same training as DDP, half the state per rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import REPO, build_trainer, free_port, make_data, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("fsdp-data"))


def _rank(rank, world, port, data_dir, run_dir, strategy, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpttrain import distributed as distmod

    with distmod.session("cpu", "gloo") as info:
        cfg = tiny_config(data_dir, run_dir, "--dist.strategy", strategy, "--train.micro_batch_size", "2",
                          "--train.grad_accum_steps", "2", "--optim.eps", "1e-6")
        trainer = build_trainer(cfg, info)
        assert trainer.strategy == strategy
        losses = []
        for _ in range(5):
            losses.append(trainer.train_step().loss)
            trainer.step += 1
        ev = trainer.evaluate()
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"losses": losses, "eval": ev}, f)


def run_two_ranks(data_dir, tmp_path, strategy):
    out = tmp_path / f"{strategy}.json"
    mp.spawn(_rank, args=(2, free_port(), data_dir, tmp_path / strategy, strategy, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_fsdp_equals_ddp_with_accumulation(data_dir, tmp_path):
    ddp = run_two_ranks(data_dir, tmp_path, "ddp")
    fsdp = run_two_ranks(data_dir, tmp_path, "fsdp")
    assert len(fsdp["losses"]) == 5
    for a, b in zip(ddp["losses"], fsdp["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    for key in ("train_loss", "val_loss"):
        assert ddp["eval"][key] == pytest.approx(fsdp["eval"][key], rel=1e-5)


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
