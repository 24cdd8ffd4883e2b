import pytest

from gpttrain.config import PRESETS, Config, from_dict, parse_dotted, resolve
from gpttrain.errors import ConfigError


def test_defaults_validate():
    cfg = resolve()
    assert isinstance(cfg, Config)
    assert cfg.model.emb_dim % cfg.model.n_heads == 0


def test_precedence_defaults_preset_toml_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[model]\nn_layers = 3\nemb_dim = 96\n[optim]\nlr = 0.01\n')
    cfg = resolve(None, toml, parse_dotted(["--model.n_layers", "5", "--optim.lr=3e-4"]))
    assert cfg.preset == "tiny"
    assert cfg.model.context_length == PRESETS["tiny"]["model"]["context_length"]  # preset
    assert cfg.model.emb_dim == 96  # TOML over preset
    assert cfg.model.n_layers == 5  # flag over TOML
    assert cfg.optim.lr == 3e-4
    assert cfg.train.seed == 1337  # dataclass default
    assert cfg.explicit == {"model.n_layers", "model.emb_dim", "optim.lr"}
    # A --preset on the command line wins over the file's.
    assert resolve("demo", toml).preset == "demo"


def test_flag_types_are_converted():
    cfg = resolve("tiny", None, parse_dotted([
        "--model.qkv_bias", "true", "--train.max_steps", "1_000", "--data.stride", "none",
        "--train.precision", "bf16-mixed", "--optim.weight_decay", "0", "--model.n-layers", "3",
    ]))
    assert cfg.model.qkv_bias is True
    assert cfg.train.max_steps == 1000
    assert cfg.data.stride is None
    assert cfg.train.precision == "bf16-mixed"
    assert cfg.optim.weight_decay == 0.0
    assert cfg.model.n_layers == 3


def test_round_trip_through_dict():
    cfg = resolve("gpt-1.4b")
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "preset, toml_text, flags, pattern",
    [
        ("nope", None, [], r"--preset: unknown preset 'nope'; choose one of tiny, demo, gpt2-124m"),
        ("tiny", None, ["--model.n_heads", "5"], r"--model.n_heads: 5 does not divide --model.emb_dim 64"),
        ("tiny", None, ["--model.n_layers", "0"], r"--model.n_layers: 0 must be a positive integer"),
        ("tiny", None, ["--model.emb_dim", "-8"], r"--model.emb_dim: -8 must be a positive integer"),
        ("tiny", None, ["--train.micro_batch_size", "0"], r"--train.micro_batch_size: 0 must be at least 1"),
        ("tiny", None, ["--data.bpe_train_mb", "-5"], r"--data.bpe_train_mb: -5.0 must be >= 0 \(0 = train the bpe"),
        ("tiny", None, ["--train.grad_accum_steps", "-1"], r"--train.grad_accum_steps: -1 must be at least 1"),
        ("tiny", None, ["--model.nlayers", "2"],
         r"--model.nlayers: no such setting \(did you mean --model.n_layers\?\); model has: --model.vocab_size"),
        ("tiny", None, ["--modle.n_layers", "2"],
         r"--modle.n_layers: unknown section 'modle' \(did you mean --model.n_layers\?\); sections are model"),
        ("tiny", None, ["--train.lr", "1"], r"--train.lr: no such setting \(did you mean --optim.lr\?\); train has"),
        ("tiny", None, ["--optim.nope", "1"], r"--optim.nope: no such setting; optim has: --optim.lr"),
        ("tiny", None, ["--model.n_layers", "two"], r"--model.n_layers: 'two' is not an integer"),
        ("tiny", None, ["--train.precision", "fp8"], r"--train.precision: 'fp8' is not allowed; use one of 'auto'"),
        ("tiny", None, ["--optim.lr", "-1"], r"--optim.lr: -1.0 must be positive"),
        ("tiny", None, ["--data.val_fraction", "1.5"], r"--data.val_fraction: 1.5 must be between 0 and 1"),
        ("tiny", None, ["--log.sample_every_epochs", "-2"],
         r"--log.sample_every_epochs: -2.0 must be >= 0 \(0 = off\)"),
        ("tiny", None, ["--model.n_layers"], r"--model.n_layers: missing value"),
        ("tiny", None, ["--train.seed", "1e30"],
         r"--train.seed: 10+19884624838656 must be an integer in \[0, 4294967295\]"),
        ("tiny", None, ["--train.seed", "-1"], r"--train.seed: -1 must be an integer in \[0, 4294967295\]"),
        ("tiny", None, ["--log.sample_temperature", "1e300"],
         r"--log.sample_temperature: 1e\+300 must be 0 \(greedy\) or between 1e-06 and 1e\+06"),
        ("tiny", None, ["stray"], r"unrecognized argument 'stray'"),
        (None, "[model]\nn_layer = 3\n", [],
         r"unknown key 'model.n_layer' \(did you mean model.n_layers\?\); model has: vocab_size"),
        (None, "[model]\nn_layers = 'three'\n", [], r"model.n_layers: 'three' is not an integer"),
        (None, "[model]\nqkv_bias = 1\n", [], r"model.qkv_bias: 1 is not true or false"),
        ("tiny", None, ["--train.recompute_weight_casts", "sometimes"],
         r"--train.recompute_weight_casts: 'sometimes' is not true or false or 'auto'$"),
        ("tiny", None, ["--train.recompute_weight_casts", "none"],
         r"--train.recompute_weight_casts: 'none' is not true or false or 'auto'$"),
        (None, "[train]\nrecompute_weight_casts = \"\"\n", [],
         r"train.recompute_weight_casts: '' is not true or false or 'auto'$"),
        (None, "[trainer]\nx = 1\n", [], r"unknown section 'trainer' \(did you mean train\?\); sections are model"),
        (None, "lr = 1\n", [], r"unknown key 'lr'; top-level keys are preset"),
        (None, "[model\n", [], r"is not valid TOML"),
        (None, "[train]\nseed = 1" + "0" * 5000 + "\n", [],  # Python refuses to read such an int: a ValueError
         r"^--config: .*bad.toml holds a value too large to read \(Exceeds the limit \(4300 digits\) for integer "
         r"string conversion: value has 5001 digits\); no setting takes one$"),
        (None, "preset = \"tinyy\"\n", [], r"^--config: .*bad.toml: preset = unknown preset 'tinyy'; choose one of"),
    ],
)
def test_bad_config_is_refused_with_a_message(tmp_path, preset, toml_text, flags, pattern):
    path = None
    if toml_text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml_text)
    with pytest.raises(ConfigError, match=pattern):
        resolve(preset, path, parse_dotted(flags))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: file '.*missing.toml' does not exist"):
        resolve(None, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"--config: '.*' is a directory; give the path of a TOML file"):
        resolve(None, tmp_path)
    (tmp_path / "utf16.toml").write_bytes("[model]\nn_layers = 2\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"--config: .*utf16.toml is not UTF-8 text \(invalid start byte at byte 0\)"):
        resolve(None, tmp_path / "utf16.toml")


def test_toml_cannot_execute_anything(tmp_path):
    # Values are data: a string that looks like code stays a string (and then fails type checks).
    marker = tmp_path / "pwned"
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\nn_layers = "__import__(\'os\').system(\'touch {marker}\')"\n')
    with pytest.raises(ConfigError):
        resolve(None, path)
    assert not marker.exists()


def test_shipped_configs_resolve():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert {p.name for p in configs} >= {"demo.toml", "gpt-1.4b.toml", "gpt2-124m.toml"}
    for p in configs:
        resolve(None, p)


def test_gpt14b_config_is_the_original_run():
    from pathlib import Path

    cfg = resolve(None, Path(__file__).resolve().parents[1] / "configs" / "gpt-1.4b.toml")
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.vocab_size, m.context_length, m.emb_dim, m.n_heads, m.n_layers) == (50304, 1024, 2048, 16, 24)
    assert (m.drop_rate, m.qkv_bias, m.tie_embeddings) == (0.1, False, False)
    assert (t.micro_batch_size, t.grad_accum_steps, t.epochs) == (8, 4, 50)
    assert (o.lr, o.weight_decay, o.scale_lr_with_world) == (5e-4, 0.1, True)
    assert t.eval_every == 5
    assert cfg.log.sample_prompt == "Every effort moves you" and cfg.log.sample_tokens == 50
    assert (cfg.log.sample_every, cfg.log.sample_every_epochs) == (0, 5.0)  # a sample every 5 epochs, as the original
    assert cfg.log == resolve("gpt-1.4b").log
    assert cfg.data.tokenizer == "gpt2" and cfg.data.val_fraction == 0.1
