"""torch.compile per block (`--train.compile_scope blocks`) and pinned attention kernels (`--train.attention`)."""

import copy
import re

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
