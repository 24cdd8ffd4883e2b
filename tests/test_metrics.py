import pytest

from gpttrain.config import resolve
from gpttrain.memory import GIB, estimate_training_memory, suggest_micro_batch
from gpttrain.metrics import eval_flop_share, flops_per_token, lookup_peak_tflops, matmul_params, mfu, model_tflops
from tests.helpers import cpu_memory


def test_evaluation_share_of_the_flops_at_a_cadence():
    # Forward passes: 5 + 5 eval batches every 5 steps of 4 micro-steps of 3 forwards' worth (the original's).
    train = resolve("gpt-1.4b").train
    assert eval_flop_share(train) == pytest.approx(10 / (10 + 5 * 4 * 3))  # 14.3%
    train.grad_accum_steps = 1
    assert eval_flop_share(train) == pytest.approx(10 / (10 + 5 * 3))
    assert eval_flop_share(resolve("gpt2-124m").train) == pytest.approx(20 / (20 + 500 * 3))  # defaults: 1.3%


def test_flops_per_token_of_the_reference_models():
    # The figures the GPU-speed issue quotes: 8.47 GFLOP (1.42B) and 0.855 GFLOP (124M geometry).
    big = resolve("gpt-1.4b").model
    assert matmul_params(big) == 24 * 12 * 2048 * 2048 + 50304 * 2048
    assert flops_per_token(big) == 6 * 1_310_982_144 + 12 * 24 * 2048 * 1024
    assert round(flops_per_token(big) / 1e9, 2) == 8.47
    small = resolve("gpt2-124m").model
    assert round(flops_per_token(small) / 1e9, 3) == 0.855
    assert flops_per_token(small, seq_len=512) < flops_per_token(small)


def test_mfu_and_tflops():
    cfg = resolve("gpt-1.4b").model
    assert model_tflops(1e5, cfg) == pytest.approx(847.0, rel=1e-3)
    assert mfu(1e5, cfg, 989.0) == pytest.approx(847.0 / 989.0, rel=1e-3)
    assert mfu(1e5, cfg, None) is None  # unknown peak: omitted, never invented
    assert mfu(1e5, cfg, 0.0) is None  # (not a ZeroDivisionError)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("cpu", None), (None, None), ("Some Future GPU", None),
    ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA A100 80GB PCIe", 312.0), ("Tesla T4", 65.0),
    # whole words: other cards whose names contain a listed one are unknown, not given its peak
    ("NVIDIA RTX A1000", None), ("NVIDIA RTX A4000", None), ("NVIDIA RTX A3000 Laptop GPU", None),
    ("NVIDIA GB200", None), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0),
])
def test_peak_lookup(name, peak):
    assert lookup_peak_tflops(name) == peak


def test_memory_estimate_of_the_original_run():
    cfg = resolve("gpt-1.4b").model
    pure = estimate_training_memory(cfg, 8, "bf16-pure", "ddp")
    mixed = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp")
    # fp32 weights + grads + AdamW moments alone: 16 bytes x 1.4166e9 = 22.7 GB, as the sharding issue says.
    assert (mixed.weights + mixed.grads + mixed.optimizer) / 1e9 == pytest.approx(22.67, abs=0.01)
    assert mixed.total > 24 * GIB  # DDP with fp32 master weights cannot hold it on a 24 GB GPU
    assert pure.total < mixed.total
    # The original script's measured peak at 8 x 4 was 28.4 GiB on an H200 (bf16 weights, no compile).
    assert pure.total / GIB == pytest.approx(28.4, rel=0.1)


def test_fsdp_shards_state_and_checkpointing_cuts_activations():
    cfg = resolve("gpt-1.4b").model
    ddp = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp")
    f4 = estimate_training_memory(cfg, 8, "bf16-mixed", "fsdp", world_size=4)
    assert f4.weights == pytest.approx(ddp.weights / 4)
    assert f4.optimizer == pytest.approx(ddp.optimizer / 4)
    ac = estimate_training_memory(cfg, 8, "bf16-mixed", "fsdp", world_size=4, activation_checkpointing=True)
    assert ac.activations < f4.activations / 4
    assert ac.total < 24 * GIB
    # DDP replicates: each rank holds the whole state and its own activations, however many ranks there are.
    assert estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", world_size=4) == ddp


def test_suggest_micro_batch_keeps_the_global_batch():
    cfg = resolve("gpt2-124m").model
    mb, accum = suggest_micro_batch(cfg, 16 * GIB, 32, precision="bf16-mixed", strategy="ddp")
    assert mb * accum == 32
    assert estimate_training_memory(cfg, mb, "bf16-mixed").total <= 16 * GIB
    assert mb == 32 or estimate_training_memory(cfg, mb * 2, "bf16-mixed").total > 16 * GIB
    assert suggest_micro_batch(resolve("gpt-1.4b").model, 1 * GIB, 32) is None


def test_suggest_micro_batch_under_fp8_only_where_fp8_matmuls_take_the_tokens():
    """Context 1000: a micro-batch of 1 (1000 tokens) is not a multiple of 16, which fp8 refuses; 2 is."""
    cfg = resolve("gpt-1.4b").model
    cfg.context_length = 1000
    kw = dict(precision="bf16-mixed", compiled=True)
    one = estimate_training_memory(cfg, 1, fp8=True, **kw).total
    two = estimate_training_memory(cfg, 2, fp8=True, **kw).total
    assert one < two  # so at (one + two) / 2 only 1 fits, which fp8 cannot take
    assert suggest_micro_batch(cfg, (one + two) / 2, 32, fp8=True, **kw) is None
    assert suggest_micro_batch(cfg, two, 32, fp8=True, **kw) == (2, 16)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-pure"])
@pytest.mark.parametrize("n, d, v, rows", [(4096, 256, 4096, 256), (4096, 1024, 4096, 64)])  # chunks; head grad
def test_fused_loss_estimate_bounds_the_measured_peak(precision, n, d, v, rows, tmp_path):
    """The chunked head + loss, measured on CPU with the profiler: the estimate is above the real peak, not far."""
    import contextlib

    import torch

    from gpttrain.loss import linear_cross_entropy
    from gpttrain.memory import fused_loss_bytes

    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    torch.manual_seed(0)
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(v, d)).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    amp = torch.autocast("cpu", torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    out = {}

    def forward():
        with amp:
            out["loss"] = linear_cross_entropy(h, w, t, chunk_rows=rows)

    measured, _ = cpu_memory(forward, tmp_path / "trace.json")
    estimate = fused_loss_bytes(n, v, d, precision, rows=rows)
    assert measured <= estimate <= 1.6 * measured, (measured, estimate)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_compiled_loss_estimate_bounds_the_measured_peak(precision, tmp_path):
    """The plain head + cross-entropy under torch.compile (the default on GPUs), measured on CPU with the
    profiler: inductor keeps the 16-bit logits and writes their gradient over them, as the estimate says."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from gpttrain.memory import compiled_loss_bytes

    n, d, v = 4096, 256, 4096
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (0.02 * torch.randn(v, d)).requires_grad_()
    t = torch.randint(0, v, (n,))
    loss_fn = torch.compile(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))
    amp = torch.autocast("cpu", torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()

    def step():
        with amp:
            loss = loss_fn(h, w, t)
        loss.backward()
        h.grad = w.grad = None

    step()  # compile outside the measured run
    measured, _ = cpu_memory(step, tmp_path / "trace.json")
    estimate = compiled_loss_bytes(n, v, d, precision)
    assert 0.99 * measured <= estimate <= 1.6 * measured, (measured, estimate)  # the loss scalar aside
    eager_bytes = n * v * 14  # what the same loss keeps without compile: far above
    assert estimate < eager_bytes / 3


def test_fused_loss_estimate_at_the_original_size():
    cfg = resolve("gpt-1.4b").model
    plain = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp")
    fused = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", fused_loss=True)
    compiled = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", compiled=True)
    assert plain.logits == 8 * 1024 * cfg.vocab_size * 14  # the full logits in eager mode: about 5.4 GiB
    assert 1 * GIB < fused.logits < 2 * GIB  # one chunk and the head's gradient
    assert 0.77 * GIB < compiled.logits < fused.logits  # 16-bit logits (0.77 GiB) and the gradients
    # Measured on an H200 with the chunked loss, compiled: 39.55 GiB allocated at the peak.
    assert abs(fused.total / GIB - 39.55) < 0.5, fused.total / GIB


def test_recomputed_weight_casts_estimate():
    cfg = resolve("gpt-1.4b").model
    kept = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", compiled=True)
    recast = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", compiled=True, recompute_casts=True)
    assert kept.compute_copies == 2 * matmul_params(cfg)  # every linear weight's 16-bit copy, kept for backward
    assert recast.compute_copies == 2 * cfg.vocab_size * cfg.emb_dim  # the largest one (the head's) at a time
    assert recast.total < 38 * GIB < kept.total  # the GPU-speed issue's memory target at micro-batch 8
    # Nothing to recompute: no 16-bit copies (fp32, bf16-pure), FSDP's own gathers, eager autograd, or
    # activation checkpointing, which recasts already.
    for layout in (dict(precision="fp32"), dict(precision="bf16-pure"), dict(strategy="fsdp", world_size=2),
                   dict(compiled=False), dict(activation_checkpointing=True)):
        kw = dict(dict(precision="bf16-mixed", strategy="ddp", compiled=True), **layout)
        assert estimate_training_memory(cfg, 8, recompute_casts=True, **kw) == estimate_training_memory(cfg, 8, **kw)


def test_residual_stream_in_16_bits_estimate():
    """--train.residual_dtype compute: compiled, the LayerNorm inputs (two per block and the final one's) are saved
    in 2 bytes instead of 4; eager autograd keeps autocast's fp32 copies of them, so only the block inputs kept by
    activation checkpointing shrink there; nothing changes where the precision has one dtype throughout. The
    default (None) is what auto makes it: 16 bits under FSDP only."""
    cfg = resolve("gpt-1.4b").model
    tokens_d, L = 8 * 1024 * cfg.emb_dim, cfg.n_layers

    def activations(**kw):
        return estimate_training_memory(cfg, 8, **dict(dict(precision="bf16-mixed", strategy="ddp"), **kw)).activations

    fp32 = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", compiled=True)
    half = estimate_training_memory(cfg, 8, "bf16-mixed", "ddp", compiled=True, residual_16bit=True)
    assert fp32.activations - half.activations == 2 * tokens_d * (2 * L + 1)
    assert half.total < 38 * GIB < fp32.total  # the GPU-speed issue's memory target, without recasting (estimated)
    assert activations(compiled=False, residual_16bit=True) == activations(compiled=False)
    assert (activations(compiled=False, activation_checkpointing=True)
            - activations(compiled=False, activation_checkpointing=True, residual_16bit=True)) == 2 * tokens_d * L
    assert activations(compiled=True, strategy="fsdp", world_size=2) \
        == activations(compiled=True, strategy="fsdp", world_size=2, residual_16bit=True)
    assert activations(compiled=True) == activations(compiled=True, residual_16bit=False)
    for precision in ("fp32", "bf16-pure"):
        assert (estimate_training_memory(cfg, 8, precision, residual_16bit=True)
                == estimate_training_memory(cfg, 8, precision))


@pytest.mark.parametrize("setting, device, precision, compiled_head, expected", [
    ("auto", "cuda", "bf16-mixed", False, True),  # eager (or blocks-only compile): ~14 bytes per logit
    ("auto", "cuda", "bf16-mixed", True, False),  # compiled head: inductor's plain loss, faster and no larger
    ("auto", "cuda", "fp16-mixed", True, False),
    ("auto", "cuda", "fp32", True, True),  # compiled in fp32, the plain loss keeps fp32 logits
    ("auto", "cpu", "bf16-mixed", False, False),
    ("on", "cpu", "fp32", True, True),
    ("off", "cuda", "bf16-mixed", False, False),
])
def test_fused_loss_default_depends_on_compile(setting, device, precision, compiled_head, expected):
    from gpttrain.loss import chunked_loss_wanted

    assert chunked_loss_wanted(setting, device, precision, compiled_head) is expected


def test_memory_stats_read_allocated_reserved_and_peak_in_gib(monkeypatch):
    """The eval record's memory readouts: each from its own CUDA counter, in GiB (2^30 bytes); none on CPU."""
    import torch

    from gpttrain.monitor import memory_stats

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * GIB)
    assert memory_stats(torch.device("cuda", 0)) == {"mem_alloc_gib": 1.0, "mem_reserved_gib": 3.0,
                                                     "mem_peak_gib": 2.0}
    assert memory_stats(torch.device("cpu")) == dict.fromkeys(("mem_alloc_gib", "mem_reserved_gib", "mem_peak_gib"))


def test_gpu_utilization_tries_nvml_once_after_a_failure(monkeypatch):
    import torch

    from gpttrain import monitor

    calls = []

    def failing(device):
        calls.append(device)
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(monitor, "_nvml_failed", False)
    monkeypatch.setattr(torch.cuda, "utilization", failing)
    cuda = torch.device("cuda", 0)
    assert monitor.gpu_utilization(cuda) is None and monitor.gpu_utilization(cuda) is None
    assert len(calls) == 1
    assert monitor.gpu_utilization(torch.device("cpu")) is None
