"""Checkpoints that never lose a run: atomic saves, exact resume, corruption and mismatch guards.

Layout of `RUN_DIR/checkpoints/step-000000123/`:
  model.safetensors     weights of the unwrapped model (plain names; a tied head is stored once)
  optimizer.pt          the optimizer's state dict, read back with torch.load(weights_only=True)
  state.json            step, tokens, loader cursor, grad scaler, config, tokenizer spec, versions
  rng-rank00000.json    python, numpy, torch CPU and CUDA generator states of each rank
  tokenizer.json | gpt2.tiktoken   the tokenizer's payload, so generate/export need nothing else
  COMPLETE              written last: every file's size and SHA-256

A save goes into `.tmp-step-...`, is fsynced, gets COMPLETE (the last file written), and is then
renamed: the rename is the commit, so a final name never holds a partial save. Discovery also ignores
folders without COMPLETE. Loading never executes anything from the files.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpttrain import __version__
from gpttrain import distributed as distmod
from gpttrain.data.shards import file_sha256, fsync_dir
from gpttrain.errors import ConfigError, GpttrainError

log = logging.getLogger("gpttrain")

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
PREFIX = "step-"
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "state.json")
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files of an FSDP run, in place of the two above
SHARDED_REQUIRED_FILES = (f"{SHARDED_DIR}/.metadata", "state.json")


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _without_tied_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with a tied head left out: it is the embedding, stored and loaded once."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("out_head.weight", None)
    return sd


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's tensors, a tied head stored once (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().cpu() for k, v in _without_tied_head(model).items()}


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    if getattr(model.cfg, "tie_embeddings", False):
        sd = dict(sd)
        sd["out_head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict(sd, strict=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in _step_folders(run_dir) if (p / COMPLETE).is_file()]


def _versions() -> dict[str, str]:
    import numpy

    return {"gpttrain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# ---- save -------------------------------------------------------------------------------------


def _agree(ok: bool, trainer) -> bool:
    """True on every rank when `ok` is true on every rank (one all-reduce; every rank must call it)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=trainer.device)
    distmod.all_reduce(flag, trainer.info, "sum")
    return flag.item() == trainer.info.world_size


def save(trainer, reason: str = "periodic") -> Path:
    """Save the trainer's full state; collective (every rank calls it). Returns the final path.

    Three phases, each closed by an agreement so that a failure on any rank fails the save on every
    rank (no rank is left waiting in a collective): rank 0 prepares the temporary folder; every rank
    writes its files; rank 0 writes COMPLETE inside the temporary folder and renames it. The rename is
    the commit: a folder under a final name always holds COMPLETE, and a crash at any point leaves
    only a `.tmp-` folder, which the next save's prune removes.
    """
    info = trainer.info
    root = trainer.run_dir / "checkpoints"
    name = f"{PREFIX}{trainer.step:09d}"
    final, tmp = root / name, root / f".tmp-{name}"
    # Rank 0 decides whether this step is already saved (e.g. a signal right after a periodic save),
    # so no rank skips a collective that the others enter.
    status = torch.zeros(2, device=trainer.device)  # [failed, already saved]
    error: BaseException | None = None
    if info.is_main:
        if (final / COMPLETE).is_file():
            status[1] = 1
        else:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error, status[0] = e, 1
    distmod.all_reduce(status, info, "sum")
    if status[1].item() > 0:
        return final
    if status[0].item() > 0:
        raise CheckpointError(f"checkpoint: cannot create {tmp}: {error or 'failed on rank 0'}")

    try:
        _write_json(tmp / f"rng-rank{info.rank:05d}.json", rng_state(trainer.device))
        if _is_sharded(trainer):
            _save_sharded(trainer, tmp / SHARDED_DIR)  # collective: every rank writes its shards
        if info.is_main:
            _write_rank0_files(trainer, tmp, reason)
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError (torch.save) or SafetensorError
        error = e
    if not _agree(error is None, trainer):
        _save_failed(trainer, tmp, error)

    if info.is_main:
        try:
            _commit(tmp, final)
        except OSError as e:
            error = e
    if not _agree(error is None, trainer):
        _save_failed(trainer, tmp, error)
    if info.is_main:
        log.info("checkpoint saved: %s (%s)", final, reason)
        prune(trainer.run_dir, trainer.cfg.train.keep_checkpoints)
    distmod.barrier(info)
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Fsync every file, write COMPLETE (their sizes and hashes) last, then rename tmp -> final."""
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        _fsync_file(p)
        files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    if (tmp / SHARDED_DIR).is_dir():
        fsync_dir(tmp / SHARDED_DIR)
    _write_json(tmp / COMPLETE, {"format_version": FORMAT_VERSION, "files": files})
    fsync_dir(tmp)
    if final.exists():
        # A folder under the final name without COMPLETE (an interrupted prune, an older gpttrain):
        # discovery ignores it, but it would block the rename.
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _save_failed(trainer, tmp: Path, error: BaseException | None) -> None:
    if trainer.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    root = trainer.run_dir / "checkpoints"
    previous = list_checkpoints(trainer.run_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    what = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
    raise CheckpointError(f"checkpoint save at step {trainer.step} into {root} failed ({what}); {kept}; "
                          "free disk space (or fix the folder's permissions) and resume with --resume auto")


def _write_rank0_files(trainer, tmp: Path, reason: str) -> None:
    from safetensors.torch import save_file

    from gpttrain.tokenizer import payload_of

    sharded = _is_sharded(trainer)
    if not sharded:
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
        "sharded": sharded,
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


def _require_complete(path: Path) -> None:
    """Refuse a checkpoint folder that is not there, or whose save never finished (no COMPLETE marker)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint folder "
                              "(RUN_DIR/checkpoints/step-...) or --resume auto")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: the save was interrupted); "
                              "use an earlier checkpoint or --resume auto")


def verify(path: Path) -> dict[str, Any]:
    """Check COMPLETE and every file's size and hash; returns the parsed state.json."""
    path = Path(path)
    _require_complete(path)
    marker = path / COMPLETE
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(w, dict) and {"size", "sha256"} <= w.keys()
                                                  for w in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint file {marker} is corrupt (not the manifest gpttrain writes)") from None
    required = SHARDED_REQUIRED_FILES if SHARDED_REQUIRED_FILES[0] in files else REQUIRED_FILES
    for name in required:
        if name not in files:
            raise CheckpointError(f"checkpoint file {marker} does not cover {name}: the checkpoint is corrupt")
    for name, want in files.items():
        p = path / name
        # Plain names, or one level under sharded/: a manifest cannot point outside the folder.
        parts = name.split("/")
        plain = all(part and part not in (".", "..") and "\\" not in part for part in parts)
        if not plain or len(parts) > 2 or (len(parts) == 2 and parts[0] != SHARDED_DIR) or not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint file {p} is truncated or altered: {size} bytes, "
                                  f"{want['size']} expected")
        if file_sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: its SHA-256 differs from the one saved")
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path / 'state.json'} is unreadable: {e}") from None


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint folder, or a run dir (its newest complete checkpoint)."""
    p = Path(path_or_run)
    if (p / COMPLETE).is_file() or (p.name.startswith(PREFIX) and p.is_dir()):
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"run dir {p} holds no complete checkpoint")
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; give a run dir or a checkpoint folder")
    raise CheckpointError(f"{p} is neither a checkpoint folder (with {COMPLETE}) nor a run dir with checkpoints/")


def saved_settings(run_dir: str | Path, resume: str) -> tuple[dict[str, Any], Path] | None:
    """The settings of the checkpoint `--resume` (auto: the newest complete one in `run_dir`; else a checkpoint
    or run dir) points at, from its state.json, and that file; None where it points at none or the file cannot
    be read (the resume itself then says why). Read without verifying the checkpoint: resuming does that."""
    try:
        path = list_checkpoints(Path(run_dir))[-1] if resume == "auto" else resolve_checkpoint(resume)
        state_file = path / "state.json"
        return json.loads(state_file.read_text(encoding="utf-8"))["config"], state_file
    except (IndexError, GpttrainError, OSError, ValueError, KeyError, TypeError):
        return None


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise CheckpointError(f"checkpoint file {file} cannot be read as safetensors: {e}") from None


def load_optimizer_state(path: Path, device: torch.device) -> dict[str, Any]:
    """optimizer.pt through torch.load(weights_only=True): tensors and plain containers only, never code."""
    file = Path(path) / "optimizer.pt"
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but tensors/containers; RuntimeError if damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {file} was refused: it holds more than tensors and plain "
                              f"containers, or is damaged ({type(e).__name__}: {first}); gpttrain never "
                              "runs code from a checkpoint") from None


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


def check_compatible(state: dict[str, Any], trainer, path: Path | None = None) -> None:
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
        which = f"checkpoint {path}" if path is not None else "the checkpoint"
        raise ConfigError(f"cannot resume: {which} does not fit this run:\n  " + "\n  ".join(problems)
                          + "\nuse the checkpoint's settings, or start a new run with another --run-dir")
    now_cfg = trainer.cfg.to_dict()
    for section in LOGGED_SETTINGS:
        for key, was in saved.get(section, {}).items():
            if now_cfg[section].get(key) != was:
                log.info("resume: %s.%s changed from %r to %r", section, key, was, now_cfg[section].get(key))


def load_into(trainer, path: Path, state: dict[str, Any]) -> None:
    """Restore every piece of a verified checkpoint into the trainer (this rank's RNG included)."""
    check_compatible(state, trainer, path)
    if state.get("sharded"):
        _load_sharded(trainer.model, trainer.optimizer, path / SHARDED_DIR)  # any world size: DCP reshards
    elif _is_sharded(trainer):
        raise CheckpointError(f"checkpoint {path} holds one full copy of the model (a DDP or one-process run); "
                              "resume it with --dist.strategy ddp, or start the FSDP run from its weights "
                              "with gpttrain export + --init-from")
    else:
        weights = load_model_weights(path)
        opt = load_optimizer_state(path, trainer.device)
        load_model_state(trainer.model, weights)
        trainer.optimizer.load_state_dict(opt)
    trainer.load_state_dict(state["trainer"])
    if state.get("loader") is not None and trainer.train_loader is not None:
        trainer.train_loader.load_state_dict(state["loader"])
    if state.get("scaler") is not None and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng-rank{trainer.info.rank:05d}.json"
    if state.get("world_size") == trainer.info.world_size and rng_file.is_file():
        try:
            rng = json.loads(rng_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {rng_file} is unreadable: {e}") from None
        set_rng_state(rng, trainer.device)
    else:
        log.warning("resume: saved with %s ranks, now %d: data order continues exactly, random streams "
                    "(dropout) are reseeded", state.get("world_size"), trainer.info.world_size)
        torch.manual_seed(trainer.cfg.train.seed + 1000 * trainer.info.rank + trainer.step)


def _step_folders(run_dir: Path) -> list[Path]:
    """Every folder under a final checkpoint name, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def refuse_unrequested_resume(run_dir: Path, resume: str | None) -> None:
    """A run dir that holds checkpoints is continued only on request, never overwritten by a new run."""
    if resume is not None:
        return
    found = _step_folders(run_dir)
    if found:
        raise ConfigError(f"--run-dir {run_dir} already holds checkpoints (newest: {found[-1].name}); "
                          "pass --resume auto to continue that run, or choose another --run-dir")


def check_resume_request(run_dir: Path, resume: str | None) -> None:
    """The checks of --resume that read no checkpoint's contents: what a run can refuse before any data is
    prepared (`verify` reads the rest when the checkpoint is loaded).

    A run dir with checkpoints is continued only on request. `auto` in a run dir whose checkpoint folders are all
    incomplete does not start from scratch. A path must be a complete checkpoint, or a run dir with one; resumed
    into a run dir that holds checkpoints at or past its step (another run's, or this run's later ones), it would
    mix two histories (those folders' steps would not be saved again, and `auto` would pick them): refused."""
    run_dir = Path(run_dir)
    refuse_unrequested_resume(run_dir, resume)
    if resume is None:
        return
    folders = _step_folders(run_dir)
    if resume == "auto":
        if folders and not any((p / COMPLETE).is_file() for p in folders):
            raise CheckpointError(f"resume auto: {run_dir / 'checkpoints'} holds checkpoint folders but none is "
                                  f"complete ({', '.join(p.name for p in folders)}: no {COMPLETE} marker); "
                                  "not starting from scratch silently; move them away to start afresh")
        return
    try:
        path = resolve_checkpoint(resume)
        _require_complete(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None
    later = [p.name for p in folders if p.name >= path.name and p.resolve() != path.resolve()]
    if later:
        raise ConfigError(f"--resume {path}: {run_dir / 'checkpoints'} already holds checkpoints at or past its "
                          f"step ({', '.join(later)}); continuing there would mix two histories; give another "
                          "--run-dir (or move those folders away)")


def maybe_resume(trainer) -> Path | None:
    """Apply --resume (auto or a path). Returns the checkpoint used, or None for a fresh start.

    Rank 0 alone discovers and verifies (hashing a large checkpoint once, not once per rank) and
    broadcasts its choice or its refusal, so every rank loads the same step or raises the same error.
    """
    path, state = distmod.on_main(lambda: _choose_checkpoint(trainer), trainer.info)
    if path is None:
        return None
    load_into(trainer, path, state)
    log.info("resumed from %s (step %d)", path, trainer.step)
    return path


def _choose_checkpoint(trainer) -> tuple[Path | None, dict[str, Any] | None]:
    """The verified checkpoint --resume asks for and its state, or (None, None) to start fresh."""
    request = trainer.cfg.run.resume
    run_dir = trainer.run_dir
    check_resume_request(run_dir, request)
    if request is None:
        return None, None
    if request != "auto":
        path = resolve_checkpoint(request)
        return path, verify(path)
    folders = _step_folders(run_dir)  # listed once: complete ones (as list_checkpoints) and interrupted saves
    existing = [p for p in folders if (p / COMPLETE).is_file()]
    incomplete = [p for p in folders if p not in existing]
    if not existing:  # and none incomplete: check_resume_request refused that
        log.info("resume auto: no complete checkpoint in %s; starting fresh", run_dir / "checkpoints")
        return None, None
    for p in incomplete:
        if p.name > existing[-1].name:
            log.warning("resume auto: ignoring %s: no %s marker (an interrupted save)", p, COMPLETE)
    errors = []
    for path in reversed(existing):
        try:
            state = verify(path)
        except CheckpointError as e:
            log.warning("resume auto: skipping %s: %s", path.name, e)
            errors.append(str(e))
            continue
        if errors:
            log.warning("resume auto: falling back to %s, the newest checkpoint that verifies", path.name)
        return path, state
    raise CheckpointError("resume auto: every checkpoint in " + str(run_dir / "checkpoints")
                          + " is damaged; not starting from scratch silently:\n  " + "\n  ".join(errors))


# ---- sharded (FSDP) state through torch.distributed.checkpoint --------------------------------------


def _is_sharded(trainer) -> bool:
    return getattr(trainer, "strategy", None) == "fsdp"


def _save_sharded(trainer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    if trainer.cfg.train.fp8:  # fp8 all-gather weights: saved as the plain tensors they wrap
        from gpttrain.fp8 import plain_fp8_state

        model_sd, optim_sd = plain_fp8_state(model_sd), plain_fp8_state(optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def _load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
    """Load DCP state into a model (FSDP-sharded or plain, any world size) and optionally its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": _without_tied_head(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    from gpttrain.fp8 import plain_fp8_state

    state = plain_fp8_state(state)  # fp8 all-gather weights are read as the plain tensors they wrap (no copy)
    try:
        with warnings.catch_warnings():
            # One process reading shards (generate, export, consolidate, a resume without FSDP) is what is meant.
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninit")
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # CheckpointException and friends: a damaged or foreign folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"sharded checkpoint {folder} cannot be loaded ({type(e).__name__}: {first})") from None
    if optimizer is None:
        load_model_state(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_model(model: torch.nn.Module, path: Path, state: dict[str, Any]) -> None:
    """The full weights of a verified checkpoint into a plain model, from one file or from shards."""
    if state.get("sharded"):
        _load_sharded(model, None, Path(path) / SHARDED_DIR)
    else:
        load_model_state(model, load_model_weights(path))


def consolidate(src: str | Path, out: str | Path) -> Path:
    """Write a sharded (FSDP) checkpoint as one ordinary checkpoint folder: full model.safetensors and
    optimizer.pt, resumable without FSDP and readable by tools that want one file."""
    from gpttrain.config import from_dict
    from gpttrain.model import build_model
    from gpttrain.optim import build_optimizer

    path = resolve_checkpoint(src)
    state = verify(path)
    out = Path(out)
    if not state.get("sharded"):
        raise CheckpointError(f"checkpoint {path} is already one file per part (not sharded); use it as it is")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out: {out} exists and is not empty; choose a new folder")
    cfg = from_dict(state["config"])
    model = build_model(cfg.model, "cpu", init=False)  # every weight comes from the shards
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    _load_sharded(model, optimizer, path / SHARDED_DIR)
    from safetensors.torch import save_file

    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(model_state_for_saving(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for p in path.iterdir():
            if p.is_file() and p.name not in (COMPLETE, "state.json"):
                shutil.copy2(p, tmp / p.name)  # per-rank RNG, the tokenizer
        _write_json(tmp / "state.json", dict(state, sharded=False, consolidated_from=str(path)))
        if out.exists():
            out.rmdir()
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("consolidated %s into %s", path, out)
    return out
