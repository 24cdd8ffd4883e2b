"""Resuming a run: which checkpoint `--resume` means, the checks before any data is prepared, and loading every
piece of a verified checkpoint back into a trainer.

`check_resume_request` refuses what needs no checkpoint contents (a run dir with checkpoints and no --resume, a
missing or incomplete path, a rollback into a run dir holding later checkpoints); `maybe_resume` then chooses and
verifies on rank 0 and every rank loads the same step. `saved_settings` gives `train --resume` without a preset
the settings the checkpoint was saved with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from gpttrain import distributed as distmod
from gpttrain.checkpoint import (
    COMPLETE,
    SHARDED_DIR,
    CheckpointError,
    folder_step,
    is_sharded,
    list_checkpoints,
    load_model_state,
    load_model_weights,
    load_optimizer_state,
    load_sharded,
    require_complete,
    resolve_checkpoint,
    set_rng_state,
    step_folders,
    verify,
)
from gpttrain.errors import ConfigError
from gpttrain.tokenizer import spec_differences

log = logging.getLogger("gpttrain")


def saved_settings(run_dir: str | Path, resume: str) -> tuple[dict[str, Any], Path] | None:
    """The settings of the checkpoint `--resume` points at (auto: the newest complete one in `run_dir` whose
    state.json is intact, as the resume then takes it; else a checkpoint or run dir), from its state.json, and
    that file; None where it points at none (the resume itself then says why). Only state.json is hashed here,
    against the checkpoint's manifest: the resume verifies the rest, and falls back past a damaged model to an
    older checkpoint of the same run. A damaged state.json is refused here, before any data is prepared."""
    if resume == "auto":
        found = list_checkpoints(Path(run_dir))
    else:
        try:
            found = [resolve_checkpoint(resume)]
        except CheckpointError:
            return None
    errors = []
    for path in reversed(found):
        try:
            state = verify(path, only=("state.json",))
            return state["config"], path / "state.json"
        except CheckpointError as e:
            errors.append(str(e))
        except (KeyError, TypeError):
            errors.append(f"checkpoint file {path / 'state.json'} holds no settings")
    if errors:
        raise CheckpointError(("--resume: " if resume != "auto" else "--resume auto: no checkpoint's settings can "
                               "be read: ") + "; ".join(errors))
    return None


MODEL_KEYS_THAT_MUST_MATCH = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias",
                              "tie_embeddings")
LOGGED_SETTINGS = ("optim", "train", "dist")


def model_differences(saved_model: dict[str, Any], model, skip: tuple[str, ...] = ()) -> list[str]:
    """A line for each model setting of a checkpoint's config (`saved_model`) that this run's differs in."""
    return [f"model.{key}: checkpoint {saved_model.get(key)!r} vs requested {getattr(model, key)!r}"
            for key in MODEL_KEYS_THAT_MUST_MATCH if key not in skip and saved_model.get(key) != getattr(model, key)]


def cannot_resume(which: str, problems: list[str], more: str = "") -> ConfigError:
    return ConfigError(f"cannot resume: {which} does not fit this run:\n  " + "\n  ".join(problems)
                       + f"\nuse the checkpoint's settings, or start a new run with another --run-dir{more}")


def check_model_before_data(cfg, run_dir: Path) -> None:
    """The model settings a resume would refuse (`check_compatible`), refused before any data is prepared: from
    the state.json of the checkpoint it would take (`saved_settings`). The vocabulary is left to the resume: it
    follows the data's tokenizer."""
    saved = saved_settings(run_dir, cfg.run.resume)
    if saved is None:
        return
    config, source = saved
    problems = model_differences(config.get("model", {}), cfg.model, skip=("vocab_size",))
    if problems:
        raise cannot_resume(f"checkpoint {source.parent}", problems)


def check_compatible(state: dict[str, Any], trainer, path: Path | None = None) -> None:
    """Refuse a checkpoint whose model or tokenizer differ from the run; log changed training settings."""
    saved = state["config"]
    problems = model_differences(saved["model"], trainer.cfg.model)
    saved_tok = (state.get("tokenizer") or {}).get("spec") or {}
    now_tok = trainer.tokenizer.spec() if trainer.tokenizer is not None else {}
    differ = spec_differences(saved_tok, now_tok)
    for key, was, now in differ:
        problems.append(f"tokenizer.{key}: checkpoint {was!r} vs data {now!r}")
    if problems:
        which = f"checkpoint {path}" if path is not None else "the checkpoint"
        kind = saved_tok.get("kind")
        retokenize = ""
        # Where the tokenizer is all that differs (the vocabulary follows it): the data is the cause.
        if differ and kind and not model_differences(saved["model"], trainer.cfg.model, skip=("vocab_size",)):
            its = (f"--tokenizer bpe --tokenizer-file {path / 'tokenizer.json'}" if kind == "bpe" and path is not None
                   else f"--tokenizer {kind}")
            retokenize = (f"; the data ({trainer.cfg.data.path or 'the default corpus'}) is tokenized otherwise than "
                          "the checkpoint's was (was it prepared again?): give the data it trained on, or prepare "
                          f"this text with its tokenizer (gpttrain prepare ... {its})")
        raise cannot_resume(which, problems, retokenize)
    now_cfg = trainer.cfg.to_dict()
    for section in LOGGED_SETTINGS:
        for key, was in saved.get(section, {}).items():
            if now_cfg[section].get(key) != was:
                log.info("resume: %s.%s changed from %r to %r", section, key, was, now_cfg[section].get(key))


def keep_hyperparameters(optimizer: torch.optim.Optimizer, hyper: list[dict[str, Any]]) -> None:
    """Give the loaded param groups this run's settings again (`hyper`, one dict per group, read before loading):
    `load_state_dict` takes a checkpoint's groups whole, so a changed --optim.weight_decay, beta or eps was said to
    change and did not, and a run of `--optim.fused off` resumed fused handed a non-fused AdamW the fused
    arguments. The lr is set at every step anyway."""
    for group, now in zip(optimizer.param_groups, hyper, strict=True):
        group.update(now)
        # The step counts where torch's AdamW keeps them for these settings (loading placed them for the saved
        # ones, or map_location did): beside the weights for the fused and capturable kernels, which read them
        # there; on the CPU otherwise (one on a GPU is read back at every step, a wait per parameter).
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            st = optimizer.state.get(param, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=param.device if on_device else "cpu", dtype=torch.float32)


def load_into(trainer, path: Path, state: dict[str, Any]) -> None:
    """Restore every piece of a verified checkpoint into the trainer (this rank's RNG included)."""
    check_compatible(state, trainer, path)
    # This run's optimizer settings (weight decay, betas, eps, fused), which loading the saved groups replaces.
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    if state.get("sharded"):
        load_sharded(trainer.model, trainer.optimizer, path / SHARDED_DIR)  # any world size: DCP reshards
    elif is_sharded(trainer):
        raise CheckpointError(f"checkpoint {path} holds one full copy of the model (a DDP or one-process run); "
                              "resume it with --dist.strategy ddp, or start the FSDP run from its weights "
                              "with gpttrain export + --init-from")
    else:
        # Every rank reads the files rank 0 verified: one that cannot (its node's copy) is named to all.
        weights, opt = distmod.on_every(lambda: (load_model_weights(path), load_optimizer_state(path, trainer.device)),
                                        trainer.info)
        load_model_state(trainer.model, weights)
        trainer.optimizer.load_state_dict(opt)
    keep_hyperparameters(trainer.optimizer, hyper)
    trainer.load_state_dict(state["trainer"])
    trainer.saved_step = trainer.step  # a stop before the next step needs no save of its own
    if state.get("loader") is not None and trainer.train_loader is not None:
        trainer.train_loader.load_state_dict(state["loader"])
    if state.get("scaler") is not None and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng-rank{trainer.info.rank:05d}.json"

    def read_rng() -> dict[str, Any] | None:
        if state.get("world_size") != trainer.info.world_size or not rng_file.is_file():
            return None
        try:
            return json.loads(rng_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {rng_file} is unreadable: {e}") from None

    rng = distmod.on_every(read_rng, trainer.info)  # each rank its own file, one verdict
    if rng is not None:
        set_rng_state(rng, trainer.device)
    else:
        if trainer.info.is_main:
            log.warning("resume: saved with %s ranks, now %d: data order continues exactly, random streams "
                        "(dropout) are reseeded", state.get("world_size"), trainer.info.world_size)
        torch.manual_seed(trainer.cfg.train.seed + 1000 * trainer.info.rank + trainer.step)


def check_resume_request(run_dir: Path, resume: str | None) -> list[Path]:
    """The checks of --resume that read no checkpoint's contents: what a run can refuse before any data is
    prepared (`verify` reads the rest when the checkpoint is loaded).

    A run dir with checkpoints is continued only on request. `auto` in a run dir whose checkpoint folders are all
    incomplete does not start from scratch. A path must be a complete checkpoint, or a run dir with one; resumed
    into a run dir that holds checkpoints of another run (any: the path is not among them) or this run's at or past
    its step, it would mix two histories (in checkpoints/, config.json and metrics.jsonl; `auto` would pick the
    later ones): refused.
    Returns the run dir's checkpoint folders (`step_folders`), for the caller that chooses among them."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: {str(run_dir)!r} exists and is not a directory; give a directory")
    folders = step_folders(run_dir)  # listed once, for every check below
    if resume is None:
        if folders:  # continued only on request, never overwritten by a new run
            raise ConfigError(f"--run-dir {run_dir} already holds checkpoints (newest: {folders[-1].name}); "
                              "pass --resume auto to continue that run, or choose another --run-dir")
        return folders
    if resume == "auto":
        if folders and not any((p / COMPLETE).is_file() for p in folders):
            raise CheckpointError(f"resume auto: {run_dir / 'checkpoints'} holds checkpoint folders but none is "
                                  f"complete ({', '.join(p.name for p in folders)}: no {COMPLETE} marker); "
                                  "not starting from scratch silently; move them away to start afresh")
        return folders
    try:
        path = resolve_checkpoint(resume)
        require_complete(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None
    own = run_dir / "checkpoints"
    if folders and path.resolve().parent != own.resolve():
        raise ConfigError(f"--resume {path}: it is not one of {own}'s checkpoints, and that run dir holds checkpoints "
                          f"of its own ({', '.join(p.name for p in folders)}); continuing there would mix two "
                          "histories; give another --run-dir (or copy the checkpoint into it and pass --resume auto)")
    step = folder_step(path)  # None: a folder renamed by hand, whose step its name does not say: any is later
    later = [p.name for p in folders if (step is None or folder_step(p) >= step) and p.resolve() != path.resolve()]
    if later:
        raise ConfigError(f"--resume {path}: {own} already holds checkpoints at or past its "
                          f"step ({', '.join(later)}); continuing there would mix two histories; give another "
                          "--run-dir (or move those folders away)")
    return folders


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
    folders = check_resume_request(run_dir, request)  # complete ones (as list_checkpoints) and interrupted saves
    if request is None:
        return None, None
    if request != "auto":
        path = resolve_checkpoint(request)
        return path, verify(path)
    existing = [p for p in folders if (p / COMPLETE).is_file()]
    incomplete = [p for p in folders if p not in existing]
    if not existing:  # and none incomplete: check_resume_request refused that
        log.info("resume auto: no complete checkpoint in %s; starting fresh", run_dir / "checkpoints")
        return None, None
    for p in incomplete:
        if folder_step(p) > folder_step(existing[-1]):
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
