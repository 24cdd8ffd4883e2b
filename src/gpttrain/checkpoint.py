"""Checkpoints that never lose a run: atomic saves, exact resume, corruption and mismatch guards.

Layout of `RUN_DIR/checkpoints/step-000000123/`:
  model.safetensors     weights of the unwrapped model (plain names; a tied head is stored once)
  optimizer.pt          the optimizer's state dict, read back with torch.load(weights_only=True)
  state.json            step, tokens, loader cursor, grad scaler, config, tokenizer spec, versions
  rng-rank00000.json    python, numpy, torch CPU and CUDA generator states of each rank
  tokenizer.json | gpt2.tiktoken   the tokenizer's payload, so generate/export need nothing else
  COMPLETE              written last: every file's size and SHA-256

A save goes into `.tmp-step-...`, is fsynced, renamed, and only then gets COMPLETE; discovery
ignores folders without it. Loading never executes anything from the files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpttrain import __version__
from gpttrain import distributed as distmod
from gpttrain.errors import ConfigError, GpttrainError

log = logging.getLogger("gpttrain")

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
PREFIX = "step-"


class CheckpointError(GpttrainError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the run."""


# ---- RNG ---------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(device: torch.device) -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["torch_cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_from_b64(state["torch_cpu"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(_from_b64(state["torch_cuda"]), device)


# ---- files -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's tensors, a tied head stored once (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("out_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    if getattr(model.cfg, "tie_embeddings", False):
        sd = dict(sd)
        sd["out_head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict(sd, strict=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _versions() -> dict[str, str]:
    import numpy

    return {"gpttrain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# ---- save -------------------------------------------------------------------------------------


def save(trainer, reason: str = "periodic") -> Path | None:
    """Save the trainer's full state; collective (every rank calls it). Returns the final path."""
    info = trainer.info
    root = trainer.run_dir / "checkpoints"
    name = f"{PREFIX}{trainer.step:09d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if (final / COMPLETE).is_file():
        return final  # already saved at this step (e.g. periodic, then final)
    ok = torch.ones(1, device=trainer.device)
    error: Exception | None = None
    if info.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error, ok[0] = e, 0
    distmod.all_reduce(ok, info, "sum")
    if ok.item() < info.world_size:
        raise CheckpointError(f"checkpoint: cannot create {tmp}: {error or 'failed on rank 0'}")
    ok = torch.ones(1, device=trainer.device)
    try:
        _write_json(tmp / f"rng-rank{info.rank:05d}.json", rng_state(trainer.device))
        if info.is_main:
            _write_rank0_files(trainer, tmp, reason)
    except OSError as e:  # full disk, permissions, ...
        error, ok[0] = e, 0
    distmod.all_reduce(ok, info, "sum")  # every rank learns whether all writes succeeded
    if ok.item() < info.world_size:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(trainer.run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint save at step {trainer.step} failed ({error or 'on another rank'}); "
                              f"{kept}; free disk space in {root} and resume with --resume auto")
    if info.is_main:
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync_file(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        os.replace(tmp, final)
        _write_json(final / (COMPLETE + ".tmp"), {"format_version": FORMAT_VERSION, "files": files})
        os.replace(final / (COMPLETE + ".tmp"), final / COMPLETE)
        _fsync_dir(final)
        _fsync_dir(root)
        log.info("checkpoint saved: %s (%s)", final, reason)
        prune(trainer.run_dir, trainer.cfg.train.keep_checkpoints)
    distmod.barrier(info)
    return final


def _write_rank0_files(trainer, tmp: Path, reason: str) -> None:
    from safetensors.torch import save_file

    from gpttrain.tokenizer import payload_of

    save_file(model_state_for_saving(trainer.model), str(tmp / "model.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    tok = trainer.tokenizer
    tok_file = None
    if tok is not None:
        payload = payload_of(tok)
        if payload is not None:
            tok_file = "tokenizer.json" if tok.kind == "bpe" else "gpt2.tiktoken.b64"
            (tmp / tok_file).write_text(payload, encoding="utf-8")
    state = {
        "format_version": FORMAT_VERSION,
        "reason": reason,
        "time": time.time(),
        "trainer": trainer.state_dict(),
        "loader": trainer.train_loader.state_dict() if trainer.train_loader is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "world_size": trainer.info.world_size,
        "precision": trainer.precision,
        "config": trainer.cfg.to_dict(),
        "tokenizer": {"spec": tok.spec() if tok is not None else None, "file": tok_file},
        "versions": _versions(),
    }
    _write_json(tmp / "state.json", state)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (and stale temporary folders)."""
    complete = list_checkpoints(run_dir)
    for old in complete[:-keep] if keep > 0 else []:
        # Remove COMPLETE first: a crash mid-delete leaves a folder discovery ignores.
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------


def verify(path: Path) -> dict[str, Any]:
    """Check COMPLETE and every file's size and hash; returns the parsed state.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint folder "
                              "(RUN_DIR/checkpoints/step-...) or --resume auto")
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: the save was interrupted); "
                              "use an earlier checkpoint or --resume auto")
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {marker} is corrupt (not the manifest gpttrain writes)") from None
    for name, want in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint file {p} is truncated or altered: {size} bytes, "
                                  f"{want['size']} expected")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: its SHA-256 differs from the one saved")
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path / 'state.json'} is unreadable: {e}") from None


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint folder, or a run dir (its newest complete checkpoint)."""
    p = Path(path_or_run)
    if (p / COMPLETE).is_file() or p.name.startswith(PREFIX):
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"run dir {p} holds no complete checkpoint")
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; give a run dir or a checkpoint folder")
    raise CheckpointError(f"{p} is neither a checkpoint folder (with {COMPLETE}) nor a run dir with checkpoints/")


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def load_tokenizer(path: Path, state: dict[str, Any]):
    from gpttrain.tokenizer import from_spec

    tok = state.get("tokenizer") or {}
    spec, name = tok.get("spec"), tok.get("file")
    if spec is None:
        return None
    payload = (Path(path) / name).read_text(encoding="utf-8") if name else None
    return from_spec(spec, payload)


MODEL_KEYS_THAT_MUST_MATCH = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias",
                              "tie_embeddings")
LOGGED_SETTINGS = ("optim", "train")


def check_compatible(state: dict[str, Any], trainer) -> None:
    """Refuse a checkpoint whose model or tokenizer differ from the run; log changed training settings."""
    saved = state["config"]
    problems = []
    for key in MODEL_KEYS_THAT_MUST_MATCH:
        was, now = saved["model"].get(key), getattr(trainer.cfg.model, key)
        if was != now:
            problems.append(f"model.{key}: checkpoint {was!r} vs requested {now!r}")
    saved_tok = (state.get("tokenizer") or {}).get("spec") or {}
    now_tok = trainer.tokenizer.spec() if trainer.tokenizer is not None else {}
    for key in ("kind", "vocab_size", "eot_id", "sha256"):
        if saved_tok.get(key) != now_tok.get(key):
            problems.append(f"tokenizer.{key}: checkpoint {saved_tok.get(key)!r} vs data {now_tok.get(key)!r}")
    if problems:
        raise ConfigError("cannot resume: the checkpoint does not fit this run:\n  " + "\n  ".join(problems)
                          + "\nuse the checkpoint's settings, or start a new run with another --run-dir")
    now_cfg = trainer.cfg.to_dict()
    for section in LOGGED_SETTINGS:
        for key, was in saved.get(section, {}).items():
            if now_cfg[section].get(key) != was:
                log.info("resume: %s.%s changed from %r to %r", section, key, was, now_cfg[section].get(key))


def load_into(trainer, path: Path, state: dict[str, Any]) -> None:
    """Restore every piece of a verified checkpoint into the trainer (this rank's RNG included)."""
    check_compatible(state, trainer)
    load_model_state(trainer.model, load_model_weights(path))
    opt = torch.load(path / "optimizer.pt", map_location=trainer.device, weights_only=True)
    trainer.optimizer.load_state_dict(opt)
    trainer.load_state_dict(state["trainer"])
    if state.get("loader") is not None and trainer.train_loader is not None:
        trainer.train_loader.load_state_dict(state["loader"])
    if state.get("scaler") is not None and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng-rank{trainer.info.rank:05d}.json"
    if state.get("world_size") == trainer.info.world_size and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")), trainer.device)
    else:
        log.warning("resume: saved with %s ranks, now %d: data order continues exactly, random streams "
                    "(dropout) are reseeded", state.get("world_size"), trainer.info.world_size)
        torch.manual_seed(trainer.cfg.train.seed + 1000 * trainer.info.rank + trainer.step)


def maybe_resume(trainer) -> Path | None:
    """Apply --resume (auto or a path). Returns the checkpoint used, or None for a fresh start."""
    request = trainer.cfg.run.resume
    run_dir = trainer.run_dir
    existing = list_checkpoints(run_dir)
    if request is None:
        if existing:
            raise ConfigError(f"--run-dir {run_dir} already holds checkpoints (newest: {existing[-1].name}); "
                              "pass --resume auto to continue that run, or choose another --run-dir")
        return None
    if request == "auto":
        if not existing:
            log.info("resume auto: no complete checkpoint in %s; starting fresh", run_dir / "checkpoints")
            return None
        errors = []
        for path in reversed(existing):
            try:
                state = verify(path)
            except CheckpointError as e:
                log.warning("resume auto: skipping %s: %s", path.name, e)
                errors.append(str(e))
                continue
            load_into(trainer, path, state)
            log.info("resumed from %s (step %d)", path, trainer.step)
            return path
        raise CheckpointError("resume auto: every checkpoint in " + str(run_dir / "checkpoints")
                              + " is damaged; not starting from scratch silently:\n  " + "\n  ".join(errors))
    path = resolve_checkpoint(request)
    state = verify(path)
    load_into(trainer, path, state)
    log.info("resumed from %s (step %d)", path, trainer.step)
    return path
