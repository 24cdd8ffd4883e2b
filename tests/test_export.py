import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpttrain import export as ex
from gpttrain.config import ModelConfig
from gpttrain.errors import ConfigError
from gpttrain.export import (
    check_hf_compatible,
    export_hf,
    export_safetensors,
    hf_config_to_model_config,
    init_from_hf,
    load_hf,
    load_safetensors,
    to_hf_state_dict,
)
from gpttrain.model import GPT
from tests.helpers import optional


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_cfg(**kw))
    with torch.no_grad():  # non-trivial biases and norms, so a wrong mapping cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def no_temp_dirs(parent) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---- the layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_state_dict_layout(tie, qkv_bias):
    model = tiny_model(tie_embeddings=tie, qkv_bias=qkv_bias)
    sd = to_hf_state_dict(model)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert sd["transformer.h.1.attn.c_proj.weight"].shape == (32, 32)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], model.blocks[0].attn.qkv.weight.t())
    assert sd["transformer.wpe.weight"].shape == (16, 32)
    bias = sd["transformer.h.1.attn.c_attn.bias"]
    assert bias.shape == (96,)
    if qkv_bias:
        assert torch.equal(bias, model.blocks[1].attn.qkv.bias)
    else:
        assert torch.count_nonzero(bias) == 0
    assert ("lm_head.weight" in sd) == (not tie)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in sd.values())


def test_config_json_fields(tmp_path):
    cfg = tiny_cfg(drop_rate=0.1, tie_embeddings=False)
    model = tiny_model(drop_rate=0.1, tie_embeddings=False)
    export_hf(model, cfg, tmp_path / "hf", tokenizer_spec={"kind": "byte", "vocab_size": 257, "eot_id": 96})
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    assert (hf["vocab_size"], hf["n_positions"], hf["n_embd"], hf["n_layer"], hf["n_head"]) == (97, 16, 32, 2, 4)
    assert hf["n_inner"] is None and hf["activation_function"] == "gelu_new"
    assert hf["resid_pdrop"] == hf["embd_pdrop"] == hf["attn_pdrop"] == 0.1
    assert hf["layer_norm_epsilon"] == 1e-5
    assert hf["tie_word_embeddings"] is False
    assert hf["bos_token_id"] == hf["eos_token_id"] == 96
    assert hf_config_to_model_config(hf) == tiny_cfg(drop_rate=0.1, tie_embeddings=False, qkv_bias=True)
    assert load_hf(tmp_path / "hf")[0] == cfg


def test_check_hf_compatible():
    assert check_hf_compatible(tiny_cfg()) == []
    assert check_hf_compatible(ModelConfig()) == []
    problems = check_hf_compatible(tiny_cfg(emb_dim=30))
    assert len(problems) == 1 and "--model.n_heads" in problems[0]
    with pytest.raises(ConfigError, match="--model.n_heads"):
        export_hf(tiny_model(), tiny_cfg(emb_dim=30), "unused")


# ---- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_round_trip_through_transformers(tmp_path, tie, qkv_bias):
    transformers = optional("transformers")
    cfg = tiny_cfg(tie_embeddings=tie, qkv_bias=qkv_bias)
    model = tiny_model(tie_embeddings=tie, qkv_bias=qkv_bias)
    out = tmp_path / "hf"
    export_hf(model, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert no_temp_dirs(tmp_path)

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), rtol=1e-4, atol=1e-4)

    loaded_cfg, sd = load_hf(out)
    assert loaded_cfg == cfg
    again = GPT(loaded_cfg)
    again.load_state_dict(sd)
    assert_same_weights(again, model)

    fresh = GPT(cfg)
    init_from_hf(fresh, out)
    assert_same_weights(fresh, model)
    assert (fresh.out_head.weight is fresh.tok_emb.weight) == tie


def test_transformers_save_pretrained_directory_loads(tmp_path):
    """A directory written by transformers itself (not by us) loads into our model with equal logits."""
    transformers = optional("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    cfg, _ = load_hf(tmp_path / "hf")
    assert cfg == tiny_cfg(qkv_bias=True, tie_embeddings=True)
    model = init_from_hf(GPT(cfg), tmp_path / "hf").eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)


def test_original_gpt2_key_names_and_mask_buffers(tmp_path):
    """The original GPT-2 upload names the body without `transformer.` and stores causal-mask buffers."""
    model = tiny_model(tie_embeddings=True, qkv_bias=True)
    export_hf(model, model.cfg, tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(renamed, str(tmp_path / "a" / "model.safetensors"))
    fresh = init_from_hf(GPT(model.cfg), tmp_path / "a")
    assert_same_weights(fresh, model)


def test_untied_model_from_tied_checkpoint_copies_the_embedding(tmp_path):
    tied = tiny_model(tie_embeddings=True)
    export_hf(tied, tied.cfg, tmp_path / "hf")
    untied = init_from_hf(GPT(tiny_cfg(tie_embeddings=False)), tmp_path / "hf")
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert torch.equal(untied.out_head.weight, tied.tok_emb.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_plain_safetensors_round_trip(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie)
    spec = {"kind": "byte", "vocab_size": 257, "eot_id": 256}
    export_safetensors(model, {"model": {"tie_embeddings": tie}}, tmp_path / "st", tokenizer_spec=spec)
    cfg_dict, sd, tok = load_safetensors(tmp_path / "st")
    assert cfg_dict == {"model": {"tie_embeddings": tie}} and tok == spec
    fresh = GPT(model.cfg)
    fresh.load_state_dict(sd)
    assert_same_weights(fresh, model)
    names = load_file(str(tmp_path / "st" / "model.safetensors")).keys()
    assert "blocks.0.attn.qkv.weight" in names and ("out_head.weight" in names) == (not tie)


# ---- refusals --------------------------------------------------------------------------------------


def test_shape_mismatch_names_each_parameter(tmp_path):
    model = tiny_model()
    export_hf(model, model.cfg, tmp_path / "hf")
    with pytest.raises(ConfigError) as e:
        init_from_hf(GPT(tiny_cfg(vocab_size=101, context_length=32)), tmp_path / "hf")
    msg = str(e.value)
    assert "tok_emb.weight" in msg and "(97, 32)" in msg and "(101, 32)" in msg
    assert "pos_emb.weight" in msg and "(16, 32)" in msg and "(32, 32)" in msg
    assert "--model.vocab_size 97" in msg
    with pytest.raises(ConfigError, match="--model.n_layers 2"):
        init_from_hf(GPT(tiny_cfg(n_layers=1)), tmp_path / "hf")
    with pytest.raises(ConfigError, match="--model.n_layers 2"):
        init_from_hf(GPT(tiny_cfg(n_layers=3)), tmp_path / "hf")
    with pytest.raises(ConfigError, match="--model.n_heads 4"):
        init_from_hf(GPT(tiny_cfg(n_heads=2)), tmp_path / "hf")
    with pytest.raises(ConfigError, match="c_fc"):
        init_from_hf(GPT(tiny_cfg(emb_dim=64)), tmp_path / "hf")


def test_nonzero_qkv_bias_needs_qkv_bias_true(tmp_path):
    model = tiny_model(qkv_bias=True)
    export_hf(model, model.cfg, tmp_path / "hf")
    with pytest.raises(ConfigError, match="non-zero qkv biases.*--model.qkv_bias true"):
        init_from_hf(GPT(tiny_cfg(qkv_bias=False)), tmp_path / "hf")


def test_separate_head_refused_for_a_tied_model(tmp_path):
    model = tiny_model(tie_embeddings=False)
    export_hf(model, model.cfg, tmp_path / "hf")
    with pytest.raises(ConfigError, match="--model.tie_embeddings false"):
        init_from_hf(GPT(tiny_cfg(tie_embeddings=True)), tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_a_lost_tie_is_refused_before_the_head_is_dropped(tmp_path, fmt):
    """A config saying "tied" over a model whose head became its own tensor with other values: both exports
    would store the embedding alone and lose the head, so they refuse and write nothing."""
    model = tiny_model(tie_embeddings=True)
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach() + 1.0)
    out = tmp_path / "out"

    def export():
        return export_hf(model, model.cfg, out) if fmt == "hf" else export_safetensors(model, {}, out)

    with pytest.raises(ConfigError, match="tie_embeddings is true but the model's output head is a separate tensor"):
        export()
    assert not out.exists() and no_temp_dirs(tmp_path)
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach().clone())  # separate, equal: fine
    assert export() == out and (out / "model.safetensors").is_file()


def test_non_empty_out_dir_refused_and_overwrite(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(tiny_model(), tiny_cfg(), out)  # an empty directory is fine
    (out / "keep.txt").write_text("user file")
    with pytest.raises(ConfigError, match="--out.*not empty"):
        export_hf(tiny_model(seed=1), tiny_cfg(), out)
    assert (out / "keep.txt").exists()
    with pytest.raises(ConfigError, match="--out.*not empty"):
        export_safetensors(tiny_model(seed=1), {}, out)
    other = tiny_model(seed=1)
    export_hf(other, tiny_cfg(), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert_same_weights(init_from_hf(GPT(tiny_cfg()), out), other)
    assert no_temp_dirs(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out.*not a directory"):
        export_hf(other, tiny_cfg(), tmp_path / "file", overwrite=True)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_model(), tiny_cfg(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_pickle_only_directory_is_refused_without_loading_it(tmp_path, monkeypatch):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 97, "n_positions": 16,
                                               "n_embd": 32, "n_layer": 2, "n_head": 4}))
    (d / "pytorch_model.bin").write_bytes(b"not looked at")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ConfigError, match="pytorch_model.bin.*safetensors"):
        load_hf(d)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_hf(tmp_path / "empty")
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cfg-only.*model.safetensors"):
        load_hf(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf(d)
    (d / "config.json").write_text('{"n_embd": 1' + "0" * 5000 + "}")  # json's int-digit limit: a plain ValueError
    with pytest.raises(ConfigError, match="config.json: not valid JSON .*5001 digits"):
        load_hf(d)


@pytest.mark.parametrize("change, key", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 100}, "n_inner"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"model_type": "llama"}, "model_type"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_head": 5}, "--model.n_heads"),
    ({"n_layer": 0}, "n_layer"),
])
def test_unsupported_hf_configs_are_refused(tmp_path, change, key):
    model = tiny_model()
    export_hf(model, model.cfg, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf.update(change)
    path.write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=key):
        load_hf(tmp_path / "hf")


def test_hf_defaults_fill_missing_keys():
    cfg = hf_config_to_model_config({"model_type": "gpt2"})
    assert cfg == ModelConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                              drop_rate=0.1, qkv_bias=True, tie_embeddings=True)
    assert hf_config_to_model_config({"activation_function": "gelu_pytorch_tanh"}).emb_dim == 768


@pytest.mark.parametrize("recorded, want", [
    ({"kind": "bpe", "vocab_size": 300}, "bpe"),  # the kind, not the file: see init_from_settings
    ({"kind": "byte"}, "byte"),
    (None, None),  # a GPT-2 from elsewhere records none
])
def test_init_from_takes_the_kind_of_tokenizer_an_export_records(tmp_path, recorded, want):
    """A bpe's file is not taken: text prepared with it would replace the data dir of the same text's trained bpe
    (named by source, kind and size), which the exported run may still use."""
    import json

    from gpttrain.export import init_from_settings

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"gpttrain": {"tokenizer": recorded}} if recorded else {}))
    assert init_from_settings(tmp_path)[1] == want
