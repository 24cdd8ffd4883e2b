"""The command line as a user meets it: help, info, and one-line refusals with exit status 2."""

import json
import sys

import pytest

from gpttrain.cli import main

COMMANDS = ("prepare", "train", "plot", "bench", "generate", "export", "consolidate", "info")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_documents_its_flags(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: gpttrain " + cmd in capsys.readouterr().out


def test_info_says_what_its_run_flags_do(capsys):
    """info takes a train command's flags, to show that run's config; it prepares no data, writes no run dir and
    runs on no device, and its help says so rather than train's words."""
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "prepare first" not in out and "where outputs go" not in out
    for flag in ("run.dir", "run.device"):
        assert f"(= --{flag}; info only shows it in the config" in out
    assert "(= --data.path) the data a run would use: a prepared dir's tokenizer (or the byte tokenizer's) sets the " \
        "vocabulary, as in train; info prepares nothing" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a text file / folder to prepare first" in out and "where outputs go (= --run.dir)" in out


@pytest.mark.parametrize("argv, message", [
    (["prepare", "x.txt", "--tokenizer", "gpt3"],
     "error: argument --tokenizer: invalid choice: 'gpt3' (choose from 'gpt2', 'bpe', 'byte') "
     "(see gpttrain prepare --help)"),
    (["train", "--device", "gpu"], "error: argument --device: invalid choice: 'gpu'"),
    (["generate", "--prompt", "x"], "error: the following arguments are required: --checkpoint "
                                    "(see gpttrain generate --help)"),
    (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["consolidate", "a", "--out", "b", "--extra"], "error: unrecognized arguments: --extra "
                                                    "(see gpttrain consolidate --help)"),
    (["info", "stray"], "error: unrecognized argument 'stray'; config flags look like --section.key VALUE "
                        "(sections: model, data, optim, train, dist, log, run); see gpttrain info --help"),
    # a command's own flag, misspelled: named, not taken for a config flag
    (["bench", "--preset", "tiny", "--swep"],
     "error: unrecognized argument '--swep' (did you mean --sweep?) (see gpttrain bench --help)"),
    (["info", "--presets=tiny"],
     "error: unrecognized argument '--presets=tiny' (did you mean --preset?) (see gpttrain info --help)"),
    (["export", "a", "--out", "b", "--overwite"],
     "error: unrecognized argument '--overwite' (did you mean --overwrite?) (see gpttrain export --help)"),
    (["train", "--zzz", "1"], "error: unrecognized argument '--zzz'; config flags look like --section.key VALUE"),
    # a config setting given as a plain flag: its dotted name (never --help, the nearest flag by spelling)
    (["train", "--lr", "3e-4"], "error: unrecognized argument '--lr' (did you mean --optim.lr?) (see gpttrain train"),
    (["bench", "--max-steps=4"], "error: unrecognized argument '--max-steps=4' (did you mean --train.max_steps?)"),
    (["train", "--steps", "5"], "error: unrecognized argument '--steps'; config flags look like --section.key VALUE"),
])
def test_argument_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))  # argparse's errors exit 2 themselves; gpttrain's own return 2
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [(["--steps", "0"], "error: --steps: 0 must be at least 1"),
                                           (["--warmup", "-1"], "error: --warmup: -1 must be >= 0")])
def test_bench_names_the_count_that_is_wrong(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--preset", "tiny", "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not any(tmp_path.iterdir())


def test_info_answers_at_once_for_an_absurd_micro_batch(capsys):
    """The suggested micro-batch searches the divisors of the batch in pairs: 1e12 answered in well under a
    second (before, every number up to it was tried: no answer in a minute)."""
    import time

    start = time.perf_counter()
    assert main(["info", "--preset", "tiny", "--train.micro_batch_size", "1000000000000", "--gpu-mem", "24"]) == 0
    assert time.perf_counter() - start < 10
    assert "verdict:" in capsys.readouterr().out


def test_info_verdicts_say_one_thing(caplog, capsys):
    """A smaller micro-batch that fits is the answer, not also 'no layout fits'; where not even micro-batch 1
    fits, the card size is not offered back as the remedy."""
    with caplog.at_level("INFO", logger="gpttrain"):
        assert main(["info", "--preset", "tiny", "--gpu-mem", "24", "--train.micro_batch_size", "100000"]) == 0
    verdict = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict:")][-1]
    assert verdict.endswith("DDP fits at micro-batch 50000 x 2 accumulation steps (same global batch).")
    caplog.clear()
    with caplog.at_level("INFO", logger="gpttrain"):
        assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "4", "--gpus", "1"]) == 0
    verdict = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict:")][-1]
    assert verdict.endswith("No listed layout fits, even at a smaller micro-batch; try more GPUs (--gpus) or GPUs "
                            "with more than 4 GiB.")
    assert main(["info", "--preset", "tiny", "--gpu-mem", "nan"]) == 2
    capsys.readouterr()
    assert main(["info", "--preset", "tiny", "--gpu-mem", "1"]) == 2  # nothing left beside the CUDA context
    assert "error: --gpu-mem: 1.0 must be a number of GiB above 1 (the CUDA context's share)" in capsys.readouterr().err


def test_info_of_the_original_model(capsys):
    assert main(["info", "--preset", "gpt-1.4b"]) == 0
    out = capsys.readouterr().out
    assert "1,416,597,504" in out
    assert "8.470 GFLOP" in out
    assert "FSDP x4" in out and "verdict:" in out
    assert ("evaluation:            14.3% of the model FLOPs (counted: 5 forward passes of a micro-batch on each split "
            "every 5 steps of 4 micro-steps); raise --train.eval_every to train faster") in out


def test_info_table_says_which_rows_fit(capsys):
    """The table's last column compares each row's total (GiB) with --gpu-mem (GiB)."""
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "24"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["fp32"], ["bf16-mixed"], ["bf16-pure"])]
    assert len(rows) == 3 * 2 * 3  # precisions x (DDP, FSDP x2, FSDP x4) x activation checkpointing
    assert [r[-1] for r in rows] == ["yes" if float(r[-2]) <= 24 else "no" for r in rows]
    assert {r[-1] for r in rows} == {"yes", "no"}


def test_info_fits_the_vocabulary_to_data_as_train_does(tmp_path, capsys):
    """--data: info's model is the one train would build on it (before, --data was ignored: the preset's vocabulary,
    and a --data that does not exist passed)."""
    from gpttrain.model import count_params
    from tests.helpers import make_data

    data = make_data(tmp_path)  # byte: 257 tokens, 320 rounded up
    assert main(["info", "--preset", "demo", "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["model"]["vocab_size"] == 320
    from gpttrain.config import from_dict

    assert out["parameters"] == count_params(from_dict(out["config"]).model)
    assert main(["info", "--preset", "demo", "--data", str(tmp_path / "corpus.txt"), "--data.tokenizer", "byte",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["model"]["vocab_size"] == 320
    assert main(["info", "--preset", "demo", "--data", str(tmp_path / "nothing")]) == 2
    assert "--data: " in capsys.readouterr().err
    assert main(["-q", "info", "--preset", "demo", "--data", str(data)]) == 0  # -q: the report is info's output
    assert "vocabulary: 320, from " in capsys.readouterr().out


def test_info_recomputes_the_weight_casts_where_they_make_it_fit(capsys):
    # gpt-1.4b at micro-batch 8: 39.4 GiB estimated, 37.1 with the casts recomputed. auto recomputes them where
    # the estimate without is over 90% of the GPU's memory (--gpu-mem here, the card's memory in a run). What fits
    # leaves 1 GiB for the CUDA context: 37.1 fits 40 GiB, not 38.
    fits = "verdict: bf16-mixed with DDP fits 40 GiB per GPU (37.1 GiB estimated, with the weight casts " \
           "recomputed in backward, and ~1 GiB of CUDA context)."
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "40"]) == 0
    out = capsys.readouterr().out
    assert fits in out and "0.19*" in out
    assert "--train.recompute_weight_casts auto: the estimate without is over 90% of 40 GiB" in out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "38"]) == 0
    assert "needs 37.1 GiB per GPU at micro-batch 8, more than 37 GiB (38 less ~1 GiB of CUDA context); with " \
        "--train.residual_dtype compute" in capsys.readouterr().out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits 80 GiB per GPU (39.4 GiB estimated, and ~1 GiB of CUDA context)." in out and "*" not in out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "40", "--train.recompute_weight_casts", "false"]) == 0
    assert ("needs 39.4 GiB per GPU at micro-batch 8, more than 39 GiB (40 less ~1 GiB of CUDA context); with "
            "--train.recompute_weight_casts true it fits (37.1 GiB estimated)") in capsys.readouterr().out
    # Not for a config whose precision would refuse the flag.
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "40", "--train.recompute_weight_casts", "false",
                 "--train.precision", "fp32"]) == 0
    assert "--train.recompute_weight_casts true" not in capsys.readouterr().out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "80", "--train.recompute_weight_casts", "true"]) == 0
    assert "fits 80 GiB per GPU (37.1 GiB estimated, with the weight casts" in capsys.readouterr().out
    assert main(["info", "--preset", "gpt-1.4b", "--json", "--train.recompute_weight_casts", "true"]) == 0
    rows = json.loads(capsys.readouterr().out)["memory_gib"]
    assert {(r["precision"], r["strategy"], r["activation_checkpointing"]) for r in rows if r["recompute_casts"]} \
        == {("bf16-mixed", "ddp", False)}  # marked only where recasting changes anything
    # What train would refuse on a GPU, info refuses too.
    assert main(["info", "--preset", "gpt-1.4b", "--train.recompute_weight_casts", "true", "--train.compile",
                 "off"]) == 2
    assert "--train.recompute_weight_casts true needs torch.compile" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "38", "--train.compile", "off", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ddp_bf16_mixed_recompute_weight_casts_gib"] is None  # eager: no use
    assert not any(row["recompute_casts"] for row in out["memory_gib"])
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "38", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["memory_gib"]
    # Only compiled mixed precision without FSDP or activation checkpointing recomputes them.
    assert {(r["precision"], r["strategy"], r["activation_checkpointing"]) for r in rows if r["recompute_casts"]} \
        == {("bf16-mixed", "ddp", False)}


def test_info_counts_the_residual_stream_in_its_dtype(capsys):
    """The mixed-precision rows count the LayerNorm inputs in the residual stream's dtype: fp32 under DDP by
    default, 16 bits under FSDP (it casts each block's input) and with --train.residual_dtype compute."""
    def bf16_rows(*flags):
        assert main(["info", "--preset", "gpt-1.4b", "--json", *flags]) == 0
        rows = json.loads(capsys.readouterr().out)["memory_gib"]
        return {(r["strategy"], r["gpus"], r["activation_checkpointing"]): r for r in rows
                if r["precision"] == "bf16-mixed"}

    auto, half = bf16_rows(), bf16_rows("--train.residual_dtype", "compute")
    assert {k: r["residual_16bit"] for k, r in auto.items()} == {k: k[0] == "fsdp" for k in auto}
    assert all(r["residual_16bit"] for r in half.values())
    ddp = ("ddp", 1, False)
    assert auto[ddp]["activations"] - half[ddp]["activations"] == pytest.approx(1.53, abs=0.01)  # GiB
    assert all(auto[k] == half[k] for k in auto if k[0] == "fsdp")
    assert main(["info", "--preset", "gpt-1.4b"]) == 0
    assert "activ.: the mixed-precision rows with the residual stream in fp32 under DDP, in 16 bits under FSDP" \
        in capsys.readouterr().out
    # Where it makes DDP fit, the verdict says so: 37.1 GiB with the weight casts recomputed, 35.6 with a 16-bit
    # stream as well (and 1 GiB of CUDA context: 37 GiB).
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "37"]) == 0
    assert ("verdict: bf16-mixed with DDP needs 37.1 GiB per GPU at micro-batch 8, more than 36 GiB (37 less ~1 GiB "
            "of CUDA context); with "
            "--train.residual_dtype compute (the residual stream in 16 bits) it fits (35.6 GiB estimated, with the "
            "weight casts recomputed in backward).") in capsys.readouterr().out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "36", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ddp_bf16_mixed_residual_compute_gib"] == pytest.approx(35.6, abs=0.05)
    # Not where the config's precision has one dtype, nor where activation checkpointing is what makes it fit
    # (the verdict's row is DDP without it).
    for flags in (["--train.precision", "fp32"], ["--train.precision", "bf16-pure"]):
        assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "36", *flags]) == 0
        assert "--train.residual_dtype compute" not in capsys.readouterr().out
    assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "30", "--train.activation_checkpointing", "true"]) == 0
    assert "It fits with DDP with activation checkpointing" in capsys.readouterr().out
    for flags in (["--train.residual_dtype", "compute"], ["--train.compile", "off"]):  # already, or no saving
        assert main(["info", "--preset", "gpt-1.4b", "--gpu-mem", "36", "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["ddp_bf16_mixed_residual_compute_gib"] is None
    # What train would refuse, info refuses too.
    assert main(["info", "--preset", "gpt-1.4b", "--dist.strategy", "fsdp", "--train.residual_dtype", "fp32"]) == 2
    assert "--train.residual_dtype fp32: FSDP casts every block's input to its 16-bit" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--train.precision", "bf16-pure", "--train.residual_dtype",
                 "compute"]) == 2
    assert "this run's precision is bf16-pure, which has one dtype throughout" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--dist.strategy", "fsdp", "--train.compiled_autograd", "true"]) == 2
    assert "--train.compiled_autograd true: FSDP2's backward hooks cannot be traced" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--train.compile", "off", "--train.compiled_autograd", "true"]) == 2
    assert "--train.compiled_autograd true needs torch.compile" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--train.compiled_autograd", "true"]) == 0  # a GPU run compiles


def test_info_estimates_the_loss_the_run_will_use(capsys):
    logits = {}
    for scope in ("model", "blocks"):
        assert main(["info", "--preset", "gpt-1.4b", "--json", "--train.compile_scope", scope]) == 0
        rows = json.loads(capsys.readouterr().out)["memory_gib"]
        logits[scope] = next(r["logits"] for r in rows if r["precision"] == "bf16-mixed" and r["strategy"] == "ddp"
                             and not r["activation_checkpointing"])
    # The compiled plain loss (16-bit logits) vs the chunked one, which stays on where the head is not compiled.
    assert 0.77 < logits["model"] < 1.5 < logits["blocks"] < 2, logits


def test_info_json(capsys):
    assert main(["info", "--preset", "gpt2-124m", "--json", "--gpus", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"] == 124_475_904
    assert d["eval_flop_share"] == pytest.approx(20 / (20 + 500 * 3))
    assert main(["info", "--preset", "gpt2-124m"]) == 0
    assert "every 500 steps of 1 micro-step)\n" in capsys.readouterr().out  # under EVAL_SHARE_HINT: no advice
    assert {r["strategy"] for r in d["memory_gib"]} == {"ddp", "fsdp"}


@pytest.mark.parametrize("argv, message", [
    (["info", "--preset", "gpt5"], "--preset: unknown preset 'gpt5'; choose one of tiny, demo,"),
    (["info", "--preset", "tiny", "--model.n_heads", "3"], "--model.n_heads: 3 does not divide --model.emb_dim 64"),
    (["info", "--preset", "tiny", "--model.emb_dim", "0"], "--model.emb_dim: 0 must be a positive integer"),
    (["info", "--config", "missing.toml"], "--config: file 'missing.toml' does not exist"),
    (["info", "--preset", "tiny", "--optim.nope", "1"], "--optim.nope: no such setting"),
    (["info", "--preset", "tiny", "--gpus", "0"], "--gpus: 0 must be at least 1"),
    (["train", "--preset", "tiny", "--train.precision", "fp8"], "--train.precision: 'fp8' is not allowed"),
    (["info", "--preset", "tiny", "--train.precision", "fp32", "--train.fp8", "true"],
     "--train.fp8: needs bf16 compute, but --train.precision is fp32"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_info_estimates_fp8_without_torchao(capsys, monkeypatch):
    """The estimate needs no torchao: a laptop plans an fp8 run without it (the run itself would need it)."""
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    assert main(["info", "--preset", "tiny", "--train.fp8", "true", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["memory_gib"]
    assert {r["precision"] for r in rows if r["fp8"]} == {"bf16-mixed", "bf16-pure"}


def test_info_json_reaches_stdout_under_quiet(tmp_path):
    from tests.helpers import run_cli

    r = run_cli(["-q", "info", "--preset", "tiny", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert "parameters" in d


def test_a_bare_train_says_it_runs_the_demo_on_the_console_and_in_train_log(tmp_path, monkeypatch, capsys):
    """`gpttrain train` with no arguments runs the demo and says so first; the line reaches train.log too (the
    run's logging is set up by then). The demo itself is swapped for the tiny preset here."""
    import gpttrain.run
    from gpttrain import cli
    from tests.helpers import make_data, tiny_config

    real = gpttrain.run.run_training
    seen = {}

    def tiny_run(cfg, quiet=False, note=None):
        seen.update(preset=cfg.preset, note=note)
        run = tmp_path / ("run" if note else "run-2")
        return real(tiny_config(make_data(tmp_path), run, "--train.max_steps", "1", "--log.sample_every", "0"),
                    quiet=quiet, note=note)

    monkeypatch.setattr(gpttrain.run, "run_training", tiny_run)
    monkeypatch.setattr(sys, "argv", ["gpttrain", "train"])
    assert cli.main() == 0
    assert seen == {"preset": "demo", "note": cli.DEMO_NOTE}
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert log_text.splitlines()[0].endswith(cli.DEMO_NOTE)
    assert cli.DEMO_NOTE in capsys.readouterr().out  # the console: our log lines go to stdout
    monkeypatch.setattr(sys, "argv", ["gpttrain", "train", "--preset", "tiny"])  # not bare: no such line
    assert cli.main() == 0 and seen["note"] is None


def test_resume_without_a_preset_continues_with_the_checkpoints_settings(tmp_path, monkeypatch, capsys):
    """`train --run-dir R --resume auto` with neither --preset nor --config takes the settings R's newest checkpoint
    was saved with (not the demo's), the flags on top, and says so; `--resume PATH` those of PATH. A preset given
    is used as it is: its model does not fit the checkpoint, which is refused."""
    from tests.helpers import make_data, read_metrics

    data = make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    first = ["train", "-q", "--preset", "tiny", "--data", str(data), "--run-dir", "runs/a", "--device", "cpu",
             "--train.checkpoint_every", "2", "--log.sample_every", "0", "--optim.lr", "2e-3"]
    assert main([*first, "--train.max_steps", "4"]) == 0
    saved = json.loads((tmp_path / "runs/a/config.json").read_text())
    assert main(["train", "-q", "--run-dir", "runs/a", "--resume", "auto", "--train.max_steps", "6"]) == 0
    records = read_metrics(tmp_path / "runs/a")
    assert [r["step"] for r in records if r["kind"] == "resume"] == [4]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 6
    now = json.loads((tmp_path / "runs/a/config.json").read_text())
    assert now["preset"] == "tiny" and now["optim"]["lr"] == 2e-3 and now["data"] == saved["data"]
    assert now == {**saved, "train": {**saved["train"], "max_steps": 6}, "run": {**saved["run"], "resume": "auto"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "prepared", "runs"]  # no demo corpus prepared
    log_text = (tmp_path / "runs/a/train.log").read_text()
    assert ("--resume without --preset or --config: the settings saved in "
            "runs/a/checkpoints/step-000000004/state.json, this command's flags on top") in log_text
    # The files there are named (no samples.txt: --log.sample_every 0), one evaluation as one.
    assert "outputs in runs/a: config.json, metrics.jsonl, train.log, loss.pdf, loss.png, checkpoints/\n" in log_text
    assert ", 1 evaluation " in log_text

    # An earlier checkpoint of run a, without --run-dir: continuing in run a would mix two histories.
    before = sorted(p.name for p in (tmp_path / "runs/a/checkpoints").iterdir())
    lines = (tmp_path / "runs/a/metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "-q", "--resume", "runs/a/checkpoints/step-000000002", "--train.max_steps", "5"]) == 2
    assert ("error: --resume runs/a/checkpoints/step-000000002: runs/a/checkpoints already holds checkpoints at or "
            "past its step (step-000000004, step-000000006); continuing there would mix two histories; give another "
            "--run-dir") in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs/a/checkpoints").iterdir()) == before
    assert (tmp_path / "runs/a/metrics.jsonl").read_text() == lines

    # A checkpoint of run a, continued into run b.
    assert main(["train", "-q", "--resume", "runs/a/checkpoints/step-000000002", "--run-dir", "runs/b",
                 "--train.max_steps", "3"]) == 0
    records = read_metrics(tmp_path / "runs/b")
    assert [r["step"] for r in records if r["kind"] == "resume"] == [2]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 3
    capsys.readouterr()

    # A checkpoint of run a into run b, which holds its own, earlier ones: two histories again.
    lines = (tmp_path / "runs/b/metrics.jsonl").read_text()
    assert main(["train", "-q", "--resume", "runs/a/checkpoints/step-000000004", "--run-dir", "runs/b",
                 "--train.max_steps", "5"]) == 2
    assert ("error: --resume runs/a/checkpoints/step-000000004: it is not one of runs/b/checkpoints's checkpoints, and "
            "that run dir holds checkpoints of its own (step-000000003); continuing there would mix two histories; "
            "give another --run-dir (or copy the checkpoint into it and pass --resume auto)") in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs/b/checkpoints").iterdir()) == ["step-000000003"]
    assert (tmp_path / "runs/b/metrics.jsonl").read_text() == lines

    assert main(["train", "-q", "--preset", "demo", "--data", str(data), "--run-dir", "runs/a", "--resume", "auto",
                 "--device", "cpu"]) == 2
    assert "does not fit this run" in capsys.readouterr().err
    # Another model is refused before any data is prepared (the demo's default corpus here).
    assert main(["train", "-q", "--preset", "demo", "--run-dir", "runs/a", "--resume", "auto", "--device", "cpu"]) == 2
    assert ("error: cannot resume: checkpoint runs/a/checkpoints/step-000000006 does not fit this run:\n"
            "  model.context_length: checkpoint 64 vs requested 128\n") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "prepared", "runs"]


def _fake_checkpoint(run_dir, step: int, config: dict, complete: bool = True):
    """A checkpoint folder with a state.json of `config` and a manifest that covers it (no weights: only the
    settings' file is verified when they are read)."""
    from gpttrain.data.shards import file_sha256

    folder = run_dir / "checkpoints" / f"step-{step:09d}"
    folder.mkdir(parents=True)
    state = folder / "state.json"
    state.write_text(json.dumps({"config": config}))
    if complete:
        files = {name: {"size": 0, "sha256": ""} for name in ("model.safetensors", "optimizer.pt")}
        files["state.json"] = {"size": state.stat().st_size, "sha256": file_sha256(state)}
        (folder / "COMPLETE").write_text(json.dumps({"format_version": 1, "files": files}))
    return folder


def _resume_args(**kw):
    import argparse

    base = dict(preset=None, config=None, data=None, run_dir="runs/x", device=None, resume="auto", init_from=None)
    return argparse.Namespace(**{**base, **kw})


def test_resume_with_saved_settings_mends_and_refusals(tmp_path, monkeypatch):
    """The saved settings, as resuming takes them: the Hugging Face folder the run started from is not read again;
    the flags are applied before the settings are checked; a saved data path not there from this directory, or a
    key this version does not know, is refused naming the file and what to do."""
    from gpttrain.cli import config_from_args
    from gpttrain.config import resolve
    from gpttrain.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prepared").mkdir()
    saved = resolve("tiny").to_dict()
    saved["run"]["init_from"] = "hf-gone"
    saved["data"]["path"] = "prepared"
    saved["train"]["max_steps"] = 0  # no longer valid here: the flag below mends it
    _fake_checkpoint(tmp_path / "runs/x", 4, saved)
    cfg, note = config_from_args(_resume_args(), ["--train.max_steps", "9"], default_preset="demo")
    assert cfg.preset == "tiny" and cfg.train.max_steps == 9 and cfg.run.init_from is None
    assert note.endswith("runs/x/checkpoints/step-000000004/state.json, this command's flags on top")
    cfg, _ = config_from_args(_resume_args(init_from="hf-new"), ["--train.max_steps", "9"], default_preset="demo")
    assert cfg.run.init_from == "hf-new"
    with pytest.raises(ConfigError, match=r"--train.max_steps: 0 must be at least 1"):
        config_from_args(_resume_args(), [], default_preset="demo")

    saved["train"]["max_steps"] = 5
    saved["data"]["path"] = "elsewhere"
    _fake_checkpoint(tmp_path / "runs/x", 5, saved)
    with pytest.raises(ConfigError, match=r"runs/x/checkpoints/step-000000005/state.json: the run's data, 'elsewhere', "
                                          r"is not there from this directory .*; run from the directory it was "
                                          r"started in, or pass --data"):
        config_from_args(_resume_args(), [], default_preset="demo")
    cfg, _ = config_from_args(_resume_args(data="prepared"), [], default_preset="demo")
    assert cfg.data.path == "prepared"

    # A misspelled flag is said as it is (not as the saved file's).
    with pytest.raises(ConfigError, match=r"^--train.max_step: no such setting \(did you mean --train.max_steps\?\)"):
        config_from_args(_resume_args(data="prepared"), ["--train.max_step", "3"], default_preset="demo")
    saved["train"]["old_knob"] = 1
    _fake_checkpoint(tmp_path / "runs/x", 6, saved)
    with pytest.raises(ConfigError, match=r"state.json: unknown key 'train.old_knob'; .*; or resume with settings "
                                          r"given here: --preset or --config$"):
        config_from_args(_resume_args(data="prepared"), [], default_preset="demo")


@pytest.mark.parametrize("how", ["incomplete", "mistyped"])
def test_a_resume_that_cannot_be_is_refused_before_any_data(tmp_path, monkeypatch, capsys, how):
    """Without a preset, a run dir whose only checkpoint is incomplete, or a step path that is not there, is refused
    before the demo's corpus is prepared or anything written."""
    from gpttrain.config import resolve

    monkeypatch.chdir(tmp_path)
    _fake_checkpoint(tmp_path / "runs/x", 4, resolve("tiny").to_dict(), complete=False)
    if how == "incomplete":
        argv, said = ["--run-dir", "runs/x", "--resume", "auto"], (
            "error: resume auto: runs/x/checkpoints holds checkpoint folders but none is complete (step-000000004: "
            "no COMPLETE marker)")
    else:
        argv, said = ["--run-dir", "runs/y", "--resume", "runs/x/checkpoints/step-000000009"], (
            "error: --resume: checkpoint runs/x/checkpoints/step-000000009 does not exist")
    assert main(["train", "-q", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err.startswith(said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"]


def test_resume_auto_in_a_fresh_run_dir_is_still_the_demo(tmp_path, monkeypatch):
    """No checkpoint to take settings from: --resume auto without a preset starts the demo (here: its
    config, checked without training)."""
    import argparse

    from gpttrain.cli import config_from_args
    from gpttrain.config import resolve

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(preset=None, config=None, data=None, run_dir="runs/x", device=None, resume="auto",
                              init_from=None)
    cfg, note = config_from_args(args, [], default_preset="demo")
    assert note is None and cfg.preset == "demo" and cfg.model == resolve("demo").model
