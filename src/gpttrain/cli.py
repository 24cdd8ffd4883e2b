"""Command line: argument parsing only, one function call per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from gpttrain import __version__
from gpttrain.config import PRESETS, Config, field_help, parse_dotted, resolve
from gpttrain.errors import ConfigError, GpttrainError

log = logging.getLogger("gpttrain")

# The commands that take dotted config flags (--model.n_layers 6 ...) in the arguments argparse leaves over;
# every other command refuses leftovers.
CONFIG_COMMANDS = ("train", "bench", "info")
# The commands that run on many ranks under torchrun: a refusal every rank shares is said by rank 0 alone.
DISTRIBUTED_COMMANDS = ("train", "bench")
# How long a rank other than 0 on rank 0's node waits before it exits on a verdict every rank shares: torchrun
# stops a node's other ranks the moment one exits (SIGTERM, within 0.1 s), and rank 0, which says the verdict, may
# still be in its cleanup (the last plot, the process group's teardown). Rank 0 normally exits first, and torchrun
# then stops the waiting ranks at once, so the wait costs nothing; other nodes' ranks do not wait (their exit does
# not stop rank 0 at once).
SHARED_ERROR_GRACE_S = 10.0

# A bare `gpttrain train`'s first line, on the console and in the run's train.log.
DEMO_NOTE = "no arguments: running the demo (preset demo on the embedded corpus); see gpttrain train --help"

CONFIG_EPILOG = """config precedence: dataclass defaults < --preset < --config FILE < dotted flags.
Any setting can be given as a dotted flag, e.g. --model.n_layers 6 --optim.lr 3e-4 (or --optim.lr=3e-4):
""" + "\n".join(f"  {flag:34s} {desc} (default {default})" for flag, desc, default in field_help())


def _add_config_arguments(p: argparse.ArgumentParser, preset_default: str = "none", runs: bool = True) -> None:
    """The configuration's flags. `runs` False (info): the command prepares no data, writes nothing and runs on no
    device, so --run-dir and --device only set what the printed config shows, and --data the vocabulary (a train
    command's line, checked as it is)."""
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", default=None,
                   help=f"a named configuration: {', '.join(PRESETS)} (default: {preset_default})")
    g.add_argument("--config", default=None, metavar="FILE", help="a TOML file of settings (see configs/)")
    shown = "" if runs else "; info only shows it in the config"
    g.add_argument("--data", default=None, metavar="DIR",
                   help=("a prepared data dir, or a text file / folder to prepare first (= --data.path; "
                         "default: the embedded corpus)") if runs else
                   "(= --data.path) the data a run would use: a prepared dir's tokenizer (or the byte tokenizer's) "
                   "sets the vocabulary, as in train; info prepares nothing")
    g.add_argument("--run-dir", default=None, metavar="DIR",
                   help="where outputs go (= --run.dir)" if runs else f"(= --run.dir{shown}: it writes nothing)")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"],
                   help=f"(= --run.device{shown}: its estimates are for GPUs, whatever runs it)" if not runs
                   else "(= --run.device)")


def config_from_args(args: argparse.Namespace, rest: list[str],
                     default_preset: str | None = None) -> tuple[Config, str | None]:
    """The command's config, and a line saying where it came from where that is not the command line alone.

    `default_preset` where neither --preset nor --config is given; but `train --resume` without either continues
    with the settings its checkpoint was saved with (`resume.saved_settings`), the flags on top."""
    overrides = parse_dotted(rest, getattr(args, "command", None))
    for attr, key in (("data", "data.path"), ("run_dir", "run.dir"), ("device", "run.device"),
                      ("resume", "run.resume"), ("init_from", "run.init_from")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides.insert(0, (key, value))
    if args.preset is not None or args.config is not None or default_preset is None:
        return resolve(args.preset, args.config, overrides), None
    given = dict(overrides)
    if given.get("run.resume"):
        from gpttrain.resume import saved_settings

        run_dir = given.get("run.dir") or resolve(default_preset).run.dir
        saved = saved_settings(run_dir, given["run.resume"])
        if saved is not None:
            config, source = saved
            try:
                cfg = resolve(overrides=overrides, base=(config, str(source)))
            except ConfigError as e:
                if not str(e).startswith(str(source)):
                    raise
                raise ConfigError(f"{e}; or resume with settings given here: --preset or --config") from None
            if "run.init_from" not in given:
                cfg.run.init_from = None  # the checkpoint's weights replace those it started from
            data = cfg.data.path
            if "data.path" not in given and data is not None and not Path(data).exists():
                raise ConfigError(f"{source}: the run's data, {data!r}, is not there from this directory "
                                  f"({Path.cwd()}); run from the directory it was started in, or pass --data")
            return cfg, (f"--resume without --preset or --config: the settings saved in {source}, this command's "
                         "flags on top")
    if given.get("run.init_from"):
        return _init_from_model(given["run.init_from"], default_preset, overrides)
    return resolve(default_preset, None, overrides), None


def _init_from_model(hf_dir: str, default_preset: str, overrides: list[tuple[str, str]]) -> tuple[Config, str]:
    """`train --init-from DIR` without --preset or --config: the model DIR's config.json gives (its shape, vocabulary,
    dropout) and, for a directory gpttrain exported, the tokenizer text is prepared with; the default preset's other
    settings, the flags on top (a flag given wins, as with --resume)."""
    from gpttrain.export import check_init_from, init_from_settings

    check_init_from(hf_dir)  # a run, a checkpoint, a safetensors export: said as such, with what to do
    try:
        model, kind = init_from_settings(hf_dir)
    except ConfigError as e:
        raise ConfigError(f"--init-from: {e}") from None
    given = {key for key, _ in overrides}
    settings = {f"model.{k}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in dataclasses.asdict(model).items()}
    if kind is not None and "data.tokenizer" not in given and "data.tokenizer_file" not in given:
        settings["data.tokenizer"] = kind
    taken = [(k, v) for k, v in settings.items() if k not in given]
    cfg = resolve(default_preset, None, taken + overrides)
    return cfg, (f"--init-from without --preset or --config: the model of {Path(hf_dir) / 'config.json'} ("
                 + ", ".join(f"{k.split('.')[1]} {v}" for k, v in taken) + f"), the {default_preset} preset's "
                 "other settings, this command's flags on top")


class _Parser(argparse.ArgumentParser):
    """argparse's, with its errors in one line as ours are (its usage block would bury them): exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from gpttrain.data import prepare as prepare_mod

    parser = _Parser(
        prog="gpttrain",
        description="Train GPT-style language models from scratch: one CPU, one GPU, many GPUs (torchrun).",
    )
    parser.add_argument("--version", action="version", version=f"gpttrain {__version__}")
    quiet_help = ("only warnings and errors on the console, no progress bars (train.log keeps a run's info lines; "
                  "info's report, its output, is still printed)")
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # -q also after the command (`gpttrain train -q ...`); SUPPRESS keeps the top-level value otherwise.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[quiet], **kwargs)

    fmt = argparse.RawDescriptionHelpFormatter
    p = add_command("prepare", help="tokenize text into shards + meta.json", formatter_class=fmt,
                       description="Tokenize text files, directories, globs or JSONL (default: the embedded "
                                   "corpus, Python's standard library sources) into token shards.")
    prepare_mod.add_prepare_arguments(p)

    p = add_command("train", help="train a model (one process, or many under torchrun)", formatter_class=fmt,
                       epilog=CONFIG_EPILOG,
                       description="Train a GPT. With no arguments: the demo (the embedded corpus, a BPE tokenizer "
                                   "trained on it, the demo preset on CPU in a few minutes). Under torchrun, one "
                                   "process per GPU with DDP.")
    _add_config_arguments(p, preset_default="demo when neither --preset nor --config is given")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint in the run dir (auto) or from PATH "
                        "(= --run.resume); without --preset or --config, with the settings that checkpoint was "
                        "saved with, the flags given on top")
    p.add_argument("--init-from", default=None, metavar="HF_DIR",
                   help="start from a local Hugging Face GPT-2 layout model (= --run.init_from)")

    p = add_command("plot", help="redraw loss.pdf/.png, throughput and lr plots of a run",
                       description="Redraw the plots of a run from its metrics.jsonl.")
    from gpttrain.plot import add_plot_arguments

    add_plot_arguments(p)

    p = add_command("bench", help="time training steps; one JSON line", formatter_class=fmt,
                       epilog=CONFIG_EPILOG,
                       description="Time warmed-up training steps (synthetic tokens unless --data) and print one "
                                   "JSON line (with --sweep, one per size and then the best): tok_per_s, tflops, "
                                   "mfu, mem_peak_gib; on CPU also a plain PyTorch loop's time and our overhead; on "
                                   "CUDA the measured bf16 matmul peak and peak_ratio.")
    _add_config_arguments(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--sweep", action="store_true",
                   help="try micro-batch sizes 1, 2, 4, ... 256 and report the best; stops at the first that does "
                        "not fit (or that the data is too small for), after two in a row no faster than the best, "
                        "and (off CUDA) before one whose estimated memory is over 90%% of what the machine has "
                        "available")
    p.add_argument("--profile", action="store_true",
                   help="then profile two more steps and add where their time went (milliseconds per step by kind "
                        "of kernel: matmul, attention, compiled elementwise, optimizer...; the top kernels; the "
                        "device's idle share) to the row as `profile`")
    p.add_argument("--eval", action="store_true", dest="evaluation",
                   help="then time evaluations at the run's --train.eval_batches, eager and (where training "
                        "compiles the whole model) compiled, and one sample where the run samples, and add "
                        "`eval` to the row: "
                        "milliseconds per batch and per sample, and evaluation's share of the time at "
                        "--train.eval_every")
    p.add_argument("--reads", action="store_true",
                   help="then time steps whose numbers are read at every step, at once (as a loop calling "
                        ".item() each step) and once the next step is queued (as the trainer reads a log step on "
                        "CUDA), and the same steps unread, in turn, twice; add `reads` to the row: the best seconds "
                        "per step of each and each read's cost against the unread steps")

    from gpttrain.api import add_export_arguments, add_generate_arguments

    p = add_command("generate", help="continue a prompt with a trained model (KV cache, streaming)",
                       description="Sample text from a checkpoint: temperature (0 = greedy), top-k, top-p, seed; "
                                   "streams token by token and stops at end-of-text.")
    add_generate_arguments(p)

    p = add_command("export", help="write a checkpoint as a Hugging Face GPT-2 model or plain safetensors",
                       description="Export a checkpoint: --format hf writes config.json + model.safetensors that "
                                   "transformers.GPT2LMHeadModel.from_pretrained(DIR) loads.")
    add_export_arguments(p)

    p = add_command("consolidate", help="turn a sharded (FSDP) checkpoint into one ordinary checkpoint",
                       description="Gather the shards of an FSDP checkpoint into one folder with model.safetensors "
                                   "and optimizer.pt (generate and export also read sharded checkpoints directly).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run dir (newest complete checkpoint) or a checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint folder (absent or empty)")

    p = add_command("info", help="resolved config, parameters, FLOPs per token, memory estimate",
                       formatter_class=fmt, epilog=CONFIG_EPILOG,
                       description="Print the resolved config, the parameter count, model FLOPs per token and "
                                   "a training-memory estimate per GPU for each precision and strategy.")
    _add_config_arguments(p, runs=False)
    p.add_argument("--gpus", type=int, default=4, metavar="N", help="GPUs to shard over for FSDP rows (default: 4)")
    p.add_argument("--gpu-mem", type=float, default=24.0, metavar="GIB",
                   help="memory per GPU to check the estimate against, GiB (default: 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.commands = sub.choices  # name -> its parser, for _misspelled_flag
    return parser


def _misspelled_flag(command_parser: argparse.ArgumentParser, rest: list[str], settings: bool) -> str | None:
    """The argument and ' (did you mean ...?)' for the first of `rest` that is a plain flag naming a config setting
    (`--lr`: --optim.lr, with `settings`) or close to one of the command's own flags (`--swep`: --sweep); None where
    none is (the config's message then says what its flags look like; dotted ones get their own suggestions)."""
    from gpttrain.config import Config, _did_you_mean, _setting_elsewhere

    flags = [s for action in command_parser._actions for s in action.option_strings
             if s.startswith("--") and s != "--help"]
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." not in name:
            hint = (_setting_elsewhere(Config(), name[2:].replace("-", "_")) if settings else "") \
                or _did_you_mean(name, flags, cutoff=0.75)
            if hint:
                return f"{arg!r}{hint}"
    return None


def _print_json(obj: dict) -> None:
    """bench's rows and info's object: one JSON line on stdout, even under -q."""
    print(json.dumps(obj), flush=True)


_console_handler: logging.Handler | None = None  # the one this module put on the root logger


def _console_logging(level: int, stream) -> None:
    """Log lines to `stream` as bare messages: one handler of ours on the root logger, replacing the one an
    earlier call in this process put there. Handlers of others stay as they are (logging.basicConfig's force
    would close them all, a test runner's too)."""
    global _console_handler
    root = logging.getLogger()
    if _console_handler is not None:
        root.removeHandler(_console_handler)
    _console_handler = logging.StreamHandler(stream)
    _console_handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(_console_handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    level = logging.WARNING if args.quiet and args.command != "info" else logging.INFO  # info's lines are its output
    # generate's stdout is the text (`> out.txt`, a pipe): its log lines and warnings go to stderr.
    _console_logging(level, sys.stderr if args.command == "generate" else sys.stdout)
    log.setLevel(level)  # the library may have lowered it in this process (rank != 0, quiet runs)
    if args.command is None:
        parser.print_help()
        return 0
    misspelled = _misspelled_flag(parser.commands[args.command], rest, args.command in CONFIG_COMMANDS) \
        if rest else None
    if misspelled:
        parser.exit(2, f"error: unrecognized argument {misspelled} (see gpttrain {args.command} --help)\n")
    if rest and args.command not in CONFIG_COMMANDS:
        parser.exit(2, f"error: unrecognized arguments: {' '.join(rest)} (see gpttrain {args.command} --help)\n")
    try:
        if args.command == "prepare":
            from gpttrain.data.prepare import run_prepare

            return run_prepare(args)
        if args.command == "train":
            from gpttrain.run import run_training

            # The CPU demo is what a bare `gpttrain train` runs.
            cfg, note = config_from_args(args, rest, default_preset="demo")
            bare = argv is None and len(sys.argv) == 2
            return run_training(cfg, quiet=args.quiet, note=DEMO_NOTE if bare else note)
        if args.command == "plot":
            from gpttrain.plot import run_plot

            return run_plot(args)
        if args.command == "bench":
            from gpttrain.bench import run_bench

            return run_bench(config_from_args(args, rest)[0], _print_json, warmup=args.warmup, steps=args.steps,
                             sweep=args.sweep, profile=args.profile, evaluation=args.evaluation,
                             reads=args.reads)
        if args.command in ("generate", "export"):
            from gpttrain.api import run_export, run_generate

            return run_generate(args) if args.command == "generate" else run_export(args)
        if args.command == "consolidate":
            from gpttrain.checkpoint import consolidate

            consolidate(args.checkpoint, args.out)
            return 0
        if args.command == "info":
            from gpttrain.info import run_info

            return run_info(config_from_args(args, rest)[0], gpus=args.gpus, gpu_mem_gib=args.gpu_mem,
                            as_json=args.json, emit=_print_json)
    except GpttrainError as e:
        # Under a launcher, a verdict every rank shares is said by rank 0 alone (each other rank would print the
        # same line again); one that may be this rank's alone, by the rank that met it, which it names.
        rank = os.environ.get("RANK", "0")
        ranks = args.command in DISTRIBUTED_COMMANDS and "WORLD_SIZE" in os.environ
        if ranks and e.rank_local:
            print(f"[rank {rank}] error: {e}", file=sys.stderr)
        elif not ranks or rank == "0":
            print(f"error: {e}", file=sys.stderr)
        elif "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("GROUP_RANK", "0") == "0":
            time.sleep(SHARED_ERROR_GRACE_S)  # rank 0 says it; exiting first could get rank 0 stopped before it does
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if args.command != "generate":
            raise
        # The reader went away (`gpttrain generate ... | head`): nothing more to say to it. stdout is pointed at
        # devnull so the interpreter's flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):  # a stream without a file descriptor (a test's capture)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer its reader left
    parser.error(f"unknown command {args.command!r}")
    return 2
