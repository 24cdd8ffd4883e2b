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
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpttrain import __version__
from gpttrain import distributed as distmod
from gpttrain.data.shards import default_modes, file_sha256, fsync_dir
from gpttrain.errors import GpttrainError

log = logging.getLogger("gpttrain")

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
PREFIX = "step-"
STEP_NAME = re.compile(r"step-([0-9]{9,})")  # what a save names its folder: f"{PREFIX}{step:09d}"
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


def folder_step(path: Path) -> int | None:
    """The step in a checkpoint folder's name, None for another name (a user's `step-best` or
    `step-000000002-keep` is not one)."""
    m = STEP_NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_folders(run_dir: Path) -> list[Path]:
    """Every folder under a final checkpoint name, complete or not, oldest first. Other folders in checkpoints/
    (a copy a user made there) are not checkpoints of the run: neither resumed from nor pruned."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and folder_step(p) is not None), key=folder_step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in step_folders(run_dir) if (p / COMPLETE).is_file()]


def is_checkpoint_or_run(path: str | Path) -> bool:
    """A checkpoint folder (its COMPLETE marker) or a run dir with checkpoint folders: what an --out that is
    replaced as a whole, or an --init-from (a model directory), must not be."""
    return (Path(path) / COMPLETE).is_file() or bool(step_folders(path))


def _versions() -> dict[str, str]:
    import numpy

    return {"gpttrain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# ---- save -------------------------------------------------------------------------------------


def _failures(error: BaseException | None, trainer) -> str | None:
    """Every rank's failure in one verdict (`distributed.gather_failures`; every rank must call it): None where
    none failed, else what failed, on which rank where not on rank 0 alike."""
    return distmod.gather_failures(None if error is None else f"{type(error).__name__}: {error}", trainer.info)


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
    # Rank 0 decides whether this step is already saved (a signal right after a periodic save, a stop at the
    # step resumed from), so no rank skips a collective that the others enter. A folder of this step that this
    # process neither saved nor resumed from is another history's: one `--resume auto` skipped as damaged, or an
    # interrupted save. It is replaced (by `_commit`), never taken for this save.
    status = torch.zeros(2, device=trainer.device)  # [failed, already saved]
    error: BaseException | None = None
    if info.is_main:
        if trainer.saved_step == trainer.step and (final / COMPLETE).is_file():
            status[1] = 1
        else:
            if final.exists():
                log.warning("checkpoint: replacing %s, which this run did not save (damaged or interrupted)", final)
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

    # A full disk surfaces as OSError, RuntimeError (torch.save) or SafetensorError. The sharded save is a
    # collective: every rank enters it, whatever its own files did before (one that skipped it would hang the rest).
    rng = rng_state(trainer.device)  # as the step left it, before anything the save runs
    if is_sharded(trainer):
        try:
            _save_sharded(trainer, tmp / SHARDED_DIR)  # every rank writes its shards
        except Exception as e:
            error = e
    try:
        _write_json(tmp / f"rng-rank{info.rank:05d}.json", rng)
        if info.is_main:
            _write_rank0_files(trainer, tmp, reason)
    except Exception as e:
        error = error or e
    if (failure := _failures(error, trainer)) is not None:
        _save_failed(trainer, tmp, failure)

    if info.is_main:
        try:
            _commit(tmp, final)
        except OSError as e:
            error = e
    if (failure := _failures(error, trainer)) is not None:
        _save_failed(trainer, tmp, failure)
    trainer.saved_step = trainer.step
    if info.is_main:
        log.info("checkpoint saved: %s (%s)", final, reason)
        prune(trainer.run_dir, trainer.cfg.train.keep_checkpoints, upto=final)
    distmod.barrier(info)
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Fsync every file, write COMPLETE (their sizes and hashes) last, then rename tmp -> final."""
    default_modes(tmp)
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        _fsync_file(p)
        files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    if (tmp / SHARDED_DIR).is_dir():
        fsync_dir(tmp / SHARDED_DIR)
    _write_json(tmp / COMPLETE, {"format_version": FORMAT_VERSION, "files": files})
    fsync_dir(tmp)
    old = None
    if final.exists():
        # A folder under the final name that is not this run's save (no COMPLETE: an interrupted prune or save;
        # or one `--resume auto` skipped as damaged): discovery ignores or skips it, but it would block the rename.
        # Renamed aside, and deleted only after the commit: deleting it first (gigabytes at 1.42B) would keep the
        # finished save out of its final name for as long as that takes, and a crash then would lose it. A crash
        # now leaves the old folder as a `.tmp-` one, which the next prune removes.
        old = final.with_name(f".tmp-replaced-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_failed(trainer, tmp: Path, what: str) -> None:
    if trainer.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    root = trainer.run_dir / "checkpoints"
    previous = list_checkpoints(trainer.run_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"checkpoint save at step {trainer.step} into {root} failed ({what}); {kept}; "
                          "free disk space (or fix the folder's permissions) and resume with --resume auto")


def _write_rank0_files(trainer, tmp: Path, reason: str) -> None:
    from safetensors.torch import save_file

    from gpttrain.tokenizer import payload_of

    sharded = is_sharded(trainer)
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


def prune(run_dir: Path, keep: int, upto: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints (and stale temporary folders). With `upto` (the save
    just made), folders past it are neither counted nor deleted: they are those `--resume auto` skipped as
    damaged, which this run replaces as it reaches their steps (counted, they would prune its own new saves)."""
    complete = [p for p in list_checkpoints(run_dir) if upto is None or folder_step(p) <= folder_step(upto)]
    for old in complete[:-keep] if keep > 0 else []:
        # Remove COMPLETE first: a crash mid-delete leaves a folder discovery ignores.
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------


def require_complete(path: Path) -> None:
    """Refuse a checkpoint folder that is not there, or whose save never finished (no COMPLETE marker)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint folder "
                              "(RUN_DIR/checkpoints/step-...) or --resume auto")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: the save was interrupted); "
                              "use an earlier checkpoint or --resume auto")


def verify(path: Path, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check COMPLETE and each file's size and hash; returns the parsed state.json. `only`: check just these
    files (the settings of a checkpoint: `("state.json",)`); `skip`: files the caller does not read (inference
    needs no `optimizer.pt`: 11 GB to hash at 1.42B), which may then be missing too."""
    path = Path(path)
    require_complete(path)
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
        if name not in files and name not in skip:
            raise CheckpointError(f"checkpoint file {marker} does not cover {name}: the checkpoint is corrupt")
    for name, want in files.items():
        if name in skip or (only is not None and name not in only):
            continue
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
    if (p / COMPLETE).is_file():
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():  # (before the name: a run dir may be called step-lr-sweep)
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"run dir {p} holds no complete checkpoint")
        return found[-1]
    if p.is_dir() and folder_step(p) is not None:  # an interrupted save: refused as incomplete where it is read
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; give a run dir or a checkpoint folder")
    raise CheckpointError(f"{p} is neither a checkpoint folder (with {COMPLETE}) nor a run dir with checkpoints/")


def open_checkpoint(given: str | Path, **verify_args: Any) -> tuple[Path, dict[str, Any]]:
    """`resolve_checkpoint` then `verify` (with `verify_args`): the folder and its state. Where `given` is a run dir
    whose newest checkpoint is damaged, the refusal names the run dir's previous complete one (not checked), for
    the caller to pass instead: reading older weights than asked for is the user's choice, never done silently
    (training's `--resume auto` does fall back, as its run repeats the steps lost)."""
    path = resolve_checkpoint(given)
    try:
        return path, verify(path, **verify_args)
    except CheckpointError as e:
        older = [p for p in list_checkpoints(Path(given)) if folder_step(p) < folder_step(path)] \
            if path != Path(given) else []
        if not older:
            raise
        raise CheckpointError(f"{e}; the previous checkpoint of {given} is {older[-1]}: give that folder to use "
                              "it") from None


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


# ---- sharded (FSDP) state through torch.distributed.checkpoint --------------------------------------


def is_sharded(trainer) -> bool:
    return getattr(trainer, "strategy", None) == "fsdp"


def _save_sharded(trainer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    if trainer.cfg.train.fp8:  # fp8 all-gather weights: saved as the plain tensors they wrap
        from gpttrain.fp8 import plain_fp8_state

        model_sd, optim_sd = plain_fp8_state(model_sd), plain_fp8_state(optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
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
        load_sharded(model, None, Path(path) / SHARDED_DIR)
    else:
        load_model_state(model, load_model_weights(path))


def consolidate(src: str | Path, out: str | Path) -> Path:
    """Write a sharded (FSDP) checkpoint as one ordinary checkpoint folder: full model.safetensors and
    optimizer.pt, resumable without FSDP and readable by tools that want one file."""
    from gpttrain.config import from_dict
    from gpttrain.export import refuse_overlap
    from gpttrain.model import build_model
    from gpttrain.optim import build_optimizer

    out = Path(out)
    refuse_overlap(out, resolve_checkpoint(src))
    path, state = open_checkpoint(src)
    if not state.get("sharded"):
        raise CheckpointError(f"checkpoint {path} is already one file per part (not sharded); use it as it is")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out: {out} exists and is not a directory; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out: {out} exists and is not empty; choose a new folder")
    cfg = from_dict(state["config"])
    model = build_model(cfg.model, "cpu", init=False)  # every weight comes from the shards
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    load_sharded(model, optimizer, path / SHARDED_DIR)
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
