"""Checkpoints and resume: exact continuation, atomic saves, signals, restarts, damage, non-finite guards.

Single-process runs go through Trainer.fit() in this process (fast); multi-rank runs go through torchrun
on gloo, or torch.multiprocessing where a test needs to reach inside a rank.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gpttrain import checkpoint as ckpt
from gpttrain.checkpoint import CheckpointError
from gpttrain.errors import ConfigError, GpttrainError
from gpttrain.resume import maybe_resume
from tests.helpers import (
    REPO,
    build_trainer,
    copy_checkpoint,
    fit,
    free_port,
    gloo_rank,
    make_data,
    read_metrics,
    run_cli,
    single_info,
    stop_job,
    take_steps,
    tiny_config,
    torchrun,
    torchrun_popen,
    wait_for,
    worker_pids,
)

STEP = "step-{:09d}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def gt_log(caplog):
    """Records of the `gpttrain` logger (which does not propagate once the CLI has set it up)."""
    logger = logging.getLogger("gpttrain")
    old_level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


# ---- helpers --------------------------------------------------------------------------------------


def train_args(data_dir: Path, run: Path, *flags: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run), "--device", "cpu",
            "--log.progress", "lines", *flags]


def losses(run: Path) -> dict[int, float]:
    """Train loss per step; a step recorded twice (a restart replays it) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def newest(run: Path) -> Path:
    found = ckpt.list_checkpoints(run)
    assert found, f"no complete checkpoint in {run}"
    return found[-1]


def assert_same_state(a: Path, b: Path) -> None:
    """Model weights and optimizer states of two checkpoints are bit-identical."""
    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), f"{name} differs between {a} and {b}"
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), f"optimizer state {i}.{key} differs"


def rehash(folder: Path) -> None:
    """Rewrite COMPLETE for the files as they are now (what a deliberate forger would do)."""
    import hashlib

    files = {}
    for p in sorted(folder.iterdir()):
        if p.name != ckpt.COMPLETE:
            files[p.name] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (folder / ckpt.COMPLETE).write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "files": files}))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---- bit-exact resume ----------------------------------------------------------------------------------

DROPOUT = ("--model.drop_rate", "0.1")  # resume must restore every rank's RNG to be exact


@pytest.mark.parametrize("precision", [(), ("--train.precision", "bf16-mixed", "--train.residual_dtype", "compute")],
                         ids=["fp32", "bf16-mixed-16bit-stream"])
def test_resume_is_bit_exact_one_rank(data_dir, tmp_path, precision):
    k = 3
    flags = (*DROPOUT, *precision, "--train.max_steps", str(2 * k), "--train.log_every", "1")
    a = tmp_path / "a"
    fit(data_dir, a, *flags, "--train.checkpoint_every", str(k))
    b = tmp_path / "b"
    copy_checkpoint(a / "checkpoints" / STEP.format(k), b)
    fit(data_dir, b, *flags, "--run.resume", "auto")

    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(k + 1, 2 * k + 1))
    assert [lb[s] for s in lb] == [la[s] for s in lb]  # exact, not approximate
    assert newest(a).name == newest(b).name == STEP.format(2 * k)
    assert_same_state(newest(a), newest(b))
    resume = [r for r in read_metrics(b) if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == k


def test_resume_takes_this_runs_optimizer_settings(data_dir, tmp_path, caplog):
    """The optimizer's settings are training settings: a resume may change them (and says so), and then they take
    effect. Loading the saved param groups replaced them, so a run of --optim.fused off resumed with the default
    (fused) crashed on its first step, handing the non-fused AdamW fused arguments."""
    run = tmp_path / "run"
    a = build_trainer(tiny_config(data_dir, run, "--optim.fused", "off", "--optim.weight_decay", "0.1"), single_info())
    take_steps(a, 2)
    ckpt.save(a)
    b = build_trainer(tiny_config(data_dir, run, "--run.resume", "auto", "--optim.weight_decay", "0.02",
                                  "--optim.beta2", "0.5", "--optim.eps", "1e-6"), single_info())
    with caplog.at_level(logging.INFO, logger="gpttrain"):
        maybe_resume(b)
    assert "resume: optim.weight_decay changed from 0.1 to 0.02" in caplog.text
    groups = b.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]  # the no-decay group (norms, biases) stays at 0
    assert all(g["betas"] == (0.9, 0.5) and g["eps"] == 1e-6 and g["fused"] for g in groups)
    for p_a, p_b in zip(a.optimizer.param_groups[0]["params"], groups[0]["params"], strict=True):
        assert torch.equal(a.optimizer.state[p_a]["exp_avg"], b.optimizer.state[p_b]["exp_avg"])  # the moments kept
    take_steps(b, 1)
    assert b.step == 3


def test_a_fresh_run_over_a_dead_runs_metrics_plots_its_own_history(data_dir, tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl, its last line cut short; a run started in that
    run dir (nothing to resume) appends a `start` record on a line of its own, and plots only what follows it."""
    from gpttrain.plot import read_metrics as plotted

    run = tmp_path / "run"
    run.mkdir()
    dead = "".join(json.dumps({"kind": "train", "step": s, "epoch": s / 10, "tokens": 100 * s, "loss": 99.0}) + "\n"
                   for s in range(1, 9)) + '{"kind": "train", "step": 9, "lo'
    (run / "metrics.jsonl").write_text(dead)
    fit(data_dir, run, "--train.max_steps", "3", "--train.log_every", "1")
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(dead + "\n" + '{"kind": "start", "step": 0,')  # kept; the new run's lines are whole
    m = plotted(run / "metrics.jsonl")
    assert [r["step"] for r in m["train"]] == [1, 2, 3] and all(r["loss"] < 99 for r in m["train"])
    assert [r["step"] for r in m["start"]] == [0] and "resume" not in m


@pytest.fixture(scope="module")
def two_rank_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-rank run with dropout: 30 steps, a checkpoint every 5 (all kept)."""
    run = tmp_path_factory.mktemp("two_rank") / "run"
    r = torchrun(train_args(data_dir, run, *TWO_RANK_FLAGS), cwd=run.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


TWO_RANK_FLAGS = (*DROPOUT, "--train.max_steps", "30", "--train.checkpoint_every", "5", "--train.keep_checkpoints",
                  "10", "--train.eval_every", "1000", "--train.log_every", "1", "--resume", "auto")


@pytest.mark.slow
def test_resume_is_bit_exact_two_ranks(data_dir, two_rank_run, tmp_path):
    k = 15
    b = tmp_path / "b"
    copy_checkpoint(two_rank_run / "checkpoints" / STEP.format(k), b)
    r = torchrun(train_args(data_dir, b, *TWO_RANK_FLAGS), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {b / 'checkpoints' / STEP.format(k)}" in r.stdout
    la, lb = losses(two_rank_run), losses(b)
    assert sorted(lb) == list(range(k + 1, 31))
    assert [lb[s] for s in lb] == [la[s] for s in lb]
    assert_same_state(newest(two_rank_run), newest(b))


# ---- a save killed halfway -----------------------------------------------------------------------------


def _save_then_hang(data_dir: str, run_dir: str, marker: str, where: str) -> None:
    """Child process: save step 1 fully, then start saving step 2 and block halfway through a file."""
    torch.set_num_threads(1)
    trainer = build_trainer(tiny_config(Path(data_dir), Path(run_dir)), single_info())

    def hang_after_half(data: bytes, target) -> None:
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        Path(marker).write_text(str(target))
        time.sleep(600)  # the parent kills us here

    trainer.train_step()
    trainer.step = 1
    ckpt.save(trainer)
    trainer.train_step()
    trainer.step = 2
    if where == "optimizer":
        real_save = torch.save

        def save_half(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            hang_after_half(buf.getvalue(), f)

        torch.save = save_half
    else:
        real_write = ckpt._write_json

        def write_half(path, obj):
            if Path(path).name != ckpt.COMPLETE:
                return real_write(path, obj)
            hang_after_half(json.dumps(obj).encode(), path)

        ckpt._write_json = write_half
    ckpt.save(trainer)


@pytest.mark.parametrize("where", ["optimizer", "complete"])
def test_save_killed_midway_keeps_previous_checkpoint(data_dir, tmp_path, where):
    run, marker = tmp_path / "run", tmp_path / "mid-write"
    code = "import sys; from tests.test_checkpoint import _save_then_hang; _save_then_hang(*sys.argv[1:])"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, str(data_dir), str(run), str(marker), where], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, 120, "the child to be halfway through writing step 2", proc=proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err

    root = run / "checkpoints"
    first = root / STEP.format(1)
    assert ckpt.list_checkpoints(run) == [first]
    assert not (root / STEP.format(2)).exists()  # nothing under a final name
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == [f".tmp-{STEP.format(2)}"]
    assert ckpt.verify(first)["trainer"]["step"] == 1

    fit(data_dir, run, "--run.resume", "auto", "--train.max_steps", "3")
    assert [r for r in read_metrics(run) if r["kind"] == "resume"][0]["step"] == 1
    assert sorted(losses(run)) == [2, 3]
    assert sorted(p.name for p in root.iterdir()) == [STEP.format(1), STEP.format(3)]  # the .tmp- is pruned


# ---- SIGTERM to one rank -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resumes_exactly(data_dir, tmp_path):
    flags = (*DROPOUT, "--optim.schedule", "constant", "--train.eval_every", "100000", "--train.log_every", "1")
    run = tmp_path / "run"
    job = torchrun_popen(train_args(data_dir, run, *flags, "--train.max_steps", "100000"), tmp_path,
                         tmp_path / "job.log")
    try:
        wait_for(lambda: len(losses(run)) >= 3, 120, "3 training steps", proc=job)
        workers = wait_for(lambda: (w := worker_pids(job.pid)) and len(w) == 2 and w, 30, "2 workers", proc=job)
        os.kill(workers[1], signal.SIGTERM)  # rank 1 only; rank 0 learns it through the per-step all-reduce
        rc = job.wait(timeout=120)
    finally:
        stop_job(job)
    out = (tmp_path / "job.log").read_text()
    assert rc == 0, out[-4000:]
    stop_step = max(losses(run))
    saved = newest(run)
    assert ckpt.list_checkpoints(run) == [saved]
    assert saved.name == STEP.format(stop_step)
    # Both ranks wrote their RNG into the same step's folder: they stopped at the same step.
    assert (saved / "rng-rank00000.json").is_file() and (saved / "rng-rank00001.json").is_file()
    state = ckpt.verify(saved)
    assert state["reason"] == "signal" and state["trainer"]["step"] == stop_step
    assert f"stop signal received by another rank: saving a checkpoint at step {stop_step}" in out

    end = stop_step + 3
    r = torchrun(train_args(data_dir, run, *flags, "--train.max_steps", str(end), "--resume", "auto"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fresh = tmp_path / "fresh"
    r = torchrun(train_args(data_dir, fresh, *flags, "--train.max_steps", str(end)), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_state(newest(run), newest(fresh))
    lr, lf = losses(run), losses(fresh)
    assert [lr[s] for s in range(stop_step + 1, end + 1)] == [lf[s] for s in range(stop_step + 1, end + 1)]
    # metrics.jsonl continues: the first run's steps, a resume record, then the new steps.
    kinds = [(rec["kind"], rec["step"]) for rec in read_metrics(run) if rec["kind"] in ("train", "resume")]
    assert kinds == ([("train", s) for s in range(1, stop_step + 1)] + [("resume", stop_step)]
                     + [("train", s) for s in range(stop_step + 1, end + 1)])


# ---- torchrun --max-restarts ---------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_restart_after_a_rank_is_killed(data_dir, two_rank_run, tmp_path):
    run = tmp_path / "run"
    # torch 2.13: restarted workers that share the rendezvous' TCP store read the first attempt's keys and
    # connect to the dead worker's address (pytorch/pytorch#135712): with the default static rendezvous they
    # always hang in init_process_group, with c10d they mostly fail. A c10d rendezvous with that sharing
    # off gives every attempt a fresh store.
    rdzv = ["--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    job = torchrun_popen(train_args(data_dir, run, *TWO_RANK_FLAGS), tmp_path, tmp_path / "job.log", extra=rdzv,
                         env_extra={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        first = run / "checkpoints" / STEP.format(5) / ckpt.COMPLETE
        wait_for(first.is_file, 120, "the first periodic checkpoint", interval=0.005, proc=job)
        workers = worker_pids(job.pid)
        assert 1 in workers, "rank 1 is gone before it could be killed"
        os.kill(workers[1], signal.SIGKILL)
        rc = job.wait(timeout=180)
    finally:
        stop_job(job)
    out = (tmp_path / "job.log").read_text()
    assert rc == 0, out[-4000:]
    resumes = [rec for rec in read_metrics(run) if rec["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 5, out[-4000:]  # the restart went on from a checkpoint
    assert max(losses(run)) == 30
    assert_same_state(newest(run), newest(two_rank_run))


# ---- saved with 2 ranks, continued with 1 ---------------------------------------------------------------


@pytest.mark.slow
def test_resume_two_ranks_then_one(data_dir, tmp_path, gt_log):
    flags = ("--train.max_steps", "8", "--train.log_every", "1", "--train.eval_every", "1000", "--optim.eps", "1e-6")
    a = tmp_path / "a"
    r = torchrun(train_args(data_dir, a, *flags, "--train.checkpoint_every", "4"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    middle = a / "checkpoints" / STEP.format(4)
    b = tmp_path / "b"
    copy_checkpoint(middle, b)
    one = fit(data_dir, b, *flags, "--train.micro_batch_size", "8", "--run.resume", "auto")  # same global batch

    assert "saved with 2 ranks, now 1" in gt_log.text
    saved_cursor = ckpt.verify(middle)["loader"]
    assert saved_cursor["index"] == 4 * 8  # global samples: 4 steps of 2 ranks x 4
    end_a, end_b = ckpt.verify(newest(a)), ckpt.verify(newest(b))
    assert newest(b).name == STEP.format(8)
    assert (end_b["loader"]["epoch"], end_b["loader"]["index"]) == (end_a["loader"]["epoch"], end_a["loader"]["index"])
    assert end_b["trainer"]["tokens"] == end_a["trainer"]["tokens"] == one.tokens
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [5, 6, 7, 8]
    for s in lb:
        assert lb[s] == pytest.approx(la[s], rel=1e-5, abs=1e-6)
    ma, mb = load_file(str(newest(a) / "model.safetensors")), load_file(str(newest(b) / "model.safetensors"))
    for name in ma:
        torch.testing.assert_close(mb[name], ma[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- refusals: mismatch, damage, missing -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(data_dir, tmp_path_factory):
    """A finished single-process run with complete checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("saved") / "run"
    fit(data_dir, run, "--train.max_steps", "4", "--train.checkpoint_every", "2")
    assert [p.name for p in ckpt.list_checkpoints(run)] == [STEP.format(2), STEP.format(4)]
    return run


@pytest.fixture
def run_copy(saved_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved_run, dst)
    return dst


def resumer(data_dir: Path, run: Path, resume: str, *flags: str):
    return build_trainer(tiny_config(data_dir, run, "--run.resume", resume, *flags), single_info())


def test_config_mismatch_lists_every_key(data_dir, run_copy, tmp_path):
    r = run_cli(train_args(data_dir, run_copy, "--resume", "auto", "--model.n_layers", "3", "--model.n_heads", "2",
                           "--model.tie_embeddings", "true"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: cannot resume: checkpoint {run_copy / 'checkpoints' / STEP.format(4)} "
                               "does not fit this run")
    assert "model.n_layers: checkpoint 2 vs requested 3" in r.stderr
    assert "model.n_heads: checkpoint 4 vs requested 2" in r.stderr
    assert "model.tie_embeddings: checkpoint False vs requested True" in r.stderr
    assert "Traceback" not in r.stderr
    # The refused run wrote nothing: the first run's config.json still describes that run.
    assert json.loads((run_copy / "config.json").read_text())["model"]["n_layers"] == 2


def test_data_tokenized_otherwise_is_named_as_the_cause(run_copy, tmp_path):
    """The checkpoint's settings given, but its data prepared again with another tokenizer: the refusal says that
    the data is the cause, not only to use the checkpoint's settings."""
    (tmp_path / "bpe").mkdir()
    other = make_data(tmp_path / "bpe", tokenizer="bpe")
    r = run_cli(train_args(other, run_copy, "--resume", "auto"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "tokenizer.kind: checkpoint 'byte' vs data 'bpe'" in r.stderr
    assert r.stderr.rstrip().endswith(
        f"start a new run with another --run-dir; the data ({other}) is tokenized otherwise than the checkpoint's "
        "was (was it prepared again?): give the data it trained on, or prepare this text with its tokenizer "
        "(gpttrain prepare ... --tokenizer byte)")
    # The other way round: a bpe checkpoint's tokenizer is its file (a bpe trained again would differ).
    assert run_cli(train_args(other, tmp_path / "bpe-run", "--train.max_steps", "1"), cwd=tmp_path).returncode == 0
    (tmp_path / "byte").mkdir()
    r = run_cli(train_args(make_data(tmp_path / "byte"), tmp_path / "bpe-run", "--resume", "auto"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    saved = tmp_path / "bpe-run" / "checkpoints" / STEP.format(1)
    assert r.stderr.rstrip().endswith(f"(gpttrain prepare ... --tokenizer bpe --tokenizer-file {saved}/tokenizer.json)")


def test_changed_training_settings_are_allowed_and_logged(data_dir, run_copy, gt_log):
    trainer = resumer(data_dir, run_copy, "auto", "--optim.lr", "5e-4", "--train.max_steps", "6")
    assert maybe_resume(trainer) == run_copy / "checkpoints" / STEP.format(4)
    assert trainer.step == 4
    assert "resume: optim.lr changed from 0.001 to 0.0005" in gt_log.text
    assert "resume: train.max_steps changed from 4 to 6" in gt_log.text


DAMAGES = {  # damage -> (file to damage, what the message names, relative to the checkpoint; its words)
    "truncated": ("optimizer.pt", "optimizer.pt", r"optimizer\.pt is truncated or altered: \d+ bytes, \d+ expected"),
    "flipped": ("model.safetensors", "model.safetensors", r"model\.safetensors is corrupt: its SHA-256 differs"),
    "no_complete": ("COMPLETE", "", r"is incomplete \(no COMPLETE marker: the save was interrupted\)"),
    "missing": (None, "", r"does not exist"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_or_missing_checkpoint_fails_with_one_message(data_dir, run_copy, tmp_path, damage):
    import re

    target = run_copy / "checkpoints" / STEP.format(4)
    damaged, named, pattern = DAMAGES[damage]
    if damage == "truncated":
        truncate(target / damaged)
    elif damage == "flipped":
        flip_byte(target / damaged)
    elif damage == "no_complete":
        (target / damaged).unlink()
    else:
        target = run_copy / "checkpoints" / "step-000000099"
    before = (run_copy / "metrics.jsonl").read_text()
    r = run_cli(train_args(data_dir, run_copy, "--resume", str(target), "--train.max_steps", "6"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    lines = r.stderr.strip().splitlines()
    # Said before any data: a missing or incomplete folder (no need to read it) names --resume.
    early = damage in ("no_complete", "missing")
    assert len(lines) == 1 and lines[0].startswith("error: --resume: checkpoint" if early else "error: checkpoint"), \
        r.stderr
    assert f" {target / named if named else target} " in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert (run_copy / "metrics.jsonl").read_text() == before  # nothing ran


def test_auto_falls_back_to_previous_complete_checkpoint(data_dir, run_copy, gt_log):
    flip_byte(run_copy / "checkpoints" / STEP.format(4) / "optimizer.pt")
    trainer = resumer(data_dir, run_copy, "auto")
    assert maybe_resume(trainer) == run_copy / "checkpoints" / STEP.format(2)
    assert trainer.step == 2 and trainer.train_loader.index == 2 * 4
    warnings = [r.getMessage() for r in gt_log.records if r.levelno == logging.WARNING]
    assert any(STEP.format(4) in w and "optimizer.pt is corrupt" in w for w in warnings), warnings
    assert any("falling back to " + STEP.format(2) in w for w in warnings), warnings


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.json"])
def test_auto_past_a_damaged_checkpoint_saves_over_it(data_dir, run_copy, tmp_path, damaged):
    """`train --resume auto` (the saved settings, no preset) past a damaged step-4: the settings come from the
    checkpoint it resumes (a damaged state.json is not read for them), steps 3-4 are trained again, and step-4's
    folder is replaced by their save, not taken for it (before, those steps were lost and step-4 stayed damaged)."""
    truncate(run_copy / "checkpoints" / STEP.format(4) / damaged)
    r = run_cli(["train", "--run-dir", str(run_copy), "--resume", "auto", "--device", "cpu", "--log.progress",
                 "lines", "--data", str(data_dir)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    settings_from = STEP.format(2) if damaged == "state.json" else STEP.format(4)
    assert f"the settings saved in {run_copy / 'checkpoints' / settings_from / 'state.json'}" in out, out[:2000]
    assert "falling back to " + STEP.format(2) in out
    assert f"replacing {run_copy / 'checkpoints' / STEP.format(4)}, which this run did not save" in out
    state = ckpt.verify(run_copy / "checkpoints" / STEP.format(4))
    assert state["trainer"]["step"] == 4
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == [STEP.format(2), STEP.format(4)]
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))  # the replaced folder, set aside, is gone


def test_resume_with_a_damaged_state_json_is_refused_before_any_data(run_copy, tmp_path):
    """--resume PATH without a preset: the settings' file is checked against the manifest first."""
    target = run_copy / "checkpoints" / STEP.format(4)
    flip_byte(target / "state.json")
    r = run_cli(["train", "--run-dir", str(tmp_path / "new"), "--resume", str(target), "--device", "cpu"],
                cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --resume: checkpoint file {target / 'state.json'} is corrupt: its SHA-256 "
                                "differs from the one saved"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no data prepared, no run dir


def test_a_manifest_that_leaves_out_a_required_file_is_refused(run_copy):
    """COMPLETE must cover the weights, the optimizer and state.json: one without an entry for a file (hand-edited,
    or written by a broken save) fails verify even though every file it lists checks out. Inference, which reads
    no optimizer state, may skip that one."""
    target = run_copy / "checkpoints" / STEP.format(4)
    complete = target / ckpt.COMPLETE
    manifest = json.loads(complete.read_text())
    for name in ckpt.REQUIRED_FILES:
        partial = dict(manifest, files={k: v for k, v in manifest["files"].items() if k != name})
        complete.write_text(json.dumps(partial))
        with pytest.raises(CheckpointError, match=rf"{ckpt.COMPLETE} does not cover {name}: the checkpoint is corrupt"):
            ckpt.verify(target)
    complete.write_text(json.dumps(dict(manifest, files={k: v for k, v in manifest["files"].items()
                                                         if k != "optimizer.pt"})))
    assert ckpt.verify(target, skip=("optimizer.pt",))["trainer"]["step"] == 4


def test_prune_leaves_the_damaged_folders_ahead_of_the_run_alone(tmp_path):
    """After --resume auto fell back past damaged step-4 and step-5, a save at step 3 with keep 1 keeps itself: the
    folders past it are neither counted (they pruned the new save before) nor deleted (the run replaces them as
    it reaches their steps)."""
    for step in (2, 3, 4, 5):
        folder = tmp_path / "checkpoints" / STEP.format(step)
        folder.mkdir(parents=True)
        (folder / ckpt.COMPLETE).write_text("{}")
    ckpt.prune(tmp_path, keep=1, upto=tmp_path / "checkpoints" / STEP.format(3))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [STEP.format(s) for s in (3, 4, 5)]
    ckpt.prune(tmp_path, keep=1)  # without `upto`: the newest only
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [STEP.format(5)]


def test_only_folders_a_save_names_are_the_runs_checkpoints(tmp_path):
    """A user's copies in checkpoints/ (step-best, step-000000002-keep) are neither resumed from (step-best sorted
    after every step name: --resume auto went back to it) nor pruned; steps order by number; a run dir whose name
    starts with step- is still a run dir."""
    run = tmp_path / "step-lr-sweep"
    for name in (STEP.format(2), "step-1000000000", STEP.format(999999999), "step-best", STEP.format(2) + "-keep",
                 "step-００００００００１"):  # (full-width digits: not a save's name either)
        folder = run / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / ckpt.COMPLETE).write_text("{}")
    # by step, not by name (where step-1000000000 sorts before step-999999999)
    assert [p.name for p in ckpt.list_checkpoints(run)] == [STEP.format(2), STEP.format(999999999), "step-1000000000"]
    assert ckpt.resolve_checkpoint(run).name == "step-1000000000"
    assert ckpt.resolve_checkpoint(run / "checkpoints" / "step-best").name == "step-best"  # asked for by path
    others = ["step-000000002-keep", "step-best", "step-００００００００１"]
    ckpt.prune(run, keep=2, upto=run / "checkpoints" / STEP.format(999999999))  # step-1000000000 lies past it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted(others + [STEP.format(2), STEP.format(999999999), "step-1000000000"])
    ckpt.prune(run, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(others + ["step-1000000000"])
    incomplete = tmp_path / "other" / STEP.format(7)
    incomplete.mkdir(parents=True)
    assert ckpt.resolve_checkpoint(incomplete) == incomplete  # (refused as incomplete where it is read)
    with pytest.raises(CheckpointError, match="is neither a checkpoint folder"):
        ckpt.resolve_checkpoint(tmp_path / "other")


def test_the_start_line_predicts_where_a_resumed_run_ends(data_dir, run_copy):
    """Resumed with a bigger global batch (as another world size gives): the epochs the start line announces are
    where the last step leaves the data (before, all steps were counted at the new batch)."""
    trainer = resumer(data_dir, run_copy, "auto", "--train.micro_batch_size", "8", "--train.max_steps", "6",
                      "--log.sample_every", "0", "--train.eval_every", "100")
    announced = []
    log_start = trainer._log_start

    def log_start_noting_the_epochs():
        announced.append(trainer._epochs_at_end())
        log_start()

    trainer._log_start = log_start_noting_the_epochs
    assert trainer.fit() == 0
    # To within the partial last batch an epoch drops (the steps to go are counted in whole batches per epoch).
    assert trainer.step == 6 and trainer.epoch_progress() == pytest.approx(announced[0], rel=0.01)
    all_at_this_batch = 6 * trainer.cfg.train.grad_accum_steps / trainer.train_loader.batches_per_epoch
    assert announced[0] != pytest.approx(all_at_this_batch)  # what the start line said before


def test_auto_ignores_a_newer_folder_without_complete(data_dir, run_copy, gt_log):
    (run_copy / "checkpoints" / STEP.format(4) / ckpt.COMPLETE).unlink()
    trainer = resumer(data_dir, run_copy, "auto")
    assert maybe_resume(trainer) == run_copy / "checkpoints" / STEP.format(2)
    assert f"ignoring {run_copy / 'checkpoints' / STEP.format(4)}: no COMPLETE marker" in gt_log.text


def test_auto_refuses_when_every_checkpoint_is_damaged(data_dir, run_copy):
    truncate(run_copy / "checkpoints" / STEP.format(2) / "model.safetensors")
    flip_byte(run_copy / "checkpoints" / STEP.format(4) / "state.json")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged; not starting from scratch") as e:
        maybe_resume(resumer(data_dir, run_copy, "auto"))
    assert STEP.format(2) in str(e.value) and STEP.format(4) in str(e.value)


def test_auto_refuses_when_no_folder_is_complete(data_dir, run_copy):
    for step in (2, 4):
        (run_copy / "checkpoints" / STEP.format(step) / ckpt.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="none is complete .*not starting from scratch"):
        maybe_resume(resumer(data_dir, run_copy, "auto"))


def test_auto_starts_fresh_when_there_is_no_checkpoint(data_dir, tmp_path, gt_log):
    trainer = resumer(data_dir, tmp_path / "new", "auto")
    assert maybe_resume(trainer) is None and trainer.step == 0
    assert "no complete checkpoint" in gt_log.text and "starting fresh" in gt_log.text


def test_new_run_into_a_run_dir_with_checkpoints_is_refused(data_dir, run_copy, tmp_path):
    (run_copy / "config.json").write_text('{"the": "first run"}\n')
    r = run_cli(train_args(data_dir, run_copy, "--train.max_steps", "2"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --run-dir {run_copy} already holds checkpoints (newest: {STEP.format(4)}); "
                                "pass --resume auto to continue that run, or choose another --run-dir")
    assert (run_copy / "config.json").read_text() == '{"the": "first run"}\n'  # the first run's config is kept
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        maybe_resume(build_trainer(tiny_config(data_dir, run_copy), single_info()))


# ---- a crafted checkpoint ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the loader runs code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_optimizer_file_cannot_run_code(data_dir, run_copy, tmp_path):
    target = run_copy / "checkpoints" / STEP.format(4)
    real = torch.load(target / "optimizer.pt", weights_only=True)
    marker = tmp_path / "pwned"
    real["state"][0]["exp_avg"] = _Payload(str(marker))
    torch.save(real, target / "optimizer.pt")
    rehash(target)  # the hashes match: verification alone would not stop it
    ckpt.verify(target)

    # The payload is live: an unsafe load would run it.
    probe = tmp_path / "probe"
    torch.save({"x": _Payload(str(probe))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)["x"].close()
    assert probe.exists()

    r = run_cli(train_args(data_dir, run_copy, "--resume", str(target), "--train.max_steps", "6"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: checkpoint file {target / 'optimizer.pt'} was refused")
    assert "never runs code" in lines[0]
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="optimizer.pt was refused"):
        maybe_resume(resumer(data_dir, run_copy, str(target)))
    assert not marker.exists()


# ---- a full disk --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["enospc", "torch_save"])
def test_full_disk_fails_loudly_and_keeps_previous(data_dir, tmp_path, monkeypatch, failure):
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(data_dir, run), single_info())
    trainer.train_step()
    trainer.step = 1
    first = ckpt.save(trainer)
    trainer.train_step()
    trainer.step = 2
    if failure == "enospc":
        import safetensors.torch

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        # What torch.save really raises when the disk fills up: a RuntimeError, not an OSError.
        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")

        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(trainer)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint save at step 2 into {run / 'checkpoints'} failed")
    assert ("No space left on device" if failure == "enospc" else "PytorchStreamWriter failed writing") in msg
    assert f"the previous checkpoint {first} is intact" in msg and "--resume auto" in msg
    assert ckpt.list_checkpoints(run) == [first]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]  # no final name, no .tmp-
    ckpt.verify(first)


def _save_fails_on_rank1_main(rank, world, port, data_dir, run_dir, out_dir, strategy):
    with gloo_rank(rank, world, port) as info:
        trainer = build_trainer(tiny_config(data_dir, run_dir, "--dist.strategy", strategy), info)
        trainer.train_step()
        trainer.step = 1
        first = ckpt.save(trainer)
        trainer.train_step()
        trainer.step = 2
        if rank == 1:  # rank 1's disk fills up as it writes its own file; rank 0's write goes through
            real = ckpt._write_json

            def full(path, obj):
                if Path(path).name.startswith("rng-rank"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(path, obj)

            ckpt._write_json = full
        try:
            ckpt.save(trainer)
            said = "saved"
        except CheckpointError as e:
            said = str(e)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps([said, str(first)]))
        trainer.close()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_save_that_fails_on_one_rank_names_it_on_every_rank(data_dir, tmp_path, strategy):
    """Every rank raises the same verdict with the failing rank's cause (before: rank 0, which prints, said only
    "it failed on another rank"; under FSDP, rank 1 then skipped the sharded save's collective: a hang)."""
    mp.spawn(_save_fails_on_rank1_main, args=(2, free_port(), data_dir, tmp_path / "run", tmp_path, strategy),
             nprocs=2, join=True)
    (said0, first), (said1, _) = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert said0 == said1, (said0, said1)
    assert said0.startswith(f"checkpoint save at step 2 into {tmp_path / 'run' / 'checkpoints'} failed (rank 1: "
                            "OSError: [Errno 28] No space left on device)"), said0
    assert f"the previous checkpoint {first} is intact" in said0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [Path(first).name]


# ---- pruning and commit ---------------------------------------------------------------------------------------


def test_keep_checkpoints_keeps_the_newest(data_dir, tmp_path):
    run = tmp_path / "run"
    stale = run / "checkpoints" / ".tmp-step-000000099"  # an earlier save that was killed
    stale.mkdir(parents=True)
    fit(data_dir, run, "--train.max_steps", "5", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP.format(4), STEP.format(5)]
    for p in ckpt.list_checkpoints(run):
        ckpt.verify(p)


def test_periodic_checkpoints_between_log_steps_and_the_final_one(data_dir, tmp_path, caplog, monkeypatch):
    """A checkpoint step that is no log or evaluation step still reads its steps and saves; the last step's save is
    the final one (not a periodic one, then skipped); a resume of the finished run saves nothing again."""
    run = tmp_path / "run"
    flags = ("--train.max_steps", "6", "--train.log_every", "5", "--train.eval_every", "100", "--log.sample_every", "0")
    fit(data_dir, run, *flags, "--train.checkpoint_every", "2", "--train.keep_checkpoints", "10")
    assert [p.name for p in ckpt.list_checkpoints(run)] == [STEP.format(s) for s in (2, 4, 6)]
    assert [ckpt.verify(p)["reason"] for p in ckpt.list_checkpoints(run)] == ["periodic", "periodic", "final"]
    marker = run / "checkpoints" / STEP.format(6) / ckpt.COMPLETE
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(logging.getLogger("gpttrain"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gpttrain")
    fit(data_dir, run, *flags, "--run.resume", "auto")  # at max_steps already: nothing to train, nothing to save
    assert marker.stat().st_mtime_ns == before and "replacing" not in caplog.text and "checkpoint saved" not in \
        caplog.text


def test_prune_unmarks_a_checkpoint_before_deleting_it(tmp_path, monkeypatch):
    """Its COMPLETE marker goes first: a crash mid-delete leaves a folder discovery ignores, never a half-deleted
    one that says it is complete."""
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / STEP.format(step)
        folder.mkdir(parents=True)
        (folder / ckpt.COMPLETE).write_text("{}")
    seen = []
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda path, **kw: seen.append((Path(path) / ckpt.COMPLETE).exists()))
    ckpt.prune(tmp_path, keep=1)
    assert seen == [False]


def test_save_replaces_an_incomplete_folder_of_the_same_step(data_dir, tmp_path):
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(data_dir, run), single_info())
    trainer.train_step()
    trainer.step = 1
    leftover = run / "checkpoints" / STEP.format(1)  # e.g. a prune interrupted after removing COMPLETE
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    path = ckpt.save(trainer)
    assert path == leftover and ckpt.verify(path)["trainer"]["step"] == 1
    assert ckpt.save(trainer) == path  # the same step again: already saved, nothing rewritten


# ---- non-finite loss or gradients -----------------------------------------------------------------------------


def _nan_rank_main(rank, world, port, data_dir, run_dir, out_dir, strategy):
    with gloo_rank(rank, world, port) as info:
        trainer = build_trainer(tiny_config(data_dir, run_dir, *DROPOUT, "--train.max_steps", "4",
                                            "--train.nonfinite", "skip", "--train.max_skipped_steps", "1",
                                            "--train.eval_every", "1000", "--dist.strategy", strategy), info)
        calls = [0]
        if rank == 1:
            def poison(module, args, output):
                if module.training:
                    calls[0] += 1
                    if calls[0] == 2:  # step 2's forward, on rank 1 only
                        return output * float("nan")
                return None

            trainer.model.register_forward_hook(poison)
        per_step = []
        real_step = trainer.train_step

        def recorded_step(stop_requested=False):
            before = [p.detach().clone() for p in trainer.model.parameters()]
            res = real_step(stop_requested)
            unchanged = all(torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
            per_step.append([res.finite, unchanged])
            return res

        trainer.train_step = recorded_step
        rc = trainer.fit()
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                for k, v in trainer.model.state_dict().items()}
        torch.save({"rc": rc, "skipped": trainer.skipped_steps, "per_step": per_step, "params": full,
                    "adam_steps": [float(s["step"]) for s in trainer.optimizer.state.values()]},
                   Path(out_dir) / f"rank{rank}.pt")
        trainer.close()  # DDP must not outlive the process group


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_on_one_rank_is_skipped_by_both(data_dir, tmp_path, strategy):
    mp.spawn(_nan_rank_main, args=(2, free_port(), data_dir, tmp_path / "run", tmp_path, strategy), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for r in (r0, r1):
        assert r["rc"] == 0 and r["skipped"] == 1
        assert r["per_step"] == [[True, False], [False, True], [True, False], [True, False]]
        assert set(r["adam_steps"]) == {3.0}  # the optimizer stepped 3 times out of 4
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    step2 = [rec for rec in read_metrics(tmp_path / "run") if rec["kind"] == "train" and rec["step"] == 2]
    assert step2 and step2[0]["loss"] is None and "loss" in step2[0]["nonfinite"]  # NaN recorded (as JSON's null)


HUGE_LR = ("--optim.lr", "1e30")  # step 1 sends the weights to ~1e30; every later loss is NaN


def test_nonfinite_policy_stop_saves_then_fails(data_dir, tmp_path):
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(data_dir, run, *HUGE_LR, "--train.max_steps", "4", "--train.nonfinite",
                                        "stop"), single_info())
    trainer.read_late = True  # as on CUDA (a CPU run reads a log step at once, and stops at step 2)
    # Step 2 logs (every step does here): its numbers are read once step 3 is queued, so the stop comes at step 3.
    with pytest.raises(GpttrainError, match=r"training stopped at step 3: non-finite loss or gradients at step 2 "
                                            r"\(policy stop\); .*set --train.nonfinite skip"):
        trainer.fit()
    saved = newest(run)
    assert saved.name == STEP.format(3)
    assert ckpt.verify(saved)["reason"] == "nonfinite"
    assert all(torch.isfinite(t).all() for t in load_file(str(saved / "model.safetensors")).values())
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {1.0}  # steps 2 and 3 were skipped
    # metrics.jsonl stays strict JSON: the NaN step's numbers are null, named under "nonfinite".
    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")

    records = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step2 = next(r for r in records if r["kind"] == "train" and r["step"] == 2)
    assert step2["loss"] is None and "loss" in step2["nonfinite"]


def test_nonfinite_found_at_the_next_log_step(data_dir, tmp_path):
    """The host reads the steps' numbers only at log steps, once the next step is queued (as on CUDA): a NaN at
    step 2 is found with log step 3's numbers, at step 4, and the state saved there holds no update from a
    non-finite step (steps 2 to 4 were skipped on the device)."""
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(data_dir, run, *HUGE_LR, "--train.max_steps", "6", "--train.log_every", "3",
                                        "--train.nonfinite", "stop"), single_info())
    trainer.read_late = True
    with pytest.raises(GpttrainError, match=r"training stopped at step 4: non-finite loss or gradients at step 2 "):
        trainer.fit()
    saved = newest(run)
    assert saved.name == STEP.format(4)
    assert all(torch.isfinite(t).all() for t in load_file(str(saved / "model.safetensors")).values())
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {1.0}  # only step 1 was applied


def test_nonfinite_policy_skip_has_a_limit(data_dir, tmp_path):
    run = tmp_path / "run"
    r = run_cli(train_args(data_dir, run, *HUGE_LR, "--train.max_steps", "6", "--train.nonfinite", "skip",
                           "--train.max_skipped_steps", "2"), cwd=tmp_path)
    assert r.returncode == 2
    # A CPU run reads each log step (every step here) at once: the third bad step stops the run where it happens.
    assert r.stderr.strip().startswith("error: training stopped at step 4: non-finite loss or gradients at step 4 "
                                       "(more than 2 skipped)")
    assert "raise --train.max_skipped_steps" in r.stderr
    assert r.stdout.count("step skipped") == 2
    assert ckpt.verify(newest(run))["reason"] == "nonfinite"


def test_nonfinite_gradient_with_finite_loss(data_dir, tmp_path):
    """A NaN gradient alone is caught; with a grad scaler (fp16) an overflow is the scaler's to skip."""
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r"), single_info())
    weight = trainer.model.tok_emb.weight
    handle = weight.register_hook(lambda g: g * float("nan"))
    before = weight.detach().clone()
    res = trainer.train_step()
    assert not res.finite and res.loss == res.loss  # finite loss, NaN gradient: not finite
    assert torch.equal(weight, before)
    handle.remove()

    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    handle = weight.register_hook(lambda g: g * float("inf"))
    res = trainer.train_step()
    handle.remove()
    assert res.finite  # not a non-finite event: the scaler skipped the step and halved its scale
    assert torch.equal(weight, before) and trainer.scaler.get_scale() == 512.0
    assert trainer.train_step().finite and not torch.equal(weight, before)


def test_fp16_nonfinite_loss_with_finite_gradients_is_skipped(data_dir, tmp_path):
    """The scaler looks at gradients only; our verdict on the loss joins it, so the step is skipped too."""
    trainer = build_trainer(tiny_config(data_dir, tmp_path / "r"), single_info())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    real_forward = trainer.model.forward

    def nan_loss(*args, **kwargs):  # NaN added as a constant: the gradients stay those of the real loss
        return real_forward(*args, **kwargs) + torch.tensor(float("nan"))

    trainer.model.forward = nan_loss
    before = [p.detach().clone() for p in trainer.model.parameters()]
    res = trainer.train_step()
    assert not res.finite and res.grad_norm == res.grad_norm  # NaN loss, finite gradients
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert trainer.scaler.get_scale() == 512.0
