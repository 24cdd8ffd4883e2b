"""--train.fp8: the blocks' linears through torchao's Float8Linear (on CPU here, via torch's CPU _scaled_mm)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import optional

optional("torchao")

from gpttrain.checkpoint import load_model_state, load_model_weights, model_state_for_saving  # noqa: E402
from gpttrain.config import ModelConfig  # noqa: E402
from gpttrain.errors import ConfigError  # noqa: E402
from gpttrain.fp8 import check_fp8, convert_to_fp8  # noqa: E402
from gpttrain.memory import fp8_block_weights  # noqa: E402
from gpttrain.model import GPT, build_model  # noqa: E402
from gpttrain.parallel import build_local_model  # noqa: E402
from tests.helpers import free_port  # noqa: E402

CPU = torch.device("cpu")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


def fp8_linear_type() -> type[nn.Module]:
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def batch(cfg: ModelConfig, n: int = 4) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n, cfg.context_length), generator=torch.Generator().manual_seed(1))


# ---- conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_converts_exactly_the_blocks_linears_and_keeps_names(tied):
    cfg = tiny(qkv_bias=True, tie_embeddings=tied)
    model = build_model(cfg)
    keys = list(model.state_dict())
    names = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    head = model.out_head

    assert convert_to_fp8(model) == 4 * cfg.n_layers
    f8 = fp8_linear_type()
    for block in model.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert isinstance(lin, f8)
            assert type(lin.weight) is nn.Parameter  # a plain parameter: optimizers and checkpoints see no change
    assert model.out_head is head and type(model.out_head) is nn.Linear
    assert type(model.tok_emb) is nn.Embedding and type(model.pos_emb) is nn.Embedding
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    assert list(model.state_dict()) == keys
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == names
    assert convert_to_fp8(model) == 0  # a second call converts nothing more


@pytest.mark.parametrize("world", [2, 3, 5, 128])  # 128: the fc's 256 rows divide, the others' (192, 64) do not
def test_fsdp_all_gather_in_fp8_only_where_the_rows_divide_over_the_ranks(world, caplog):
    """convert_to_fp8(fsdp_world_size=): every linear converted once, the fp8 all-gather on for those whose rows
    (out_features) divide over the ranks, and the log names the others; width 64: qkv 192, proj 64, fc 256."""
    cfg = tiny()
    with torch.device("meta"):
        model = GPT(cfg)
    with caplog.at_level("INFO", logger="gpttrain"):
        assert convert_to_fp8(model, fsdp_world_size=world) == 4 * cfg.n_layers
    gathers = {name.split(".", 1)[1]: lin.config.enable_fsdp_float8_all_gather
               for name, lin in model.blocks.named_modules() if isinstance(lin, fp8_linear_type())}
    want = {"attn.qkv": 192 % world == 0, "attn.proj": 64 % world == 0, "mlp.fc": 256 % world == 0,
            "mlp.proj": 64 % world == 0}
    assert gathers == want
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fp8:")]
    if all(want.values()):
        assert said == []
    else:
        uneven = ", ".join(sorted(k for k, v in want.items() if not v))
        assert said == [f"fp8: {sum(want.values()) * cfg.n_layers} of {4 * cfg.n_layers} fp8 linears gather their "
                        f"weights in fp8; the rows of the others ({uneven}) do not divide over {world} ranks, so "
                        "FSDP gathers them in bf16"]
    assert convert_to_fp8(model, fsdp_world_size=world) == 0
    # The memory estimate counts the same weights: those converted, those gathered in fp8 (per block).
    block = [lin for lin in model.blocks[0].modules() if isinstance(lin, fp8_linear_type())]
    assert fp8_block_weights(cfg, world) == (sum(lin.weight.numel() for lin in block),
                                             sum(lin.weight.numel() for lin in block
                                                 if lin.config.enable_fsdp_float8_all_gather))
    with torch.device("meta"):
        plain = GPT(cfg)
    convert_to_fp8(plain)  # one process or DDP: no fp8 all-gather
    assert not any(m.config.enable_fsdp_float8_all_gather for m in plain.modules() if isinstance(m, fp8_linear_type()))


def test_dims_not_divisible_by_16_stay_as_they_are():
    model = build_model(tiny(emb_dim=40))  # 40 -> 120, 40 -> 160: fp8 matmuls need multiples of 16
    assert convert_to_fp8(model) == 0
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert fp8_block_weights(tiny(emb_dim=40), 2) == (0, 0)  # the memory estimate counts none either


def test_converts_on_the_meta_device():
    cfg = tiny()
    with torch.device("meta"):
        model = GPT(cfg)
    assert convert_to_fp8(model) == 4 * cfg.n_layers
    model.to_empty(device=CPU)
    model.init_weights()
    assert model(batch(cfg), targets=batch(cfg)).isfinite()


@pytest.mark.parametrize("compile_", ["off", "on"])
def test_fp8_linears_keep_no_16bit_weight_copy_for_backward(tmp_path: Path, compile_: str):
    """bf16-mixed: a plain linear keeps its weight's bf16 copy from forward to backward (compiled: unless the casts
    are recomputed); an fp8 one keeps none (torchao saves the fp32 master weight and casts it again), eager or
    compiled. The memory estimate's 16-bit copies fall by those weights; the head's copy stays in both."""
    from gpttrain.memory import estimate_training_memory
    from tests.helpers import build_trainer, make_data, single_info, tiny_config

    data = make_data(tmp_path)
    kept, layouts = {}, {}
    for fp8 in (False, True):
        # Micro-batch 7: 448 tokens, a shape no weight has (width 64: 192, 256, vocab 320).
        cfg = tiny_config(data, tmp_path / f"run-{fp8}", "--train.precision", "bf16-mixed", "--train.compile", compile_,
                          "--train.fp8", str(fp8).lower(), "--train.micro_batch_size", "7")
        trainer = build_trainer(cfg, single_info())
        trainer.train_step()  # compiles
        shapes: set[tuple[torch.dtype, tuple[int, ...]]] = set()

        def pack(t, shapes=shapes):
            shapes.add((t.dtype, tuple(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.train_step()
        layouts[fp8] = trainer.memory_layout()
        trainer.close()
        # The 16-bit weights kept, either way round (eager keeps the transposed view autocast made).
        kept[fp8] = {shape for dtype, shape in shapes if dtype == torch.bfloat16 and len(shape) == 2}
    m = cfg.model
    d, v = m.emb_dim, m.vocab_size
    blocks = {(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)}
    blocks |= {(i, o) for o, i in blocks}
    head = {(v, d), (d, v)}
    assert len(kept[False] & blocks) == 4 and kept[False] & head  # qkv, proj, fc, mlp.proj: one way round each
    assert not kept[True] & blocks and kept[True] & head
    assert layouts[True]["fp8"] and not layouts[False]["fp8"]
    plain = estimate_training_memory(m, 7, **layouts[False])
    fp8_est = estimate_training_memory(m, 7, **layouts[True])
    assert plain.compute_copies - fp8_est.compute_copies == 2 * m.n_layers * 12 * d * d
    assert fp8_est.compute_copies == 2 * v * d


def test_info_counts_no_16bit_copies_of_fp8_weights(capsys):
    """gpttrain info --train.fp8 true: the bf16 rows hold no 16-bit copies of the blocks' linears (DDP: the head's
    alone), FSDP over 3 GPUs holds qkv's gathered weights (3 x 2048 rows) in 1 byte and the rest in 2; the fp32
    rows are those without fp8; the footnote says so."""
    from gpttrain.cli import main
    from gpttrain.memory import GIB

    def rows(*flags):
        assert main(["info", "--preset", "gpt-1.4b", "--gpus", "3", "--gpu-mem", "80", "--json", *flags]) == 0
        return {(r["precision"], r["strategy"], r["gpus"], r["activation_checkpointing"]): r
                for r in json.loads(capsys.readouterr().out)["memory_gib"]}

    plain, fp8 = rows(), rows("--train.fp8", "true")
    d, v, layers = 2048, 50304, 24
    ddp = ("bf16-mixed", "ddp", 1, False)
    assert fp8[ddp]["fp8"] and not plain[ddp]["fp8"]
    assert fp8[ddp]["compute_copies"] == pytest.approx(2 * v * d / GIB)
    assert plain[ddp]["compute_copies"] - fp8[ddp]["compute_copies"] == pytest.approx(2 * layers * 12 * d * d / GIB)
    fsdp = ("bf16-mixed", "fsdp", 3, False)
    assert plain[fsdp]["compute_copies"] - fp8[fsdp]["compute_copies"] == pytest.approx(2 * 3 * d * d / GIB)
    for key, row in fp8.items():
        if key[0] == "fp32":
            assert not row["fp8"] and row == dict(plain[key], fp8=False)
    assert main(["info", "--preset", "gpt-1.4b", "--train.fp8", "true"]) == 0
    assert "--train.fp8: the bf16 rows keep no copies of the blocks' fp8 linears" in capsys.readouterr().out


def save_weights(model: GPT, folder: Path) -> Path:
    """What checkpoint.save writes for the model: model.safetensors from model_state_for_saving."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(model_state_for_saving(model), str(folder / "model.safetensors"))
    return folder


def test_checkpoints_load_across_fp8_and_plain(tmp_path: Path):
    cfg = tiny(tie_embeddings=True)
    torch.manual_seed(0)
    fp8_model = build_model(cfg)
    convert_to_fp8(fp8_model)
    with torch.no_grad():
        for p in fp8_model.parameters():
            p.add_(torch.randn_like(p))  # weights that differ from any fresh init

    plain = build_model(cfg)
    load_model_state(plain, load_model_weights(save_weights(fp8_model, tmp_path / "fp8")))  # strict
    for (name, a), b in zip(fp8_model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name

    again = build_model(cfg)
    convert_to_fp8(again)
    load_model_state(again, load_model_weights(save_weights(plain, tmp_path / "plain")))
    for (name, a), b in zip(plain.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.out_head.weight is again.tok_emb.weight


# ---- training ------------------------------------------------------------------------------------


def train(model: GPT, idx: torch.Tensor, steps: int, precision: str, after_step=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-pure"])
def test_fp8_trains_and_starts_where_bf16_does(precision):
    cfg = tiny()
    idx = batch(cfg)
    models = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        models.append(build_local_model(cfg, torch.device("cpu"), precision, fp8=fp8))  # as the trainer builds
    bf16, fp8 = models
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        ref = bf16(idx, targets=idx).item()

    losses = train(fp8, idx, 8, precision)
    assert abs(losses[0] - ref) / ref < 0.02, (losses[0], ref)
    assert losses[-1] < 0.8 * losses[0], losses
    expected = torch.float32 if precision == "bf16-mixed" else torch.bfloat16  # master weights kept as they were
    assert {p.dtype for p in fp8.parameters()} == {expected}


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16-mixed"])
def test_refuses_precision_without_bf16(precision):
    with pytest.raises(ConfigError) as e:
        check_fp8(precision, CPU)
    msg = str(e.value)
    assert msg.startswith(f"--train.fp8: needs bf16 compute, but --train.precision is {precision}; ")
    assert "use --train.precision bf16-mixed" in msg and "\n" not in msg


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-pure"])
def test_allows_bf16_on_cpu(precision):
    check_fp8(precision, CPU)


def test_refuses_without_torchao(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao...` now fails as if not installed
    with pytest.raises(ConfigError) as e:
        check_fp8("bf16-mixed", CPU)
    msg = str(e.value)
    assert msg.startswith("--train.fp8: needs torchao, which cannot be imported (")
    assert msg.endswith('pip install "gpttrain[fp8]" (tested with torchao 0.18) or drop --train.fp8')
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="needs torchao"):
        convert_to_fp8(build_model(tiny()))


def test_refuses_gpus_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as e:
        check_fp8("bf16-mixed", torch.device("cuda", 0))
    assert str(e.value) == ("--train.fp8: NVIDIA A100-SXM4-80GB (compute capability 8.0) has no fp8 tensor cores; "
                            "fp8 needs an H100, an Ada GPU (RTX 40xx, L4, L40) or newer; drop --train.fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # an L4 or RTX 4090
    check_fp8("bf16-mixed", torch.device("cuda", 0))


def test_refuses_micro_batches_fp8_matmuls_cannot_take():
    with pytest.raises(ConfigError) as e:
        check_fp8("bf16-mixed", CPU, 3 * 100)
    assert str(e.value) == ("--train.fp8: a micro-batch of 300 tokens (--train.micro_batch_size x "
                            "--model.context_length) is not a multiple of 16, which fp8 matmuls need; change either, "
                            "or drop --train.fp8")
    check_fp8("bf16-mixed", CPU, 8 * 1024)


def test_refuses_mps():
    with pytest.raises(ConfigError, match=r"^--train\.fp8: fp8 matmuls are not available on mps; "):
        check_fp8("bf16-mixed", torch.device("mps"))


# ---- FSDP2 on 2 gloo ranks -----------------------------------------------------------------------


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    """parallel.build_fsdp_model with fp8 (converted before fully_shard); 3 steps on the same batch, once with
    each weight's fp8 scale worked out in its own all-gather, once with them all refreshed after each step."""
    import torch.distributed as dist

    from gpttrain.distributed import DistInfo
    from gpttrain.fp8 import plain_fp8_state, refresh_fsdp_scales
    from gpttrain.parallel import build_fsdp_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny()
        runs = []
        for refresh in (False, True):
            torch.manual_seed(0)  # the same draws on every rank, and as build_model's in the reference
            model = build_fsdp_model(cfg, DistInfo(rank, rank, world, CPU, "gloo"), "bf16-mixed", False, fp8=True)
            linears = {n: m for n, m in model.named_modules() if isinstance(m, fp8_linear_type())}
            assert len(linears) == 4 * cfg.n_layers
            gathered = {}  # what each fp8 linear's forward finds as its weight: FSDP's all-gathered one

            def look(mod, args, seen=gathered):
                seen[mod] = (type(mod.weight.data).__name__, getattr(mod.weight, "_data", mod.weight).dtype)

            for m in linears.values():
                m.register_forward_pre_hook(look)
            if refresh:
                refresh_fsdp_scales(model)
            # Every rank the same batch: the same training as one process.
            runs.append(train(model, batch(cfg), 3, "bf16-mixed",
                              after_step=(lambda m=model: refresh_fsdp_scales(m)) if refresh else None))
            # In fp8 where the weight's rows divide over the ranks; the others (uneven shards) in bf16.
            for name, m in linears.items():
                even = m.out_features % world == 0
                assert gathered[m] == (("Float8TrainingTensor", torch.float8_e4m3fn) if even
                                          else ("Tensor", torch.bfloat16)), (name, world)
        for name, m in linears.items():  # the scales refreshed after the last step: those of today's weights
            local = m.weight._local_tensor  # to_local() would give a view without the scale
            if m.out_features % world:
                assert type(local) is torch.Tensor
                continue
            full = plain_fp8_state({"w": m.weight})["w"].full_tensor()
            want = (torch.finfo(torch.float8_e4m3fn).max / full.abs().max().double()).float()
            assert torch.equal(local._precomputed_scale, want), name
        state = model.state_dict()
        plain = plain_fp8_state(state)
        assert {type(v.to_local()) for v in plain.values()} == {torch.Tensor}
        assert all(torch.equal(plain[k].to_local(), v.to_local()) for k, v in state.items())
        if rank == 0:
            torch.save({"losses": runs[0], "refreshed": runs[1], "keys": list(state)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])  # 3: the width's 64 rows (and the MLP's 256) split unevenly
def test_fsdp2_fp8_matches_one_process(tmp_path: Path, world: int):
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_rank, args=(world, free_port(), str(out)), nprocs=world)
    got = torch.load(out)

    cfg = tiny()
    torch.manual_seed(0)
    model = build_local_model(cfg, torch.device("cpu"), "bf16-mixed", fp8=True)
    want = train(model, batch(cfg), 3, "bf16-mixed")
    assert got["keys"] == list(model.state_dict())
    # FSDP gathers the weights in fp8, cast from the fp32 shards, as one process casts its fp32 weights (or in
    # bf16 where the shards are uneven); the norms and the head gathered in bf16 make the small difference.
    assert got["losses"] == pytest.approx(want, rel=2e-3), (got["losses"], want)
    assert got["refreshed"] == got["losses"]  # the scales of one all-reduce are those of one per weight
    assert want[-1] < want[0]


# ---- through the command line ------------------------------------------------------------------------------


def _train_losses(run_dir: Path) -> dict[int, float]:
    from tests.helpers import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.mark.slow
def test_fsdp_fp8_checkpoints_resume_exactly_and_load_without_torchao(tmp_path: Path):
    """`torchrun` on 2 FSDP ranks with --train.fp8 (weights gathered in fp8): a run resumed from its step-3
    checkpoint logs the losses of the uninterrupted one, bit for bit; the sharded checkpoint holds plain tensors,
    so `gpttrain consolidate` in a process that cannot import torchao writes the weights gpttrain.load reads from
    the shards."""
    import shutil

    import gpttrain
    from tests.helpers import make_data, run_cli, torchrun

    data = make_data(tmp_path)
    flags = ["train", "--preset", "tiny", "--data", str(data), "--dist.strategy", "fsdp", "--train.precision",
             "bf16-mixed", "--train.fp8", "true", "--train.max_steps", "6", "--train.log_every", "1",
             "--train.eval_every", "3"]
    a, b = tmp_path / "A", tmp_path / "B"
    r = torchrun([*flags, "--run-dir", str(a), "--train.checkpoint_every", "3", "--train.keep_checkpoints", "5"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(a / "checkpoints" / "step-000000003", b / "checkpoints" / "step-000000003")
    r = torchrun([*flags, "--run-dir", str(b), "--resume", "auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _train_losses(a), _train_losses(b)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
    assert want[6] < want[1]

    blocker = tmp_path / "no-torchao" / "torchao"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("torchao is blocked by this test")\n')
    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = run_cli(["consolidate", str(a), "--out", str(tmp_path / "one")], cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["generate", "--checkpoint", str(tmp_path / "one"), "--prompt", "the", "--max-new-tokens", "4"],
                cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, shards = gpttrain.load(tmp_path / "one"), gpttrain.load(a)
    for name, p in shards.model.state_dict().items():
        assert torch.equal(one.model.state_dict()[name], p), name


@pytest.mark.slow
def test_train_with_fp8_then_generate_without(tmp_path: Path):
    """`gpttrain train --train.fp8 true` trains and saves a checkpoint that plain `gpttrain generate` loads; the
    periodic sample runs through the fp8 model (no_grad decoding: fp8 linears refuse inference tensors)."""
    from tests.helpers import make_data, run_cli

    data = make_data(tmp_path)
    run = tmp_path / "run"
    r = run_cli(["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run), "--device", "cpu",
                 "--train.max_steps", "4", "--train.eval_every", "4", "--train.precision", "bf16-mixed",
                 "--train.fp8", "true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "samples.txt").read_text().startswith("--- step 4")
    g = run_cli(["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "5"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]


def test_fp8_without_bf16_is_refused_before_anything_is_written(tmp_path: Path):
    from tests.helpers import refused_train

    assert refused_train(tmp_path, "--train.fp8", "true") == (
        "error: --train.fp8: needs bf16 compute, but --train.precision is fp32; use --train.precision bf16-mixed "
        "(or bf16-pure) or drop --train.fp8")
