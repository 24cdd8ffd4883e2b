"""Test helpers: a tiny prepared corpus, in-process trainers, multi-rank launches on gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from gpttrain.config import resolve

REPO = Path(__file__).resolve().parents[1]

TEXT = "".join(
    f"Line {i}: every effort moves you {'forward' if i % 3 else 'onward'}, said painter number {i % 17}.\n"
    for i in range(600)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(root: Path, text: str = TEXT, tokenizer: str = "byte") -> Path:
    from gpttrain.data.prepare import prepare

    src = root / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    out = root / "prepared"
    prepare([src], out, tokenizer=tokenizer, workers=1, progress=False)
    return out


def tiny_config(data_dir: Path, run_dir: Path, *flags: str):
    args = ["--data.path", str(data_dir), "--run.dir", str(run_dir), "--run.device", "cpu",
            "--log.progress", "lines", *flags]
    from gpttrain.config import parse_dotted

    return resolve("tiny", None, parse_dotted(args))


def build_trainer(cfg, info):
    """The same objects run_training builds, without fit()."""
    from gpttrain.data.prepare import open_tokenizer
    from gpttrain.trainer import Trainer, build_loaders, resolve_vocab

    data_dir = Path(cfg.data.path)
    tok = open_tokenizer(data_dir)
    cfg.model.vocab_size = resolve_vocab(cfg, tok.vocab_size)
    train, val = build_loaders(cfg, info, data_dir)
    return Trainer(cfg, info, train_loader=train, val_loader=val, tokenizer=tok, data_dir=data_dir)


def single_info():
    from gpttrain.distributed import DistInfo

    return DistInfo(0, 0, 1, torch.device("cpu"), None)


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300,
            module: str = "gpttrain") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(args: list[str], cwd: Path, nproc: int = 2, extra: list[str] | None = None, timeout: int = 300,
             env_extra: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                *(extra or [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gpttrain", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
