"""`metrics.jsonl` -> plots: loss.pdf/.png (loss against epochs, tokens seen on top), throughput.png, lr.png.

Cheap to import: matplotlib is imported inside the functions that draw. Figures are built with the
object-oriented API (`matplotlib.figure.Figure`), never through pyplot, so drawing needs no display, never
switches the backend of a caller's session (a notebook keeps its own) and leaves no figure registered
anywhere: each one is dropped after saving. Files are written atomically (temp file + os.replace) so a
reader, or a crash mid-plot during training, never leaves half a PDF behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpttrain.errors import DataError

if TYPE_CHECKING:
    import argparse

    from matplotlib.figure import Figure

log = logging.getLogger("gpttrain")

METRICS_FILE = "metrics.jsonl"
LOSS_FILES = ("loss.pdf", "loss.png")
THROUGHPUT_FILE = "throughput.png"
LR_FILE = "lr.png"
PNG_DPI = 150
_NO_RECORDS_HINT = "plots appear after the first log step"

Metrics = dict[str, list[dict[str, Any]]]


# ----------------------------------------------------------------------------------------------- reading


def _step_of(record: dict[str, Any]) -> int | None:
    step = record.get("step")
    if isinstance(step, bool):
        return None
    if isinstance(step, int):
        return step
    if isinstance(step, float) and step.is_integer():
        return int(step)
    return None


def read_metrics(path: str | os.PathLike[str]) -> Metrics:
    """Records of `metrics.jsonl` grouped by kind, one per step (the last one written), sorted by step.

    A run resumed from a checkpoint logs a `resume` record and then repeats the steps after the
    checkpoint: later lines replace earlier ones with the same step, and records from before the resume
    whose step lies past the resume's step (the abandoned run went further than its last checkpoint)
    are dropped, so a plot drawn while the resumed run catches up shows one consistent history. A `start`
    record (a run that began from scratch) drops every record before it: those of a run that died in the same run
    dir before its first checkpoint.
    Lines that are not JSON objects (a run killed mid-write leaves half a line at the end) are skipped
    with a warning; records without a "kind" are ignored; records without an integer step are kept
    in file order after the stepped ones of their kind (train and eval records need a step and are
    dropped without one).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; a training run writes it in its run dir") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a metrics.jsonl file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None

    lines = data.split(b"\n")
    last_nonblank = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_step: dict[str, dict[int, dict[str, Any]]] = {}
    unstepped: dict[str, list[dict[str, Any]]] = {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            where = "its last line, probably cut short by a run killed mid-write" if i == last_nonblank else \
                f"line {i + 1}, not valid JSON"
            log.warning("%s: skipping %s", path, where)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            continue
        kind = record["kind"]
        step = _step_of(record)
        if step is None:
            if kind not in ("train", "eval"):
                unstepped.setdefault(kind, []).append(record)
            continue
        if kind == "start":  # a run started afresh: what came before it belongs to a run that died before
            by_step.clear()  # its first checkpoint (the run dir would otherwise be refused)
            unstepped.clear()
        elif kind == "resume":
            for other, steps in by_step.items():
                if other != "resume":
                    for s in [s for s in steps if s > step]:
                        del steps[s]
        by_step.setdefault(kind, {})[step] = record

    out: Metrics = {}
    for kind in list(by_step) + [k for k in unstepped if k not in by_step]:
        records = [by_step.get(kind, {})[s] for s in sorted(by_step.get(kind, {}))]
        out[kind] = records + unstepped.get(kind, [])
    return out


def _series(records: Iterable[dict[str, Any]], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records where both values are finite numbers (None, NaN, inf and strings are left out)."""
    xs: list[float] = []
    ys: list[float] = []
    for r in records:
        x, y = r.get(xkey), r.get(ykey)
        if _finite(x) and _finite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------ epoch <-> tokens


def _epoch_token_anchors(metrics: Metrics) -> tuple[list[float], list[float]] | None:
    """Strictly increasing (epochs, tokens) anchors for the tokens-seen axis, or None where there are none.

    Both directions of the mapping must be monotonic, so points that do not advance both are dropped.
    A single point with positive epoch and tokens is joined to the origin (tokens grow in proportion
    to epochs); fewer than two points that advance both (e.g. every epoch equal) give no axis.
    """
    pairs: list[tuple[float, float]] = []
    for kind in ("train", "eval"):
        epochs, tokens = _series(metrics.get(kind, []), "epoch", "tokens")
        pairs.extend(zip(epochs, tokens))
    unique = sorted(set(pairs))
    if len(unique) == 1:
        e, t = unique[0]
        return ([0.0, e], [0.0, t]) if e > 0 and t > 0 else None
    xs: list[float] = []
    ys: list[float] = []
    for e, t in unique:
        if not xs or (e > xs[-1] and t > ys[-1]):
            xs.append(e)
            ys.append(t)
        elif e == xs[-1] and t > ys[-1]:
            ys[-1] = t  # the same epoch logged with two counts: the larger one (still above the point before)
    return (xs, ys) if len(xs) >= 2 else None


def _interp(x: Any, xp: list[float], fp: list[float]) -> Any:
    """Piecewise-linear interpolation through (xp, fp), extended linearly past both ends.

    np.interp alone clamps outside the data, which would fold the axis margins onto one tick.
    """
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    lo_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo_slope, y)
    y = np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi_slope, y)
    return y


def _format_count(value: float, _pos: Any = None) -> str:
    """1234 -> "1.23K", 4.5e9 -> "4.5B": token counts as people say them."""
    sign = "-" if value < 0 else ""
    v = float(f"{abs(value):.3g}")  # rounded first: 999,600 is "1M", not "1e+03K"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= div:
            return f"{sign}{v / div:.3g}{suffix}"
    return f"{sign}{v:.3g}"


# ------------------------------------------------------------------------------------------------ figures


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _loss_figure(metrics: Metrics) -> Figure:
    """The loss figure: eval train/val loss (and the per-step train loss, faint) against epochs,
    with tokens seen on a secondary axis on top where the records allow one."""
    fig = _new_figure()
    ax = fig.add_subplot()
    evals = metrics.get("eval", [])
    step_epochs, step_losses = _series(metrics.get("train", []), "epoch", "loss")
    train_epochs, train_losses = _series(evals, "epoch", "train_loss")
    val_epochs, val_losses = _series(evals, "epoch", "val_loss")

    if step_epochs:
        faint = bool(train_epochs or val_epochs)
        ax.plot(step_epochs, step_losses, color="tab:blue", linewidth=0.8, alpha=0.3 if faint else 0.9,
                label="Training loss (per step)")
    marker = "o" if max(len(train_epochs), len(val_epochs)) <= 1 else None
    if train_epochs:
        ax.plot(train_epochs, train_losses, color="tab:blue", marker=marker, label="Training loss")
    if val_epochs:
        ax.plot(val_epochs, val_losses, color="tab:orange", linestyle="-.", marker=marker, label="Validation loss")
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Loss")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper right")

    anchors = _epoch_token_anchors(metrics)
    if anchors is not None:
        from matplotlib.ticker import FuncFormatter

        epochs, tokens = anchors
        top = ax.secondary_xaxis("top", functions=(lambda e: _interp(e, epochs, tokens),
                                                   lambda t: _interp(t, tokens, epochs)))
        top.set_xlabel("Tokens seen")
        top.xaxis.set_major_formatter(FuncFormatter(_format_count))
    return fig


SMOOTH_FROM = 50  # more points than this: the raw series is drawn faint under a moving average


def _plot_noisy(ax: Any, xs: list[float], ys: list[float], *, color: str, label: str, linestyle: str = "-") -> Any:
    """Draw a noisy per-step series: as it is while short; else faint, under a trailing moving average.

    Returns the line to put in the legend."""
    import numpy as np

    if len(xs) <= SMOOTH_FROM:
        (line,) = ax.plot(xs, ys, color=color, linestyle=linestyle, marker="o" if len(xs) == 1 else None,
                          label=label)
        return line
    window = max(2, len(xs) // 40)
    ax.plot(xs, ys, color=color, linewidth=0.6, alpha=0.25)
    mean = np.convolve(np.asarray(ys, dtype=float), np.ones(window) / window, mode="valid")  # (n - window + 1,)
    (line,) = ax.plot(xs[window - 1:], mean, color=color, linestyle=linestyle, linewidth=1.8,
                      label=f"{label} (mean of {window} logs)")
    return line


def _throughput_figure(metrics: Metrics) -> Figure | None:
    """Tokens/s against step, MFU (%) on a right-hand axis where any record has one; None without data."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    train = metrics.get("train", [])
    steps, tps = _series(train, "step", "tok_per_s")
    mfu_steps, mfu = _series(train, "step", "mfu")
    if not steps and not mfu_steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    handles = []
    if steps:
        handles.append(_plot_noisy(ax, steps, tps, color="tab:blue", label="Tokens/s"))
        # The median shrugs off the slow first steps (compilation, warm-up) that a mean would count.
        ax.set_title(f"Throughput: median {_format_count(float(np.median(tps)))} tokens/s")
    else:
        ax.set_title("Throughput")
    ax.set_xlabel("Step")
    ax.set_ylabel("Tokens/s")
    ax.yaxis.set_major_formatter(FuncFormatter(_format_count))
    ax.grid(True, alpha=0.3)
    if mfu_steps:
        right = ax.twinx()
        handles.append(_plot_noisy(right, mfu_steps, [100.0 * m for m in mfu], color="tab:green", label="MFU",
                                   linestyle="--"))
        right.set_ylabel("MFU (%)")
    ax.legend(handles=handles, loc="lower right")
    return fig


def _lr_figure(metrics: Metrics) -> Figure | None:
    """Learning rate against step; None without data."""
    steps, lrs = _series(metrics.get("train", []), "step", "lr")
    if not steps:
        return None
    fig = _new_figure(7.0, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, lrs, color="tab:purple", marker="o" if len(steps) == 1 else None)
    ax.set_xlabel("Step")
    ax.set_ylabel("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    ax.set_title("Learning rate schedule")
    return fig


# ------------------------------------------------------------------------------------------------ writing


def _save_atomic(fig: Figure, path: Path) -> Path:
    """Save `fig` to `path` through a temp file in the same dir and os.replace: all or nothing."""
    fmt = path.suffix.lstrip(".").lower()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": created with the umask's mode, unlike mkstemp's 0600
            fig.savefig(f, format=fmt, dpi=PNG_DPI if fmt == "png" else None)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the plot directory ({e.strerror or e})") from None
    return out


def plot_losses(metrics: Metrics, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write loss.pdf and loss.png (the same figure) into `out_dir`; returns their paths."""
    out = _out_dir(out_dir)
    fig = _loss_figure(metrics)
    return [_save_atomic(fig, out / name) for name in LOSS_FILES]


def plot_throughput(metrics: Metrics, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write throughput.png into `out_dir`; returns its path, or [] where no train record has a throughput."""
    fig = _throughput_figure(metrics)
    return [] if fig is None else [_save_atomic(fig, _out_dir(out_dir) / THROUGHPUT_FILE)]


def plot_lr(metrics: Metrics, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write lr.png into `out_dir`; returns its path, or [] where no train record has a learning rate."""
    fig = _lr_figure(metrics)
    return [] if fig is None else [_save_atomic(fig, _out_dir(out_dir) / LR_FILE)]


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """All plots of a run dir from its metrics.jsonl, written beside it; returns the paths written."""
    run = Path(run_dir)
    if not run.is_dir():
        what = "is not a directory" if run.exists() else "no such run dir"
        raise DataError(f"{run}: {what}; give the --run-dir of a training run")
    path = run / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; is {run} a training run's dir? {_NO_RECORDS_HINT}")
    metrics = read_metrics(path)
    if not metrics.get("train") and not metrics.get("eval"):
        raise DataError(f"{path} has no train or eval records yet; {_NO_RECORDS_HINT}")
    return plot_losses(metrics, run) + plot_throughput(metrics, run) + plot_lr(metrics, run)


# ---------------------------------------------------------------------------------------------------- CLI


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help=f"a training run's dir; reads its {METRICS_FILE} and writes {' + '.join(LOSS_FILES)} "
                             f"(loss against epochs, tokens seen on top), {THROUGHPUT_FILE} (tokens/s, MFU) and "
                             f"{LR_FILE} beside it")


def run_plot(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir):
        log.info("wrote %s", path)
    return 0
