"""Per-rank bytes of parameters + gradients + AdamW state under DDP vs FSDP, measured from the tensors.

    python benchmarks/fsdp_memory.py [--preset tiny] [--world 2]

Starts `--world` gloo ranks on this machine (CPU), builds the preset under each strategy, takes one
training step on synthetic tokens, sums the local bytes of every parameter, gradient and optimizer
state tensor on each rank, and prints one JSON line per strategy plus a last line with the ratio and
what `gpttrain info` estimates for the same layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

from gpttrain.config import parse_dotted, resolve
from gpttrain.distributed import session
from gpttrain.memory import estimate_training_memory


def local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list({id(p): p for p in model.parameters()}.values())
    return {
        "weights": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                         if torch.is_tensor(v) and v.dim() > 0),
    }


def _rank(rank: int, world: int, port: int, preset: str, strategy: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpttrain.bench import SyntheticLoader
    from gpttrain.trainer import Trainer

    with session("cpu", "gloo") as info:
        cfg = resolve(preset, None, parse_dotted(["--dist.strategy", strategy, "--train.micro_batch_size", "1",
                                                  "--run.dir", tempfile.mkdtemp()]))
        trainer = Trainer(cfg, info, train_loader=SyntheticLoader(cfg, info.device))
        trainer.train_step()  # creates the AdamW state
        x, y = trainer.train_loader.next_batch()
        trainer.wrapped(x, y).backward()  # gradients as they stand before the next optimizer step
        sizes = torch.tensor(list(state_bytes(trainer.model, trainer.optimizer).values()), dtype=torch.float64)
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)  # the largest rank counts
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(zip(("weights", "grads", "optimizer"), sizes.tolist())), f)
        trainer.close()  # the wrappers must not outlive the process group


def measure(preset: str, world: int, strategy: str) -> dict[str, float]:
    from gpttrain.distributed import free_local_port

    port = free_local_port()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sizes.json")
        mp.spawn(_rank, args=(world, port, preset, strategy, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = resolve(args.preset)
    rows = {}
    for strategy in ("ddp", "fsdp"):
        sizes = measure(args.preset, args.world, strategy)
        total = sum(sizes.values())
        est = estimate_training_memory(cfg.model, 1, "fp32", strategy, args.world)
        est_total = est.weights + est.grads + est.optimizer
        rows[strategy] = total
        print(json.dumps({"preset": args.preset, "strategy": strategy, "world": args.world, **sizes,
                          "total_bytes": total, "estimate_bytes": est_total,
                          "estimate_error": est_total / total - 1}), flush=True)
    print(json.dumps({"preset": args.preset, "world": args.world, "fsdp_over_ddp": rows["fsdp"] / rows["ddp"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
