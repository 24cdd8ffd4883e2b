"""The checkpoint-facing surface: gpttrain.load / generate, `gpttrain generate`, `gpttrain export`, --init-from."""

import json
import re
import shutil

import pytest
import torch

import gpttrain
from gpttrain.run import run_training
from tests.helpers import make_data, nan_for_uninitialised_weights, optional, run_cli, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = make_data(root)
    cfg = tiny_config(data, root / "run", "--train.max_steps", "40", "--train.eval_every", "40",
                      "--train.checkpoint_every", "20")
    assert run_training(cfg, quiet=True) == 0
    return root / "run"


def test_load_and_generate(run_dir):
    loaded = gpttrain.load(run_dir)
    assert loaded.checkpoint.name == "step-000000040"
    assert loaded.tokenizer.kind == "byte"
    assert not loaded.model.training
    a = gpttrain.generate(loaded, "Line 1", 20, seed=3)
    b = loaded.generate("Line 1", 20, seed=3)
    assert a == b and isinstance(a, str)
    greedy = gpttrain.generate(loaded.model, "Line 1", 20, tokenizer=loaded.tokenizer, temperature=0)
    assert greedy == gpttrain.generate(loaded, "Line 1", 20, temperature=0, seed=99)
    assert len(gpttrain.generate(loaded, "Line", 5, num_samples=3, seed=1)) == 3
    assert loaded.step == 40


def test_a_renamed_checkpoint_says_its_step(run_dir, tmp_path, caplog):
    """The step comes from the checkpoint's state, not its folder's name (a copy, a consolidated folder)."""
    copy = tmp_path / "my-model"
    shutil.copytree(run_dir / "checkpoints" / "step-000000020", copy)
    assert gpttrain.load(copy).step == 20
    from gpttrain.cli import main

    with caplog.at_level("INFO", logger="gpttrain"):
        assert main(["generate", "--checkpoint", str(copy), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert any(r.getMessage().endswith("parameters, step 20)") for r in caplog.records), caplog.text


def test_a_tied_checkpoint_loads_tied(tmp_path):
    """A run with --model.tie_embeddings true (the fixture's tiny run is untied): gpttrain.load gives one tensor
    for the embedding and the head, with the trained values (stored once in the checkpoint)."""
    data = make_data(tmp_path)
    cfg = tiny_config(data, tmp_path / "tied", "--model.tie_embeddings", "true", "--train.max_steps", "2",
                      "--log.sample_every", "0")
    assert run_training(cfg, quiet=True) == 0
    loaded = gpttrain.load(tmp_path / "tied")
    assert loaded.model.out_head.weight is loaded.model.tok_emb.weight
    from safetensors.torch import load_file

    saved = load_file(str(loaded.checkpoint / "model.safetensors"))
    assert "out_head.weight" not in saved
    assert torch.equal(loaded.model.tok_emb.weight, saved["tok_emb.weight"])


def test_inference_reads_no_optimizer_state(run_dir, tmp_path):
    """load (generate, export) neither hashes nor needs optimizer.pt (11 GB at 1.42B); resuming still does."""
    copy = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step-000000040", copy)
    (copy / "optimizer.pt").unlink()
    assert gpttrain.load(copy).step == 40
    from gpttrain.checkpoint import CheckpointError, verify

    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        verify(copy)


def test_checkpoints_and_exports_get_the_umasks_modes(run_dir, tmp_path):
    """Every file and folder of a checkpoint and of an export has the mode the umask gives (before, safetensors'
    0600 and mkdtemp's 0700 hid them from the other users of a shared run dir)."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert run_cli(["export", str(run_dir), "--out", str(tmp_path / "hf")], cwd=tmp_path).returncode == 0
    for root in (run_dir / "checkpoints" / "step-000000040", tmp_path / "hf"):
        for p in (root, *root.rglob("*")):
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_load_fills_every_weight_from_the_checkpoint(run_dir, monkeypatch):
    """gpttrain.load skips the random init (init=False): every weight must come from the checkpoint."""
    nan_for_uninitialised_weights(monkeypatch)
    loaded = gpttrain.load(run_dir)
    monkeypatch.undo()
    reference = gpttrain.load(run_dir)  # built with the random init, then loaded
    for name, p in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name


def test_generate_cli_streams_the_same_text(run_dir, tmp_path):
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "Line 4", "--max-new-tokens", "30", "--seed", "7"]
    streamed = run_cli(args, cwd=tmp_path)
    whole = run_cli([*args, "--no-stream"], cwd=tmp_path)
    assert streamed.returncode == 0, streamed.stderr
    # stdout is the text alone (a file or a pipe gets no log line); what was loaded is said on stderr.
    assert streamed.stdout.startswith("Line 4") and streamed.stdout == whole.stdout
    assert streamed.stderr.startswith(f"loaded {run_dir / 'checkpoints'}")
    ckpt = run_cli(["generate", "--checkpoint", str(run_dir / "checkpoints" / "step-000000020"), "--prompt",
                    "Line", "--max-new-tokens", "5", "--temperature", "0"], cwd=tmp_path)
    assert ckpt.returncode == 0 and "step 20" in ckpt.stderr and "step 20" not in ckpt.stdout


def test_generate_into_a_pipe_closed_early_exits_quietly(run_dir, tmp_path):
    """`gpttrain generate ... | head -c 20`: the reader leaves, generate stops without a traceback. 200 samples of
    up to 100,000 tokens each: far more than a pipe holds, so it is still writing when the reader leaves."""
    import subprocess
    import sys

    with open(tmp_path / "err.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gpttrain", "generate", "--checkpoint", str(run_dir),
                                 "--prompt", "Line", "--max-new-tokens", "100000", "--num-samples", "200",
                                 "--seed", "1"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=err)
        try:
            assert len(proc.stdout.read(20)) == 20
            proc.stdout.close()  # as head does once it has its bytes
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
        err.seek(0)
        said = err.read()
    assert rc == 141, said
    assert "Traceback" not in said and "BrokenPipe" not in said, said


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "--top-p: 1.5 must be a number in (0, 1]"),
    (["--top-p", "0"], "--top-p: 0.0 must be a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature: -1.0 must be a number >= 0"),
    (["--temperature", "1e-300"], "--temperature: 1e-300 must be 0 (greedy) or between 1e-06 and 1e+06 (below that "
                                  "it is greedy decoding in effect)"),
    (["--temperature", "1e7"], "--temperature: 10000000.0 must be 0 (greedy) or between 1e-06 and 1e+06 (above that "
                               "the logits all round to the same value: uniform sampling in effect)"),
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 must be an integer of at least 1"),
    (["--seed", "-3"], "--seed: -3 must be an integer in [0, 4294967295]"),
    (["--seed", "4294967295", "--num-samples", "2"], "--seed: 4294967295 must be at most 4294967294 with "
                                                     "--num-samples 2 (sample i uses seed + i)"),
])
def test_generate_bad_flags(run_dir, tmp_path, flags, message):
    r = run_cli(["generate", "--checkpoint", str(run_dir), "--prompt", "x", *flags], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: " + message), r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_generate_names_its_device_flag(run_dir, tmp_path):
    """The command resolves --device itself: its refusal names the flag, not gpttrain.load's keyword."""
    r = run_cli(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--device", "cuda"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --device: cuda was asked for but torch sees no CUDA GPU")
    assert "use --device cpu" in r.stderr and "device=" not in r.stderr


@pytest.mark.parametrize("how", ["latin1-file", "latin1-stdin", "directory"])
def test_generate_refuses_a_prompt_it_cannot_read(run_dir, tmp_path, how):
    """A prompt that is not UTF-8 text, from a file or standard input, or a directory: one line, exit 2, before
    anything is printed (before, a traceback after the prompt was echoed)."""
    import subprocess
    import sys

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    flags = {"latin1-file": ["--prompt-file", "latin1.txt"], "latin1-stdin": ["--prompt", "-"],
             "directory": ["--prompt-file", "."]}[how]
    r = subprocess.run([sys.executable, "-m", "gpttrain", "generate", "--checkpoint", str(run_dir), *flags],
                       input=b"\xe9\xff", capture_output=True, cwd=tmp_path, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", err
    want = "is a directory; give a text file" if how == "directory" else "is not UTF-8 text"
    assert err.startswith("error: --prompt") and want in err and len(err.strip().splitlines()) == 1, err


def test_generate_missing_or_incomplete_checkpoint(run_dir, tmp_path):
    r = run_cli(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"], cwd=tmp_path)
    assert r.returncode == 2 and "nowhere" in r.stderr and "does not exist" in r.stderr
    broken = tmp_path / "step-000000020"
    shutil.copytree(run_dir / "checkpoints" / "step-000000020", broken)
    (broken / "COMPLETE").unlink()
    r = run_cli(["generate", "--checkpoint", str(broken), "--prompt", "x"], cwd=tmp_path)
    assert r.returncode == 2 and "incomplete" in r.stderr and str(broken) in r.stderr


def test_export_hf_loads_in_transformers_with_the_same_logits(run_dir, tmp_path):
    transformers = optional("transformers")
    out = tmp_path / "hf"
    r = run_cli(["export", str(run_dir), "--format", "hf", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    loaded = gpttrain.load(run_dir)
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, loaded.model(idx), rtol=1e-4, atol=1e-4)
    again = run_cli(["export", str(run_dir), "--format", "hf", "--out", str(out)], cwd=tmp_path)
    assert again.returncode == 2 and "--out" in again.stderr


@pytest.mark.parametrize("where, message", [
    ("run", "is a checkpoint or a run dir"),
    ("above", "or holds runs"),
    ("checkpoint", "is a checkpoint or a run dir"),
    ("inside", "is or holds the checkpoint being read"),
    ("older", "is a checkpoint or a run dir"),  # another checkpoint of the run (before: replaced by the export)
    ("checkpoints", "is or holds the checkpoint being read"),
    ("beside", "lies among the run's checkpoints"),
    ("another run", "is a checkpoint or a run dir"),
    ("runs", "or holds runs"),  # a folder of runs, the one exported not among them (before: all deleted)
])
def test_export_never_overwrites_a_checkpoint(run_dir, tmp_path, where, message):
    """--out --overwrite replaces --out as a whole: a checkpoint or a run dir (this run's, its other checkpoints,
    another run's), the checkpoint's folder or one holding it or inside it, its run's checkpoints folder or a new
    folder in it are refused, and the runs are left as they were."""
    run, other = tmp_path / "copy" / "run", tmp_path / "other"
    shutil.copytree(run_dir, run)
    shutil.copytree(run_dir, other)
    ckpt = run / "checkpoints" / "step-000000040"
    out = {"run": run, "above": run.parent, "checkpoint": ckpt, "inside": ckpt / "hf",
           "older": run / "checkpoints" / "step-000000020", "checkpoints": run / "checkpoints",
           "beside": run / "checkpoints" / "hf", "another run": other, "runs": tmp_path / "others"}[where]
    if where == "runs":
        shutil.copytree(run_dir, tmp_path / "others" / "a")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli(["export", str(run), "--out", str(out), "--overwrite"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --out: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_export_into_the_current_directory_is_refused(run_dir, tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "notes.txt").write_text("mine")
    r = run_cli(["export", str(run_dir), "--out", ".", "--overwrite"], cwd=tmp_path / "here")
    assert r.returncode == 2 and "is the current directory or holds it" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary folder left beside it
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["notes.txt"]


def test_consolidate_never_writes_into_its_source(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step-000000040"
    r = run_cli(["consolidate", str(ckpt), "--out", str(ckpt / "one")], cwd=tmp_path)
    assert r.returncode == 2 and "is or holds the checkpoint being read" in r.stderr, r.stderr
    assert not (ckpt / "one").exists()


def test_export_safetensors_and_init_from(run_dir, tmp_path):
    out = tmp_path / "st"
    r = run_cli(["export", str(run_dir), "--format", "safetensors", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = tmp_path / "hf"
    assert run_cli(["export", str(run_dir), "--out", str(hf)], cwd=tmp_path).returncode == 0
    # Continued pre-training from the exported directory starts from exactly those weights.
    from gpttrain.export import load_hf

    (tmp_path / "d").mkdir()
    data = make_data(tmp_path / "d")
    cfg = tiny_config(data, tmp_path / "cont", "--run.init_from", str(hf), "--train.max_steps", "1")
    from tests.helpers import build_trainer, single_info

    trainer = build_trainer(cfg, single_info())
    _, sd = load_hf(hf, trainer.cfg.model)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, sd[name]), name
    # Shapes that differ from the config are named.
    r = run_cli(["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(tmp_path / "bad"),
                 "--init-from", str(hf), "--model.emb_dim", "32"], cwd=tmp_path)
    assert r.returncode == 2 and "tok_emb.weight" in r.stderr


@pytest.mark.parametrize("device, message", [
    ("tpu", "device='tpu' is not a device gpttrain runs on; use auto, cpu, cuda, cuda:N or mps"),
    ("", "device='' is not a device"),
    ("cpu:1", "device='cpu:1' is not a device"),
    # No CUDA here: refused as cuda is; on a GPU machine, as a GPU it does not have.
    ("cuda:5", "device='cuda:5' was asked for but torch sees no CUDA GPU"),
])
def test_load_refuses_a_device_that_is_not_one(run_dir, device, message):
    """Before, any name gpttrain did not know loaded onto the CPU without a word (cuda:1 too)."""
    from gpttrain.errors import ConfigError

    if device == "cuda:5" and torch.cuda.is_available():
        message = "device='cuda:5' does not exist" if torch.cuda.device_count() <= 5 else None
    if message is None:
        pytest.skip("this machine has a cuda:5")
    with pytest.raises(ConfigError) as e:
        gpttrain.load(run_dir, device=device)
    assert str(e.value).startswith(message) and "--device" not in str(e.value), e.value


def test_the_api_names_its_keywords(run_dir):
    """A Python caller's mistakes are named as the keywords it passed, not as the generate command's flags."""
    from gpttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("dtype='fp16' is not allowed; use one of fp32, bf16")):
        gpttrain.load(run_dir, dtype="fp16")
    loaded = gpttrain.load(run_dir)
    with pytest.raises(ConfigError, match=re.escape("seed='7' must be an integer in [0, 4294967295]")):
        loaded.generate("Line", 3, seed="7")
    with pytest.raises(ConfigError, match=re.escape("num_samples=0 must be an integer of at least 1")):
        gpttrain.generate(loaded, "Line", 3, num_samples=0)
    said = f"generate: '{run_dir}' is a path, not a model: load it first, gpttrain.generate(gpttrain.load(" \
        f"'{run_dir}'), prompt)"
    for path in (str(run_dir), run_dir):  # a path is loaded first, with gpttrain.load
        with pytest.raises(ConfigError, match=re.escape(said)):
            gpttrain.generate(path, "Line", 3)
    with pytest.raises(ConfigError, match="^top_p=1000"):  # not an OverflowError from math.isnan
        loaded.generate("Line", 3, top_p=10**400)
    # too many digits for repr (a ValueError that would replace the message)
    with pytest.raises(ConfigError, match=r"^top_p=an integer of 16610 bits must be a number in \(0, 1\]"):
        loaded.generate("Line", 3, top_p=10**5000)
    with pytest.raises(ConfigError, match=r"^seed=a negative integer of 16610 bits must be an integer in"):
        loaded.generate("Line", 3, seed=-10**5000)


@pytest.mark.parametrize("what, message", [
    ("typo", "--init-from: 'exported/typo' is not a directory"),
    ("run", "is a gpttrain run or checkpoint, not a model directory; continue it with --resume, or start from its "
            "weights: gpttrain export"),
    ("checkpoint", "is a gpttrain run or checkpoint"),
    ("safetensors", "is a --format safetensors export; --init-from reads the Hugging Face layout: export the run "
                    "again with --format hf"),
])
def test_init_from_what_is_no_model_dir_is_refused_before_the_data(run_dir, tmp_path, what, message):
    """Before, a typo was found after the text was prepared (a BPE tokenizer trained), in a message that did not
    name --init-from; a run, a checkpoint and a safetensors export got hints about missing files or n_layers 0."""
    (tmp_path / "text.txt").write_text("Line 1 of a text to prepare.\n" * 200, encoding="utf-8")
    source = {"typo": "exported/typo", "run": str(run_dir), "checkpoint": str(run_dir / "checkpoints" /
                                                                              "step-000000040"),
              "safetensors": str(tmp_path / "st")}[what]
    if what == "safetensors":
        assert run_cli(["export", str(run_dir), "--format", "safetensors", "--out", source],
                       cwd=tmp_path).returncode == 0
    r = run_cli(["train", "--preset", "tiny", "--data", "text.txt", "--run-dir", "r", "--init-from", source],
                cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --init-from: ") and message in r.stderr, r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "r").exists()  # nothing prepared, nothing written


def test_init_from_a_model_of_another_tokenizer_is_refused(run_dir, tmp_path):
    """An export records its tokenizer: data prepared with another one would train embeddings whose rows stand for
    other tokens (before: silently, val loss 10.5). Geometry mismatches are said at once from its config.json."""
    hf = tmp_path / "hf"
    assert run_cli(["export", str(run_dir), "--out", str(hf)], cwd=tmp_path).returncode == 0
    (tmp_path / "d").mkdir()
    data = make_data(tmp_path / "d", tokenizer="bpe")
    r = run_cli(["train", "--preset", "tiny", "--data", str(data), "--run-dir", "r", "--init-from", str(hf)],
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: --init-from: {hf} was trained with another tokenizer than the data's "
                               "(kind 'byte' vs the data's 'bpe'"), r.stderr
    wide = run_cli(["train", "--preset", "tiny", "--data", str(make_data(tmp_path)), "--run-dir", "w",
                    "--init-from", str(hf), "--model.emb_dim", "128", "--model.n_layers", "3"], cwd=tmp_path)
    assert wide.returncode == 2 and "--model.vocab_size" not in wide.stderr, wide.stderr
    assert f"{hf}'s config.json gives n_layers 2, emb_dim 64: set --model.n_layers 2 --model.emb_dim 64, or leave " \
        "out --preset and --config to take its model as it is (" in wide.stderr, wide.stderr


def test_init_from_without_a_preset_takes_the_model_and_tokenizer_of_the_export(run_dir, tmp_path):
    """`train --init-from DIR` alone: DIR's model (the tiny run's, not the demo preset's) and the tokenizer it was
    trained with (byte, not the demo's bpe) for the text to prepare; a flag given still wins."""
    hf = tmp_path / "hf"
    assert run_cli(["export", str(run_dir), "--out", str(hf)], cwd=tmp_path).returncode == 0
    (tmp_path / "text.txt").write_text("Line 1 of a text to prepare.\n" * 300, encoding="utf-8")
    r = run_cli(["train", "--init-from", str(hf), "--data", "text.txt", "--run-dir", "r", "--device", "cpu",
                 "--train.max_steps", "1", "--model.drop_rate", "0.1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (f"--init-from without --preset or --config: the model of {hf / 'config.json'} (vocab_size 320, "
            "context_length 64, emb_dim 64, n_heads 4, n_layers 2, qkv_bias false, tie_embeddings false, tokenizer "
            "byte), the demo preset's other settings, this command's flags on top") in r.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"] == {**json.loads((run_dir / "config.json").read_text())["model"], "drop_rate": 0.1}
    assert saved["data"]["tokenizer"] == "byte" and saved["train"]["micro_batch_size"] == 16  # the demo's
    assert run_cli(["train", "--init-from", "typo", "--data", "text.txt", "--run-dir", "t"],
                   cwd=tmp_path).stderr.startswith("error: --init-from: 'typo' is not a directory")


@pytest.mark.parametrize("prompt, message", [(None, "not NoneType"), (b"def ", "not bytes; decode it first"),
                                             ([1, 2], "not list")])
def test_generate_wants_a_text_prompt(run_dir, prompt, message):
    with pytest.raises(TypeError, match=re.escape(f"generate: prompt must be text (a str), {message}")):
        gpttrain.generate(gpttrain.load(run_dir), prompt, 5)


def test_a_damaged_newest_checkpoint_names_the_previous_one(run_dir, tmp_path, capsys):
    """A run dir means its newest checkpoint: damaged, it is refused (older weights are never used silently), and
    the refusal names the run's previous checkpoint, which generate, export and load then take as given."""
    from gpttrain.checkpoint import CheckpointError
    from gpttrain.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    newest, previous = run / "checkpoints" / "step-000000040", run / "checkpoints" / "step-000000020"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, another hash
    weights.write_bytes(bytes(data))
    damaged = f"checkpoint file {weights} is corrupt: its SHA-256 differs from the one saved"
    with pytest.raises(CheckpointError, match=re.escape(
            f"{damaged}; the previous checkpoint of {run} is {previous}: give that folder to use it")):
        gpttrain.load(run)
    with pytest.raises(CheckpointError, match=re.escape(damaged) + "$"):  # asked for by name: no other is offered
        gpttrain.load(newest)
    assert gpttrain.load(previous).step == 20
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert f"the previous checkpoint of {run} is {previous}" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(previous), "--out", str(tmp_path / "hf")]) == 0
