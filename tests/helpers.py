"""Test helpers: a tiny prepared corpus, in-process trainers, multi-rank launches on gloo."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpttrain.config import resolve

REPO = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("GPTTRAIN_STRICT") == "1"  # see conftest: no skips for packages [dev] installs


def optional(module: str):
    """An optional package the `[dev]` extra installs (torchao, transformers): the module, or skip the test where
    it cannot be imported; under GPTTRAIN_STRICT=1 the import error fails it instead."""
    import importlib

    import pytest

    if STRICT:
        return importlib.import_module(module)
    return pytest.importorskip(module)

TEXT = "".join(
    f"Line {i}: every effort moves you {'forward' if i % 3 else 'onward'}, said painter number {i % 17}.\n"
    for i in range(600)
)


def free_port() -> int:
    from gpttrain.distributed import free_local_port

    return free_local_port()


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
    from gpttrain.run import build_loaders, resolve_vocab
    from gpttrain.trainer import Trainer

    data_dir = Path(cfg.data.path)
    tok = open_tokenizer(data_dir)
    cfg.model.vocab_size = resolve_vocab(cfg, tok.vocab_size)
    train, val = build_loaders(cfg, info, data_dir)
    return Trainer(cfg, info, train_loader=train, val_loader=val, tokenizer=tok)


def fit(data_dir: Path, run: Path, *flags: str):
    """A whole single-process run (the loop, its saves and its resume) in this process."""
    trainer = build_trainer(tiny_config(data_dir, run, *flags), single_info())
    assert trainer.fit() == 0
    return trainer


def copy_checkpoint(src: Path, run: Path) -> Path:
    """Checkpoint folder `src` copied into run dir `run`'s checkpoints/."""
    dst = run / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst


def take_steps(trainer, n: int) -> list:
    """n training steps as the loop takes them (its step counter advanced); their StepStats."""
    stats = []
    for _ in range(n):
        stats.append(trainer.train_step())
        trainer.step += 1
    return stats


def steps_of(trainer, n: int) -> list[float]:
    """The losses of n training steps."""
    return [s.loss for s in take_steps(trainer, n)]


def losses_and_norms(trainer, n: int) -> list[tuple[float, float]]:
    """(loss, gradient norm) of n training steps. The norm is what tells a wrong gradient scale (a missing
    average over micro-steps or ranks): clipping and Adam's per-parameter normalisation hide it in the weights."""
    return [(s.loss, s.grad_norm) for s in take_steps(trainer, n)]


def assert_same_steps(a: list[tuple[float, float]], b: list[tuple[float, float]], rel: float = 1e-6) -> None:
    assert len(a) == len(b) > 0
    for (loss_a, norm_a), (loss_b, norm_b) in zip(a, b):
        assert math.isclose(loss_a, loss_b, rel_tol=rel, abs_tol=rel), (a, b)
        assert math.isclose(norm_a, norm_b, rel_tol=rel * 10, abs_tol=rel), (a, b)


def watch_optimizer_step(trainer, look) -> None:
    """Call `look()` as each optimizer step is called: the gradients and learning rate the update uses."""
    step = trainer.optimizer.step

    def watched(*args, **kwargs):
        look()
        return step(*args, **kwargs)

    trainer.optimizer.step = watched


def first_step_grads(trainer) -> dict[str, torch.Tensor]:
    """The accumulated gradients the trainer's first optimizer step sees (copied as it is called)."""
    grads: dict[str, torch.Tensor] = {}

    def copy_first():
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    watch_optimizer_step(trainer, copy_first)
    return grads


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """This `mp.spawn`ed process as rank `rank` of `world` on one machine: torchrun's environment, one thread (the
    ranks share 2 cores). For code that opens its own session (`run_bench`); `gloo_rank` opens one around a body."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """One rank of an `mp.spawn`ed test (`as_torchrun_rank`), a gloo session around the body; yields its
    DistInfo."""
    as_torchrun_rank(rank, world, port)
    from gpttrain import distributed as distmod

    with distmod.session("cpu", "gloo") as info:
        yield info


def single_info():
    from gpttrain.distributed import DistInfo

    return DistInfo(0, 0, 1, torch.device("cpu"), None)


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300,
            module: str = "gpttrain") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cpu_memory(fn, trace_file: Path) -> tuple[int, int]:
    """CPU memory allocated by torch while `fn` runs, above what was allocated before: (peak, still held at the
    end), from the running sum of the profiler's allocation and free records in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    running = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        running += e["args"]["Bytes"]
        peak = max(peak, running)
    return peak, running


def refused_train(tmp_path: Path, *flags: str) -> str:
    """`gpttrain train` of the tiny preset with `flags`, expected to be refused: asserts exit 2 and no run dir,
    returns the message's (last) line."""
    run = tmp_path / "run"
    r = run_cli(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir", str(run),
                 "--device", "cpu", *flags], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not run.exists()
    return r.stderr.strip().splitlines()[-1]


def torchrun(args: list[str], cwd: Path, nproc: int = 2, extra: list[str] | None = None, timeout: int = 300,
             env_extra: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                *(extra or [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gpttrain", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- launched jobs: background torchrun, its workers, their outputs --------------------------------


def torchrun_popen(args: list[str], cwd: Path, log_path: Path, nproc: int = 2, extra: list[str] | None = None,
                   env_extra: dict | None = None) -> subprocess.Popen:
    """A torchrun job in the background, stdout and stderr into `log_path` (no pipe to fill up)."""
    launcher = ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                *(extra or [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gpttrain", *args],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def torchrun_nodes(args: list[str], cwds: list[Path], timeout: int = 120) -> list[subprocess.CompletedProcess]:
    """A job of one rank per "node", each node a torchrun agent of its own in its own directory (as on machines
    that do not share one), all on this machine; one CompletedProcess per node, stdout and stderr together."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with contextlib.ExitStack() as stack:
        # Output to files, not pipes: a node blocked on a full pipe would stall the other in a collective.
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in cwds]
        jobs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(cwds)),
                                  "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                                  "--master_port", str(port), "-m", "gpttrain", *args],
                                 cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
                for i, (cwd, out) in enumerate(zip(cwds, logs))]
        try:
            codes = [job.wait(timeout) for job in jobs]
        finally:
            for job in jobs:
                if job.poll() is None:
                    job.kill()
        said = []
        for out in logs:
            out.seek(0)
            said.append(out.read())
        return [subprocess.CompletedProcess(job.args, rc, out, "") for job, rc, out in zip(jobs, codes, said)]


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc (Linux)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of a torchrun agent's live workers, read from their environment."""
    ranks = {}
    for pid in child_pids(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            out.append(json.loads(line))
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02, proc: subprocess.Popen | None = None):
    """Poll until predicate() is truthy (returns its value); fail after `timeout` s or if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_job(job: subprocess.Popen) -> None:
    """Kill a background torchrun job that is still running: its workers first, so none is orphaned."""
    if job.poll() is not None:
        return
    for pid in worker_pids(job.pid).values():
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    job.kill()
    job.wait(timeout=60)


# Tokenizer test material: mixed scripts, emoji, control characters; a small corpus to train a bpe on.
UNICODE = "Hello world! Grüße, 你好, Здравствуйте, 🤖🚀 tabs\tand\nnewlines  — ⟨math⟩ ∑x² \x00\x7f é"
CORPUS = ["def f(x):\n    return x * 2\n", "The quick brown fox jumps over the lazy dog. " * 20,
          "Every effort moves you forward, said the painter.\n" * 10]


TOKENIZER_KINDS = ("byte", "gpt2", "bpe")


def make_tokenizer(kind: str, shared_data):
    """A tokenizer of `kind`: byte, gpt2 (from ../shared/data's ranks file, through the `shared_data` fixture:
    only this kind needs it) or bpe (trained on CORPUS)."""
    from gpttrain.tokenizer import BPETokenizer, ByteTokenizer, GPT2Tokenizer

    if kind == "gpt2":
        return GPT2Tokenizer(shared_data("gpt2.tiktoken"))
    return ByteTokenizer() if kind == "byte" else BPETokenizer.train(CORPUS, 300)


def nan_for_uninitialised_weights(monkeypatch) -> None:
    """build_model(init=False) fills every weight with NaN, so a weight a loader forgets shows up (an empty
    tensor often holds zeros or old values that pass for weights)."""
    import gpttrain.model

    real = gpttrain.model.build_model

    def build(cfg, device="cpu", *, init=True):
        model = real(cfg, device, init=init)
        if not init:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return model

    monkeypatch.setattr(gpttrain.model, "build_model", build)
