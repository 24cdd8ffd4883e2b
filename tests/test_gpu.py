"""Checks that only a CUDA GPU can run (`pytest -m gpu` on a GPU machine; skipped elsewhere)."""

import json

import pytest
import torch
import torch.nn.functional as F

from gpttrain.loss import linear_cross_entropy
from tests.helpers import build_trainer, make_data, optional, read_metrics, run_cli, steps_of, take_steps, tiny_config

pytestmark = pytest.mark.gpu


def test_chunked_loss_matches_reference_under_bf16_autocast():
    torch.manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(8192, 256, device="cuda")).requires_grad_()
    t = torch.randint(0, 8192, (4096,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, 1000)
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref.backward()
    torch.testing.assert_close(gh, h.grad, rtol=3e-2, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=3e-2, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-pure"])
def test_training_steps_on_cuda_lower_the_loss(tmp_path, precision):
    from gpttrain.distributed import DistInfo

    data = make_data(tmp_path)
    cfg = tiny_config(data, tmp_path / "run", "--run.device", "cuda", "--train.precision", precision,
                      "--train.compile", "on", "--optim.lr", "3e-3")
    trainer = build_trainer(cfg, DistInfo(0, 0, 1, torch.device("cuda", 0), None))
    assert not trainer.model.chunked_loss  # compiled: the plain loss, which inductor fuses, is the default
    losses = steps_of(trainer, 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_training_steps_never_wait_for_the_gpu(tmp_path, precision):
    """CUDA's sync debug mode raises on any host sync (.item(), a blocking copy...) inside the steps."""
    from gpttrain.distributed import DistInfo

    data = make_data(tmp_path)
    cfg = tiny_config(data, tmp_path / "run", "--run.device", "cuda", "--train.precision", precision,
                      "--train.compile", "on", "--train.grad_accum_steps", "2")
    trainer = build_trainer(cfg, DistInfo(0, 0, 1, torch.device("cuda", 0), None))
    take_steps(trainer, 2)  # compile and warm-up (the pinned-memory pool and the allocator fill here)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = take_steps(trainer, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(s.finite for s in stats)


def test_a_step_is_read_without_waiting_for_the_work_queued_after_it():
    """A step's numbers go to pinned memory behind an event: reading them waits for that step alone, so the
    loop can read a log step once the next one is queued without draining the queue (the GPU keeps busy)."""
    from gpttrain.steps import StepStats, read_steps

    packed = torch.arange(4, dtype=torch.float32, device="cuda")
    first, second = StepStats(packed, 1, False), StepStats(packed * 2, 1, False)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles, queued after both steps
    read_steps([first, second])
    assert not torch.cuda.current_stream().query()  # the sleep still runs: the read did not wait for it
    torch.cuda.synchronize()
    assert first.values == [0.0, 1.0, 2.0, 3.0] and second.values == [0.0, 2.0, 4.0, 6.0]


def test_a_run_on_cuda_logs_late_records_with_the_memory_peak(tmp_path):
    """fit() on the GPU with log steps read once the next step is queued: every record is there, at its step,
    with the memory peak that travelled in the step's own all-reduce."""
    from gpttrain.distributed import DistInfo

    cfg = tiny_config(make_data(tmp_path), tmp_path / "run", "--run.device", "cuda", "--train.precision",
                      "bf16-mixed", "--train.max_steps", "7", "--train.log_every", "2", "--train.eval_every", "100",
                      "--log.sample_every", "0")
    trainer = build_trainer(cfg, DistInfo(0, 0, 1, torch.device("cuda", 0), None))
    assert trainer.fit() == 0
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 7]
    peak = torch.cuda.max_memory_allocated(0) / 2**30
    assert all(0 < r["mem_peak_gib"] <= peak for r in train), train


SPEED_OPTIONS = {
    "flash": ("--train.attention", "flash"),
    "cudnn": ("--train.attention", "cudnn"),
    "efficient": ("--train.attention", "efficient"),
    "blocks": ("--train.compile_scope", "blocks"),
    "fp8": ("--train.fp8", "true"),
    "fused_loss": ("--train.fused_loss", "on"),  # the chunked loss, compiled (the default only in eager mode)
    "recast": ("--train.recompute_weight_casts", "true"),
    "dropout_masks": ("--model.drop_rate", "0.1", "--train.recompute_dropout_masks", "true"),
    # Two micro-steps: the second one's accumulation is what compiled autograd folds into backward.
    "compiled_autograd": ("--train.compiled_autograd", "true", "--train.grad_accum_steps", "2"),
    # fp8's linears are autograd Functions over tensor subclasses, which compiled autograd must trace too.
    "compiled_autograd_fp8": ("--train.compiled_autograd", "true", "--train.grad_accum_steps", "2", "--train.fp8",
                              "true"),
}


# The compute capability below which an option is refused at start (a ConfigError, reported as a skip):
# flash and cuDNN attention need Ampere, fp8 matmuls Ada or Hopper. Refused on a card that has it: a failure.
NEEDS_CAPABILITY = {"flash": (8, 0), "cudnn": (8, 0), "fp8": (8, 9), "compiled_autograd_fp8": (8, 9)}


@pytest.mark.parametrize("option", list(SPEED_OPTIONS))
def test_speed_options_train_on_cuda_without_host_syncs(tmp_path, option):
    """Each speed option on the GPU: finite steps that lower the loss, and no host sync after warm-up. A kernel
    or fp8 this GPU cannot run is refused at start with a ConfigError: a skip, with the reason, on a card below
    the option's compute capability; a failure on one that has it."""
    from gpttrain.distributed import DistInfo
    from gpttrain.errors import ConfigError

    if "fp8" in option:
        optional("torchao")
    data = make_data(tmp_path)
    # Width 128 (head size 32): every fused kernel and fp8 matmul (dims multiples of 16) can take it.
    common = ("--run.device", "cuda", "--train.precision", "bf16-mixed", "--optim.lr", "3e-3", "--model.emb_dim", "128")
    cuda0 = DistInfo(0, 0, 1, torch.device("cuda", 0), None)
    cfg = tiny_config(data, tmp_path / "run", *common, "--train.compile", "on", *SPEED_OPTIONS[option])
    try:
        trainer = build_trainer(cfg, cuda0)
    except ConfigError as e:
        capability = torch.cuda.get_device_capability(0)
        if capability >= NEEDS_CAPABILITY.get(option, (0, 0)):
            raise
        pytest.skip(f"refused on {torch.cuda.get_device_name(0)} (compute capability {capability}): {e}")
    stats = take_steps(trainer, 3)  # compile and warm-up
    if option != "dropout_masks":  # eager and compiled draw other masks (its own test compares the gradients)
        # The first step equals eager's without the option (same seed, data, settings), to bf16's rounding (fp8:
        # its own): a wrong loss or gradient scale shows here, where the falling loss below would hide it.
        kept = [f for k, v in zip(SPEED_OPTIONS[option][::2], SPEED_OPTIONS[option][1::2])
                if k in ("--train.grad_accum_steps", "--model.drop_rate") for f in (k, v)]
        plain = build_trainer(tiny_config(data, tmp_path / "plain", *common, "--train.compile", "off", *kept), cuda0)
        first = take_steps(plain, 1)[0]
        rel = 0.05 if "fp8" in option else 0.02
        assert stats[0].loss == pytest.approx(first.loss, rel=rel), (stats[0].loss, first.loss)
        assert stats[0].grad_norm == pytest.approx(first.grad_norm, rel=5 * rel), (stats[0].grad_norm, first.grad_norm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here on nothing may wait for the GPU
    try:
        stats += take_steps(trainer, 22)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = [s.loss for s in stats]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, losses


def _two_compiled_steps_on_cuda(cfg, patch=None) -> tuple[int, int, float, dict]:
    """Two forward and backward passes of `cfg`'s model, compiled, under bf16 autocast, on one 16-sequence batch
    (the second with compiled code and gradients in place, as in an accumulation step; torch seeded alike for
    each, so dropout draws the same seeds), `patch(model)` applied first: the bytes forward leaves allocated for
    backward, the step's peak above what was allocated before it, the last loss and the gradients."""
    from gpttrain.model import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (16, cfg.context_length + 1), generator=g).cuda()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cuda"))
    if patch is not None:
        patch(model)
    run = torch.compile(model)
    for step in range(2):
        torch.manual_seed(1 + step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(x[:, :-1], x[:, 1:])
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return held, peak, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recomputed_weight_casts_free_the_16_bit_copies_on_cuda():
    """Compiled, bf16 autocast, activations outweighing the gradients: what forward leaves allocated for backward
    and the step's peak both drop by about the 16-bit weight copies (2 bytes per linear weight), and the
    gradients stay those of the kept copies."""
    from gpttrain.config import resolve
    from gpttrain.model import build_model
    from gpttrain.parallel import recompute_weight_casts

    cfg = resolve("tiny").model
    cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.context_length = 512, 4, 4096, 256
    held_k, peak_k, _, grads_k = _two_compiled_steps_on_cuda(cfg)
    held_r, peak_r, _, grads_r = _two_compiled_steps_on_cuda(cfg, recompute_weight_casts)
    copies = 2 * sum(p.numel() for n, p in build_model(cfg, torch.device("meta")).named_parameters()
                     if p.dim() == 2 and "emb" not in n)
    assert held_k - held_r >= 0.95 * copies, (held_k, held_r, copies)
    assert peak_k - peak_r >= 0.5 * copies, (peak_k, peak_r, copies)  # one block's copies may be back at once
    torch.testing.assert_close(grads_r, grads_k, rtol=1e-3, atol=1e-5)


def test_redrawn_dropout_masks_on_cuda():
    """Compiled, bf16 autocast, dropout 0.1: with the blocks' masks drawn again in backward, forward leaves about
    their bytes (1 per element, two per block) less allocated for backward, and the loss and gradients are those
    of the kept masks: triton's generator draws the same numbers from the same seeds in backward."""
    from gpttrain.config import resolve
    from gpttrain.parallel import recompute_dropout_masks

    cfg = resolve("tiny").model
    cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.context_length, cfg.drop_rate = 512, 4, 4096, 256, 0.1
    held_k, _, loss_k, grads_k = _two_compiled_steps_on_cuda(cfg)
    held_r, _, loss_r, grads_r = _two_compiled_steps_on_cuda(cfg, recompute_dropout_masks)
    masks = 2 * cfg.n_layers * 16 * cfg.context_length * cfg.emb_dim
    assert held_k - held_r >= 0.95 * masks, (held_k, held_r, masks)
    assert loss_r == pytest.approx(loss_k, rel=1e-6)
    torch.testing.assert_close(grads_r, grads_k, rtol=1e-3, atol=1e-5)


def test_bench_on_cuda_reports_the_matmul_peak(tmp_path):
    """A model big enough (2.5 GiB estimated, bf16-mixed, compiled) that the memory estimate, which decides
    `recompute_weight_casts auto` and the out-of-memory advice, can be held to the measured peak."""
    r = run_cli(["bench", "--preset", "tiny", "--device", "cuda", "--warmup", "2", "--steps", "5", "--profile",
                 "--model.emb_dim", "1024", "--model.n_heads", "8", "--model.n_layers", "4",
                 "--model.context_length", "512", "--model.vocab_size", "8192", "--train.micro_batch_size", "16",
                 "--run-dir", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["matmul_peak_tflops"] > 10
    assert 0 < row["peak_ratio"] < 1
    assert row["mem_estimate_gib"] == pytest.approx(row["mem_peak_gib"], rel=0.15), row
    prof = row["profile"]  # the CUDA kernels of two steps, by kind
    assert 0 < prof["busy_ms"] <= prof["step_ms"] * 1.01
    assert prof["ms_by_kind"]["matmul"] > 0 and prof["ms_by_kind"]["attention"] > 0, prof


@pytest.mark.parametrize("before, after", [("off", "auto"), ("auto", "off")])
def test_a_resume_that_changes_fused_places_the_step_counts(tmp_path, before, after):
    """Fused AdamW reads its step counts on the GPU; the others keep them on the CPU (else a read-back per
    parameter and step): a resume that changes --optim.fused puts them where the new setting wants them."""
    from gpttrain import checkpoint as ckpt
    from gpttrain.distributed import DistInfo
    from gpttrain.resume import maybe_resume

    data, info = make_data(tmp_path), DistInfo(0, 0, 1, torch.device("cuda", 0), None)
    a = build_trainer(tiny_config(data, tmp_path / "run", "--run.device", "cuda", "--optim.fused", before), info)
    take_steps(a, 2)
    ckpt.save(a)
    b = build_trainer(tiny_config(data, tmp_path / "run", "--run.device", "cuda", "--optim.fused", after,
                                  "--run.resume", "auto"), info)
    maybe_resume(b)
    want = "cuda" if after == "auto" else "cpu"
    steps = [st["step"] for st in b.optimizer.state.values()]
    assert steps and all(t.device.type == want and t.dtype == torch.float32 for t in steps)
    take_steps(b, 2)
    assert b.step == 4
