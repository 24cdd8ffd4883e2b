"""torch.compile per block (`--train.compile_scope blocks`) and pinned attention kernels (`--train.attention`)."""

import copy
import functools
import gc
import json
import re
import weakref

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from gpttrain.config import resolve
from gpttrain.errors import ConfigError
from gpttrain.model import build_model
from gpttrain.parallel import (
    _compiled_block_forward,
    apply_activation_checkpointing,
    attention_context,
    check_attention,
    compile_model,
)
from gpttrain.sampling import generate_ids

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or counters carried over from another test
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(resolve("tiny").model)
    with torch.no_grad():  # larger weights than the init: sharper logits, gradients far from zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(model, seed: int = 1, b: int = 2, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocab_size, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_and_grads(model, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- compile scope --------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_blocks_scope_keeps_names_and_matches_eager(checkpointing):
    eager = tiny()
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    if checkpointing:
        apply_activation_checkpointing(model)  # before compiling: the compiled function is its partial
    assert compile_model(model, "blocks", "default") is model
    assert list(model.state_dict()) == keys  # no `_orig_mod.`: checkpoints load into a plain GPT

    x, y = batch(model)
    want_loss, want_grads = loss_and_grads(eager, x, y)
    for _ in range(2):  # the second call runs the cached graph
        loss, grads = loss_and_grads(model, x, y)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
    # Both blocks ran compiled, through one shared graph, without falling back to eager.
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] > 0
    assert not counters["graph_break"]


def test_kv_cache_decoding_stays_eager_and_generates_the_same_tokens():
    eager = tiny().eval()
    model = copy.deepcopy(eager)
    cc = CompileCounter()
    compile_model(model, "blocks", "default", backend=cc)
    x, y = batch(model)
    model.train()
    model(x, y).backward()
    assert cc.frame_count == 1
    prompt = x[:, :5]
    want = generate_ids(eager, prompt, 20, temperature=0)
    assert generate_ids(model, prompt, 20, temperature=0) == want
    assert cc.frame_count == 1  # prefill and every decoded token went to the eager forward: no recompiles
    # Without a cache (and in evaluation: no grad) the blocks run eager too: no inference graph to compile.
    assert generate_ids(model, prompt, 6, temperature=0, use_cache=False) == [row[:6] for row in want]
    with torch.no_grad():
        model(x[:1], y[:1])
    assert cc.frame_count == 1


def test_model_scope_wraps_the_whole_model_and_bad_scope_is_refused():
    model = tiny()
    compiled = compile_model(model, "model", "default")
    assert compiled is not model and compiled._orig_mod is model
    with pytest.raises(ConfigError, match=r"--train\.compile_scope: 'layers'.*model or blocks"):
        compile_model(model, "layers", "default")


# ---- attention kernels ----------------------------------------------------------------------------------


def test_math_and_flash_give_the_same_loss_and_gradients():
    model = tiny()
    x, y = batch(model)
    results = {}
    for name in ("math", "flash"):
        check_attention(name, CPU, head_dim=16)
        with attention_context(name, CPU):
            results[name] = loss_and_grads(model, x, y)
    (loss_m, grads_m), (loss_f, grads_f) = results["math"], results["flash"]
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-5, atol=1e-5)
    for name, g in grads_m.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_compiled_model_traces_the_kernel_of_the_context_it_is_first_called_in():
    def traced_ops(name: str) -> set[str]:
        torch._dynamo.reset()
        ops: set[str] = set()

        def record(gm, _inputs):
            ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)

        model = tiny()
        compile_model(model, "blocks", "default", backend=aot_autograd(fw_compiler=record))
        x, y = batch(model)
        with attention_context(name, CPU):  # entered outside the compiled function, as the trainer does
            model(x, y).backward()
        return ops

    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in traced_ops("flash")
    math_ops = traced_ops("math")
    assert not any("flash" in op for op in math_ops) and "aten.bmm.default" in math_ops


@pytest.mark.parametrize("name", ["cudnn", "efficient"])
def test_cuda_only_kernels_are_refused_on_cpu(name):
    with pytest.raises(ConfigError) as err:
        check_attention(name, CPU)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"--train.attention: {name} needs a CUDA GPU")
    assert re.search(r"use auto \(PyTorch's choice\), flash or math$", msg)
    with pytest.raises(ConfigError, match=f"--train.attention: {name}"):
        attention_context(name, CPU)


def test_dropout_with_causal_attention_on_cpu():
    check_attention("math", CPU, dropout=0.1)
    with pytest.raises(ConfigError, match=r"--train\.attention: flash cannot run on cpu .*dropout 0\.1.*or math$"):
        check_attention("flash", CPU, dropout=0.1)
    cfg = resolve("tiny", None, [("model.drop_rate", "0.1")]).model
    model = build_model(cfg).train()
    x, y = batch(model)
    with attention_context("math", CPU):
        model(x, y).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    # The check draws nothing from the run's random stream.
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    check_attention("math", CPU, dropout=0.5)
    assert torch.equal(torch.rand(3), want)


def test_auto_pins_nothing():
    check_attention("auto", CPU, dropout=0.1)
    with attention_context("auto", CPU):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with attention_context("math", CPU):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


# ---- through the trainer ------------------------------------------------------------------------------------


def test_cuda_only_kernel_is_refused_before_anything_is_written(tmp_path):
    from tests.helpers import refused_train

    assert refused_train(tmp_path, "--train.attention", "cudnn") == (
        "error: --train.attention: cudnn needs a CUDA GPU and this run is on cpu; use auto (PyTorch's choice), "
        "flash or math")


def test_trainer_with_compiled_blocks_and_a_pinned_kernel_matches_eager(tmp_path):
    """The trainer's wiring: blocks compiled in place (plain parameter names in its checkpoint state) under
    --train.attention math give the losses of the eager model with PyTorch's choice of kernel."""
    from tests.helpers import build_trainer, make_data, single_info, steps_of, tiny_config

    data = make_data(tmp_path)
    runs = {}
    for name, flags in (("eager", ("--train.compile", "off")),
                        ("blocks", ("--train.compile", "on", "--train.compile_scope", "blocks",
                                    "--train.attention", "math"))):
        trainer = build_trainer(tiny_config(data, tmp_path / name, *flags), single_info())
        compiled = [getattr(b.forward, "func", None) is _compiled_block_forward for b in trainer.model.blocks]
        assert all(compiled) == (name == "blocks") and any(compiled) == (name == "blocks")
        runs[name] = (steps_of(trainer, 3), list(trainer.model.state_dict()))
    assert runs["blocks"][1] == runs["eager"][1]
    for a, b in zip(runs["blocks"][0], runs["eager"][0]):
        assert abs(a - b) < 1e-4, (runs["blocks"][0], runs["eager"][0])


# ---- recomputed weight casts (--train.recompute_weight_casts) ------------------------------------------------


def _bf16_forward(run, x, y, out: dict) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["loss"] = run(x, y)


def _forward_backward(forward, out: dict) -> None:
    forward()
    out["loss"].backward()


def test_recomputed_weight_casts_keep_the_gradients_and_drop_the_16_bit_copies(tmp_path):
    """Compiled (inductor) under bf16 autocast: the same loss and gradients, while forward no longer leaves a
    16-bit copy of every linear weight allocated for backward (2 bytes per weight less), and the peak of a step
    whose activations outweigh its gradients drops by about as much (memory from the profiler, on CPU)."""
    from gpttrain.parallel import recompute_weight_casts
    from tests.helpers import cpu_memory

    x, y = batch(tiny(), b=4, t=64)
    results = {}
    for name in ("kept", "recast"):
        torch._dynamo.reset()
        model = tiny()
        if name == "recast":
            recompute_weight_casts(model)
        out = {}
        forward = functools.partial(_bf16_forward, torch.compile(model), x, y, out)
        _forward_backward(forward, out)  # compile outside the measured runs
        model.zero_grad(set_to_none=True)
        _, held = cpu_memory(forward, tmp_path / f"{name}.json")  # what forward leaves for backward
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        # A whole step with the gradients in place, as in an accumulation micro-step after the first.
        peak, _ = cpu_memory(functools.partial(_forward_backward, forward, out), tmp_path / f"{name}-step.json")
        results[name] = (out["loss"].detach(), grads, held, peak)
    (loss_k, grads_k, held_k, peak_k), (loss_r, grads_r, held_r, peak_r) = results["kept"], results["recast"]
    # Equal up to summation order: inductor may fuse the two graphs' reductions differently (the embedding's).
    torch.testing.assert_close(loss_r, loss_k, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads_r, grads_k, rtol=1e-5, atol=1e-7)
    linears = [m.weight.numel() for m in tiny().modules() if type(m) is torch.nn.Linear]
    assert held_k - held_r == 2 * sum(linears), (held_k, held_r, linears)
    one_block = sum(linears[:4])  # qkv, proj, fc, proj: what backward may hold again at once
    assert peak_k - peak_r >= 2 * (sum(linears) - max(one_block, linears[-1])), (peak_k, peak_r, linears)


def test_recomputed_weight_casts_leave_eager_fp32_and_evaluation_alone():
    """Outside autocast (fp32) and without gradients (evaluation, sampling) the linears run as before."""
    from gpttrain.parallel import recompute_weight_casts

    plain, recast = tiny(), tiny()
    recompute_weight_casts(recast)
    x, y = batch(plain)
    loss_p, grads_p = loss_and_grads(plain, x, y)
    loss_r, grads_r = loss_and_grads(recast, x, y)
    assert torch.equal(loss_p, loss_r) and all(torch.equal(grads_p[n], grads_r[n]) for n in grads_p)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain(x), recast(x))
    assert list(plain.state_dict()) == list(recast.state_dict())


@pytest.mark.parametrize("flags, message", [
    (("--train.recompute_weight_casts", "true"),
     "error: --train.recompute_weight_casts true: precision fp32 makes no 16-bit copies of the weights; it is "
     "for --train.precision bf16-mixed or fp16-mixed"),
    (("--train.recompute_weight_casts", "true", "--train.precision", "bf16-mixed", "--train.compile", "off"),
     "error: --train.recompute_weight_casts true needs torch.compile (--train.compile on): without it autograd "
     "keeps the 16-bit weight copies whatever this flag says"),
])
def test_recomputed_weight_casts_where_they_would_do_nothing_are_refused(tmp_path, flags, message):
    from tests.helpers import refused_train

    assert refused_train(tmp_path, *flags) == message


def test_trainer_recasts_the_weights_when_asked(tmp_path):
    """The trainer's wiring: bf16-mixed, compiled, the flag on: every plain linear recasts, and steps train."""
    from gpttrain.parallel import _recast_linear_forward
    from tests.helpers import build_trainer, make_data, single_info, steps_of, tiny_config

    cfg = tiny_config(make_data(tmp_path), tmp_path / "run", "--train.precision", "bf16-mixed", "--train.compile",
                      "on", "--train.recompute_weight_casts", "true", "--optim.lr", "3e-3")
    trainer = build_trainer(cfg, single_info())
    linears = [m for m in trainer.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.forward.func is _recast_linear_forward for m in linears)
    losses = steps_of(trainer, 6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_trainer_recasts_the_weights_by_itself_where_the_run_would_not_fit(tmp_path, monkeypatch, caplog):
    """--train.recompute_weight_casts auto (the default): on where the memory estimate with the copies kept is over
    90% of the GPU's memory and recasting applies (compiled mixed precision), else off."""
    from gpttrain.memory import estimate_training_memory
    from gpttrain.parallel import _recast_linear_forward
    from gpttrain.trainer import Trainer
    from tests.helpers import build_trainer, make_data, single_info, tiny_config

    data = make_data(tmp_path)

    def trainer_on(gpu_bytes, *flags):
        monkeypatch.setattr(Trainer, "device_memory", lambda self: gpu_bytes)
        cfg = tiny_config(data, tmp_path / "run", "--train.precision", "bf16-mixed", *flags)
        trainer = build_trainer(cfg, single_info())
        linears = [m for m in trainer.model.modules() if type(m) is torch.nn.Linear]
        recast = [getattr(m.forward, "func", None) is _recast_linear_forward for m in linears]
        assert all(recast) == trainer.recast and any(recast) == trainer.recast
        return trainer

    probe = trainer_on(0, "--train.compile", "on")
    kept = estimate_training_memory(probe.cfg.model, probe.cfg.train.micro_batch_size,
                                    **probe.memory_layout(recompute_casts=False)).total
    assert not probe.recast  # no GPU memory to go by (CPU): off
    with caplog.at_level("INFO", logger="gpttrain"):
        on = trainer_on(kept / 0.95, "--train.compile", "on")
    assert on.recast  # over 90% of the GPU, and said so
    assert "recomputing the 16-bit weight casts in backward (--train.recompute_weight_casts auto)" in caplog.text
    assert "recompute_weight_casts true would save" not in on._oom_message()  # no advice to do what it does
    assert not trainer_on(kept / 0.85, "--train.compile", "on").recast  # under it
    assert not trainer_on(kept / 0.95, "--train.compile", "off").recast  # eager: autograd keeps the copies anyway
    assert not trainer_on(kept / 0.95, "--train.compile", "on", "--train.activation_checkpointing", "true").recast
    assert not trainer_on(kept / 0.95, "--train.compile", "on", "--train.recompute_weight_casts", "false").recast


def test_recomputed_weight_casts_are_refused_with_fsdp():
    from gpttrain.parallel import check_recompute_weight_casts

    with pytest.raises(ConfigError, match="FSDP already gathers the weights in 16 bits"):
        check_recompute_weight_casts("bf16-mixed", True, "fsdp")
    check_recompute_weight_casts("bf16-mixed", True, "ddp")  # accepted


# ---- the residual stream's dtype (--train.residual_dtype) ---------------------------------------------------


@pytest.mark.parametrize("setting, precision, strategy, expected", [
    ("auto", "bf16-mixed", "single", torch.float32),  # as autocast leaves it
    ("auto", "bf16-mixed", "ddp", torch.float32),
    ("auto", "bf16-mixed", "fsdp", torch.bfloat16),  # FSDP casts each block's input to bf16 anyway
    ("compute", "bf16-mixed", "single", torch.bfloat16),
    ("compute", "fp16-mixed", "ddp", torch.float16),
    ("fp32", "bf16-mixed", "ddp", torch.float32),
    ("auto", "fp32", "single", None),  # one dtype throughout
    ("auto", "bf16-pure", "ddp", None),
])
def test_residual_dtype_for_each_setting(setting, precision, strategy, expected):
    from gpttrain.memory import run_layout
    from gpttrain.parallel import residual_dtype_for, residual_is_16bit

    assert residual_dtype_for(setting, precision, strategy) is expected
    assert residual_is_16bit(setting, precision, strategy) == (expected in (torch.bfloat16, torch.float16))
    train = resolve("tiny").train
    train.residual_dtype = setting
    layout = run_layout(resolve("tiny").model, train, precision, True, 0, strategy=strategy)
    assert layout["residual_16bit"] == (expected in (torch.bfloat16, torch.float16))


@pytest.mark.parametrize("setting", ["compute", "fp32"])
def test_residual_dtype_is_refused_where_the_precision_has_one_dtype(setting):
    from gpttrain.parallel import residual_dtype_for

    for precision in ("fp32", "bf16-pure"):
        with pytest.raises(ConfigError, match=f"--train.residual_dtype {setting}: this run's precision is "
                                              f"{precision}, which has one dtype throughout"):
            residual_dtype_for(setting, precision, "single")


def test_an_fp32_residual_stream_is_refused_under_fsdp():
    from gpttrain.parallel import residual_dtype_for

    with pytest.raises(ConfigError, match="--train.residual_dtype fp32: FSDP casts every block's input to its "
                                          "16-bit compute dtype, .* use auto or compute"):
        residual_dtype_for("fp32", "bf16-mixed", "fsdp")


def _block_input_dtypes(model) -> list[torch.dtype]:
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


def test_residual_stream_in_16_bits_under_autocast():
    """`GPT.residual_dtype` bf16: every block gets (and adds to) a bf16 stream; the loss and gradients stay close
    to the fp32 stream's. float32 is what autocast leaves anyway: bit-equal to no setting at all."""
    x, y = batch(tiny(), b=4, t=64)
    results = {}
    for dtype in (None, torch.float32, torch.bfloat16):
        model = tiny()
        model.residual_dtype = dtype
        seen = _block_input_dtypes(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[dtype] = loss_and_grads(model, x, y)
        assert seen == [dtype or torch.float32] * len(model.blocks), seen
        assert all(g.dtype == torch.float32 for g in results[dtype][1].values())  # fp32 master gradients
    (loss_n, grads_n), (loss_f, grads_f), (loss_h, grads_h) = results.values()
    assert torch.equal(loss_n, loss_f) and all(torch.equal(grads_n[n], grads_f[n]) for n in grads_n)
    torch.testing.assert_close(loss_h, loss_f, rtol=1e-2, atol=0)
    for name in grads_f:  # bf16 rounding of the stream: close, not equal
        cos = torch.nn.functional.cosine_similarity(grads_h[name].flatten(), grads_f[name].flatten(), dim=0)
        assert cos > 0.99, (name, cos)


def _layer_norm_in_fp32(layer_norm):
    """F.layer_norm as CUDA's autocast runs it (its fp32 list): inputs and parameters cast to fp32 first. CPU
    autocast leaves LayerNorm in the input's dtype, so on CPU this stands in for what a GPU run saves."""
    def run(x, shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled(x.device.type):
            x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
        return layer_norm(x, shape, weight, bias, eps)
    return run


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_residual_stream_in_16_bits_saves_what_the_estimate_says(tmp_path, monkeypatch, compiled):
    """Under bf16 autocast with LayerNorm in fp32 (as on CUDA), a 16-bit stream leaves less for backward by what
    the memory estimate counts (profiler, CPU): compiled, the LayerNorm inputs in 2 bytes instead of 4 (two per
    block and the final one's); eager, nothing, since autograd saves autocast's fp32 copies of them either way."""
    from gpttrain.memory import estimate_training_memory
    from tests.helpers import cpu_memory

    monkeypatch.setattr(torch.nn.functional, "layer_norm", _layer_norm_in_fp32(torch.nn.functional.layer_norm))
    b, t = 4, 64
    x, y = batch(tiny(), b=b, t=t)
    held = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        model = tiny()
        model.residual_dtype = dtype
        out = {}
        forward = functools.partial(_bf16_forward, torch.compile(model) if compiled else model, x, y, out)
        _forward_backward(forward, out)  # compile outside the measured run
        model.zero_grad(set_to_none=True)
        _, held[dtype] = cpu_memory(forward, tmp_path / f"{dtype}.json")
        out["loss"].backward()
    cfg = tiny().cfg
    est = {h: estimate_training_memory(cfg, b, "bf16-mixed", seq_len=t, compiled=compiled,
                                       residual_16bit=h).activations for h in (False, True)}
    counted = est[False] - est[True]
    saved = held[torch.float32] - held[torch.bfloat16]
    if compiled:
        assert counted == 2 * b * t * cfg.emb_dim * (2 * cfg.n_layers + 1)
        assert counted <= saved <= 1.25 * counted, (saved, counted)
    else:
        # Nothing saved: one LayerNorm input is b * t * emb_dim * 2 = 32 KiB here. Under load the profiler once
        # saw a 4-byte difference (a scalar's allocation landing inside one window and not the other).
        assert counted == 0 and abs(saved) < 1024, saved


def test_trainer_keeps_the_residual_stream_in_16_bits_when_asked(tmp_path):
    from tests.helpers import build_trainer, make_data, single_info, steps_of, tiny_config

    cfg = tiny_config(make_data(tmp_path), tmp_path / "run", "--train.precision", "bf16-mixed",
                      "--train.residual_dtype", "compute", "--optim.lr", "3e-3")
    trainer = build_trainer(cfg, single_info())
    assert trainer.model.residual_dtype is torch.bfloat16
    seen = _block_input_dtypes(trainer.model)
    losses = steps_of(trainer, 6)
    assert set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights stay fp32


@pytest.mark.parametrize("flags, message", [
    (("--train.residual_dtype", "compute"),  # precision auto: fp32 on this CPU
     "error: --train.residual_dtype compute: this run's precision is fp32, which has one dtype throughout; the "
     "residual stream's dtype is a choice of --train.precision bf16-mixed or fp16-mixed (leave it auto)"),
    (("--train.residual_dtype", "fp32", "--train.precision", "bf16-pure"),
     "error: --train.residual_dtype fp32: this run's precision is bf16-pure, which has one dtype throughout; the "
     "residual stream's dtype is a choice of --train.precision bf16-mixed or fp16-mixed (leave it auto)"),
    (("--train.residual_dtype", "bf16"),  # the choices are the config's
     "error: --train.residual_dtype: 'bf16' is not allowed; use one of 'auto', 'fp32', 'compute'"),
])
def test_residual_dtype_where_it_would_do_nothing_is_refused(tmp_path, flags, message):
    from tests.helpers import refused_train

    assert refused_train(tmp_path, *flags) == message


def test_refused_settings_come_before_any_data_is_prepared(tmp_path):
    """train and bench check a run's settings before preparing the text they were given: a refused run leaves no
    data dir behind, as it leaves no run dir."""
    from tests.helpers import run_cli

    text = tmp_path / "book.txt"
    text.write_text("Every effort moves you. " * 400)
    message = ("error: --train.residual_dtype fp32: this run's precision is bf16-pure, which has one dtype "
               "throughout; the residual stream's dtype is a choice of --train.precision bf16-mixed or fp16-mixed "
               "(leave it auto)")
    for command in (["train", "--run-dir", str(tmp_path / "run")], ["bench", "--steps", "1", "--warmup", "0"]):
        r = run_cli([*command, "--preset", "tiny", "--device", "cpu", "--data", str(text), "--train.precision",
                     "bf16-pure", "--train.residual_dtype", "fp32"], cwd=tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == message
        assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # The attention kernel's trial too.
    r = run_cli(["train", "--run-dir", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu", "--data",
                 str(text), "--train.attention", "cudnn"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --train.attention: cudnn needs a CUDA GPU"), r.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # A --resume path that holds no checkpoint.
    (tmp_path / "empty").mkdir()
    for where, why in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "is neither a checkpoint")):
        r = run_cli(["train", "--run-dir", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu", "--data",
                     str(text), "--resume", str(where)], cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
            f"error: --resume: checkpoint {where} {why}" if why == "does not exist"
            else f"error: --resume: {where} {why}"), r.stderr[-2000:]
        assert "resolved config" not in r.stdout + r.stderr
        assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # bench with its synthetic tokens refuses the same.
    r = run_cli(["bench", "--preset", "tiny", "--device", "cpu", "--train.compile", "on",
                 "--train.recompute_dropout_masks", "true"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --train.recompute_dropout_masks true: --model.drop_rate is 0, so there are no dropout masks; drop "
        "the flag")


# ---- compiled autograd (--train.compiled_autograd) ------------------------------------------------------


def _profiled_step(trainer) -> dict[str, int]:
    """How often each operator ran in one training step, by torch.profiler's CPU events."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    return Counter(e.name for e in prof.events())


@pytest.mark.parametrize("flags", [
    (),
    # What compiled autograd must trace through: recomputed blocks, dropout's masks, the 16-bit stream.
    ("--train.activation_checkpointing", "true", "--model.drop_rate", "0.1", "--train.residual_dtype", "compute"),
    ("--train.recompute_weight_casts", "true"),  # the weight casts recomputed in backward
], ids=["plain", "checkpointing-dropout-residual", "recast"])
def test_compiled_autograd_folds_the_accumulation_into_backward(tmp_path, flags):
    """bf16-mixed, compiled, 3 micro-steps: the same accumulated gradients and losses as autograd's own
    accumulation (to fp32 rounding), two backward graphs for the whole run (the first micro-step's, whose .grad is
    unset, and the others'), and no eager accumulation: where autograd runs an AccumulateGrad for every parameter
    at every micro-step, with an aten::add_ each from the second on, the compiled backward runs neither."""
    from tests.helpers import build_trainer, first_step_grads, make_data, single_info, steps_of, tiny_config

    data = make_data(tmp_path)
    runs = {}
    for on in (False, True):
        cfg = tiny_config(data, tmp_path / f"run-{on}", "--train.precision", "bf16-mixed", "--train.compile", "on",
                          "--train.grad_accum_steps", "3", "--train.compiled_autograd", str(on).lower(), *flags)
        trainer = build_trainer(cfg, single_info())
        grads = first_step_grads(trainer)
        losses = steps_of(trainer, 3)
        events = _profiled_step(trainer)
        n_params = len(list(trainer.model.parameters()))
        trainer.close()
        runs[on] = grads, losses, events
    (plain_grads, plain_losses, plain), (grads, losses, fused) = runs[False], runs[True]
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain["torch::autograd::AccumulateGrad"] == 3 * n_params
    assert not [name for name in fused if "AccumulateGrad" in name]
    assert fused["aten::add_"] == plain["aten::add_"] - 2 * n_params
    assert counters["compiled_autograd"]["captures"] == 2


def _ddp_compiled_autograd_rank(rank, world, port, data_dir, run_dir, out):
    from tests.helpers import build_trainer, first_step_grads, gloo_rank, steps_of, tiny_config

    with gloo_rank(rank, world, port) as info:
        before = torch._dynamo.config.optimize_ddp
        result = {}
        for on in (False, True):  # plain DDP first: the Python reducer changes torch settings for good
            counters.clear()
            cfg = tiny_config(data_dir, run_dir / str(on), "--train.precision", "bf16-mixed", "--train.compile", "on",
                              "--train.grad_accum_steps", "3", "--train.compiled_autograd", str(on).lower())
            trainer = build_trainer(cfg, info)
            assert trainer.strategy == "ddp" and trainer.ddp._use_python_reducer == on
            assert torch._dynamo.config.optimize_ddp == before  # set for DDP's construction only
            grads = first_step_grads(trainer)
            result[str(on)] = {"losses": steps_of(trainer, 3), "grads": {n: g.tolist() for n, g in grads.items()}}
            # The backward was compiled, not run by autograd with the Python reducer's hooks one by one.
            assert counters["compiled_autograd"]["captures"] == (2 if on else 0)
            ddp = weakref.ref(trainer.ddp)
            trainer.close()
            gc.collect()
            assert ddp() is None  # freed: no DDP outlives the process group
            torch._dynamo.reset()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)


@pytest.mark.slow
def test_compiled_autograd_under_ddp_reduces_the_same_gradients(tmp_path):
    """Two gloo ranks, 3 micro-steps each (the middle one neither the first nor reduced): DDP's C++ reducer cannot
    run in a compiled backward, so the trainer builds DDP with its Python reducer, whose all-reduces the compiled
    backward then holds. The averaged gradients and the losses are those of plain DDP, and torch's setting is
    changed only while DDP is built."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port, make_data

    out = tmp_path / "out.json"
    mp.spawn(_ddp_compiled_autograd_rank, args=(2, free_port(), make_data(tmp_path), tmp_path / "runs", str(out)),
             nprocs=2, join=True)
    result = json.loads(out.read_text())
    on, off = result["True"], result["False"]
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-5)
    for name, g in on["grads"].items():
        torch.testing.assert_close(torch.tensor(g), torch.tensor(off["grads"][name]), rtol=1e-5, atol=1e-7)


def test_compiled_autograd_where_it_cannot_run_is_refused(tmp_path):
    from gpttrain.parallel import check_compiled_autograd
    from tests.helpers import refused_train

    # On a CPU, compile auto is off.
    assert refused_train(tmp_path, "--train.compiled_autograd", "true") == (
        "error: --train.compiled_autograd true needs torch.compile (--train.compile on): it compiles the backward "
        "of a compiled model; this run is eager")
    assert refused_train(tmp_path, "--train.compile", "on", "--train.compile_mode", "reduce-overhead",
                         "--train.compiled_autograd", "true") == (
        "error: --train.compiled_autograd true with --train.compile_mode reduce-overhead: CUDA graphs around a "
        "compiled backward that sets .grad have not been tried here; use compile_mode default or "
        "max-autotune-no-cudagraphs")
    with pytest.raises(ConfigError, match="compile_mode max-autotune: CUDA graphs"):
        check_compiled_autograd(True, "single", "max-autotune")
    with pytest.raises(ConfigError, match="FSDP2's backward hooks cannot be traced by compiled autograd"):
        check_compiled_autograd(True, "fsdp", "default")
    check_compiled_autograd(True, "ddp", "default")  # accepted
    check_compiled_autograd(True, "single", "max-autotune-no-cudagraphs")


def test_compiled_autograd_without_accumulation_warns(tmp_path, caplog):
    """At one micro-step a step there is nothing to fold: the trainer says so, once, and goes on."""
    from tests.helpers import build_trainer, make_data, single_info, tiny_config

    data = make_data(tmp_path)
    said = "--train.compiled_autograd true with --train.grad_accum_steps 1: there is no gradient accumulation"
    for accum, warned in (("1", True), ("2", False)):
        caplog.clear()
        cfg = tiny_config(data, tmp_path / f"run{accum}", "--train.precision", "bf16-mixed", "--train.compile", "on",
                          "--train.compiled_autograd", "true", "--train.grad_accum_steps", accum)
        with caplog.at_level("WARNING", logger="gpttrain"):
            trainer = build_trainer(cfg, single_info())
        trainer.close()
        assert sum(said in r.message for r in caplog.records) == int(warned), caplog.text
        assert "Python reducer" not in caplog.text  # one process: no DDP


def test_recompute_dropout_masks_keeps_the_numbers_and_drops_the_masks(tmp_path):
    """bf16-mixed, compiled, dropout 0.1: with the blocks' dropout masks drawn again in backward, the
    same masks (inductor's counter-based generator, the same seeds), so the same losses and accumulated gradients
    (to fp32 rounding); and backward keeps no mask: the bytes saved for it fall by what the memory estimate says,
    2 bytes per token and width per block, less the bytes of the seeds kept in their place. Evaluation (eval mode)
    has no dropout either way."""
    from gpttrain.memory import estimate_training_memory
    from gpttrain.parallel import _recomputed_dropout_forward
    from tests.helpers import build_trainer, first_step_grads, make_data, single_info, steps_of, tiny_config

    data = make_data(tmp_path)
    runs = {}
    for on in (False, True):
        cfg = tiny_config(data, tmp_path / f"run-{on}", "--train.precision", "bf16-mixed", "--train.compile", "on",
                          "--model.drop_rate", "0.1", "--train.recompute_dropout_masks", str(on).lower())
        trainer = build_trainer(cfg, single_info())
        redrawn = [m for m in trainer.model.modules()
                   if getattr(m.forward, "func", None) is _recomputed_dropout_forward]
        assert len(redrawn) == (2 * cfg.model.n_layers if on else 0)  # the blocks' two each, not the embeddings'
        trainer.model.eval()  # with autograd on: eval mode alone must turn the dropout off
        evaluated = trainer.model(torch.arange(cfg.model.context_length).unsqueeze(0)).detach()
        trainer.model.train()
        saved: dict[tuple, int] = {}  # what one step's forward keeps for backward, once each

        def pack(t, saved=saved):
            saved[(t.data_ptr(), t.dtype, t.shape)] = t.nbytes
            return t

        grads = first_step_grads(trainer)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.train_step()
        losses = steps_of(trainer, 3)
        layout = trainer.memory_layout()
        trainer.close()
        seeds = sum(n for (_, dtype, shape), n in saved.items() if dtype == torch.int64 and len(shape) == 1)
        runs[on] = grads, losses, sum(saved.values()), seeds, evaluated, layout
    (plain_grads, plain_losses, plain_saved, plain_seeds, plain_evaluated, layout) = runs[False]
    grads, losses, redrawn_saved, seeds, evaluated, _ = runs[True]
    assert torch.equal(evaluated, plain_evaluated)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7)
    # The two backward graphs add in different orders: five steps on, the losses agree to fp32 rounding, not to the
    # bit (1.5e-6 apart once in a full-suite run).
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    m, mb = cfg.model, cfg.train.micro_batch_size
    masks = 2 * m.n_layers * mb * m.context_length * m.emb_dim
    estimated = (estimate_training_memory(m, mb, **dict(layout, recompute_dropout=False)).total
                 - estimate_training_memory(m, mb, **dict(layout, recompute_dropout=True)).total)
    assert estimated == masks
    # The seeds: inductor's one int64 per random op of the step, kept for backward only where it draws again.
    seeds -= plain_seeds
    assert 0 < seeds <= 8 * 16
    assert plain_saved - redrawn_saved == masks - seeds


def test_recompute_dropout_masks_where_it_cannot_help_is_refused(tmp_path, capsys):
    from gpttrain.cli import main
    from tests.helpers import refused_train

    flag = ("--train.recompute_dropout_masks", "true")
    assert refused_train(tmp_path, "--train.compile", "on", *flag) == (
        "error: --train.recompute_dropout_masks true: --model.drop_rate is 0, so there are no dropout masks; drop "
        "the flag")
    # On a CPU, compile auto is off.
    assert refused_train(tmp_path, "--model.drop_rate", "0.1", *flag) == (
        "error: --train.recompute_dropout_masks true needs torch.compile (--train.compile on): eager autograd would "
        "keep each dropout's input in place of its mask, which takes more memory, not less")
    assert refused_train(tmp_path, "--model.drop_rate", "0.1", "--train.compile", "on",
                         "--train.activation_checkpointing", "true", *flag) == (
        "error: --train.recompute_dropout_masks true: --train.activation_checkpointing already recomputes every "
        "block, its dropout masks included; drop one of the two")
    # gpttrain info refuses as a GPU run would, and otherwise counts no masks.
    assert main(["info", "--preset", "gpt-1.4b", "--train.activation_checkpointing", "true", *flag]) == 2
    assert "activation_checkpointing already recomputes every block" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt-1.4b", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["memory_gib"][0]
    assert main(["info", "--preset", "gpt-1.4b", "--json", *flag]) == 0
    drawn = json.loads(capsys.readouterr().out)["memory_gib"][0]
    assert (kept["precision"], kept["activation_checkpointing"]) == ("fp32", False)
    # gpt-1.4b, micro-batch 8: 2 bytes x 8 x 1024 tokens x 2048 wide x 24 blocks.
    assert kept["activations"] - drawn["activations"] == pytest.approx(2 * 8 * 1024 * 2048 * 24 / 1024**3)


def test_redrawn_dropout_masks_leave_the_model_one_graph():
    """The checkpoint around each dropout is traced into the compiled graph, not a graph break: at a break it
    would run eagerly and keep the dropout's input, more memory than the mask it replaces."""
    from gpttrain.config import resolve
    from gpttrain.model import build_model
    from gpttrain.parallel import recompute_dropout_masks

    cfg = resolve("tiny").model
    cfg.drop_rate = 0.1
    model = build_model(cfg, torch.device("cpu"))
    recompute_dropout_masks(model)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # ... and the checkpoints are in it, one per block dropout: the patch took.
    regions = [n for g in explained.graphs for n in g.graph.nodes if "checkpoint" in str(n.target)]
    assert len(regions) == 2 * cfg.n_layers, regions
