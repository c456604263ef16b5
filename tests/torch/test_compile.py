"""The losses under ``torch.compile`` (SPEC §12.1): no graph break, the eager results, no recompilation.

Every compiled loss here is compiled with ``fullgraph=True`` (a graph break is an error) and run for several
curriculum steps under ``torch._dynamo.config.error_on_recompile`` after its first call, while the warm-up
ratio and the dynamic threshold move; its loss, gradient and metrics are compared with an eager twin (itself
tested against the float64 oracle in ``test_loss.py`` / ``test_fused_linear.py``) and, for ``CGGRLoss``, with
the oracle. Backends: ``eager`` (Dynamo only), ``aot_eager`` (plus AOT autograd: the custom ops' fake and
autograd registrations) and one ``inductor`` case (CPU C++ code generation; slow on a small machine).
The Triton kernels run interpreted on CPU (``dispatch.force("kernel")``); the compiled-vs-eager test of the
kernel path on CUDA is marked to run only there.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cggr_torch
from cggr_torch import CGGRLoss, cggr_loss, dispatch
from cggr_torch.curriculum import LinearWarmupSchedule, dynamic_ratio, linear_warmup_ratio_tensor
from cggr_torch.distributed import DistributedCGGRLoss
from cggr_torch.fused_linear import FusedLinearCGGRLoss
from cggr_torch.scoring import score_tokens
from tests import oracle
from tests.torch import as_f64, random_logits, random_targets

NON_SAMPLED = ("topk", "stratified", "sequence_aware", "fixed_quota")
BACKENDS = ("eager", "aot_eager")
STEPS = 6
WARMUP = 4                       # the ratio moves over the first 4 steps, then stays at its minimum
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter (TRITON_INTERPRET=1)")
#: Where the Triton kernels run: the CPU under the interpreter, else a CUDA GPU (None: no kernel tests).
KERNEL_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_kernel_device = pytest.mark.skipif(KERNEL_DEVICE is None,
                                         reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def no_recompile():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def _batch(rng, B=3, T=7, V=13, dtype=torch.float32):
    return random_logits(rng, (B, T, V), dtype), random_targets(rng, (B, T), V)


def _odd_batches(rng, dtype=torch.float32):
    """Half precision, a non-finite row, an all-ignored batch: every case through one compiled graph."""
    logits, targets = _batch(rng, dtype=dtype)
    nan_row = logits.clone()
    nan_row[0, 2, 3] = float("nan")
    nan_row[1, 4, :] = float("inf")
    yield nan_row, targets
    yield logits, torch.full_like(targets, -100)
    for _ in range(3):
        yield _batch(rng, dtype=dtype)


def _grad_of(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def _assert_same_metrics(compiled: dict, eager: dict) -> None:
    for key in ("step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(compiled[key]) == int(eager[key]), key
    for key in ("token_ratio", "effective_ratio"):      # the ratio decides k: bit-identical
        assert compiled[key].cpu().to(torch.float32).numpy().tobytes() == \
            eager[key].cpu().to(torch.float32).numpy().tobytes(), key
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty", "sample_ess"):
        assert float(compiled[key]) == pytest.approx(float(eager[key]), rel=1e-6, abs=1e-6), key


# ------------------------------------------------------------------------------- the curriculum's ratio
def test_ratio_tensor_is_bit_identical_to_the_numpy_reference():
    steps = torch.tensor(list(range(0, 40)) + [499, 500, 999, 1000, 1001, 4095, 2**24 - 1, 2**24 + 1, 2**31])
    for warmup in (0, 1, 3, 7, 1000, 4096, 10**6):
        for r_min in (0.25, 0.1, 1 / 3, 0.999, 1.0):
            ref = LinearWarmupSchedule(r_min, warmup)
            expected = np.array([ref(int(s)) for s in steps], dtype=np.float32)
            got = torch.stack([linear_warmup_ratio_tensor(s, r_min, warmup) for s in steps]).numpy()
            assert got.dtype == np.float32 and got.tobytes() == expected.tobytes(), (warmup, r_min)


@pytest.mark.parametrize("backend", BACKENDS + (pytest.param("inductor", marks=pytest.mark.slow),))
def test_compiled_ratio_is_bit_identical_and_compiled_once(backend):
    """The schedule and the dynamic threshold compiled: the SPEC §5.1/§5.2 float32 sequence, no FMA, no
    reciprocal; one graph for every step and confidence."""
    warmup, r_min, sens = 1000, 0.3, 0.7

    def ratio(step, conf):
        base = linear_warmup_ratio_tensor(step, r_min, warmup)
        return base, dynamic_ratio(base, conf, sens)

    f = torch.compile(ratio, backend=backend, fullgraph=True)
    rng = np.random.default_rng(0)
    f(torch.tensor(0), torch.tensor(0.5))
    with no_recompile():
        for s in [1, 2, 3, 333, 500, 777, 999, 1000, 1234] + list(rng.integers(0, 2000, 20)):
            c = np.float32(rng.random())
            base, r = f(torch.tensor(int(s)), torch.tensor(c))
            b_ref = LinearWarmupSchedule(r_min, warmup)(int(s))
            one = np.float32(1)
            r_ref = min(one, np.float32(b_ref * np.float32(one + np.float32(np.float32(one - c) * np.float32(sens)))))
            assert base.numpy().tobytes() == np.float32(b_ref).tobytes(), s
            assert r.numpy().tobytes() == np.float32(r_ref).tobytes(), (s, c)


# ------------------------------------------------------------------------------------------ CGGRLoss
def _compiled_vs_eager(make, backend, rng, *, extra=None, V=13, oracle_cfg=None, steps=STEPS, B=3, T=7,
                       device="cpu"):
    """Run a compiled and an eager instance side by side for ``steps`` steps on ``device``; return the compiled
    instance."""
    crit, twin = make().to(device), make().to(device)
    f = torch.compile(lambda x, t, *a: crit(x, t, *a), backend=backend, fullgraph=True)
    for i in range(steps):
        logits, targets = _batch(rng, B=B, T=T, V=V)
        args = () if extra is None else (extra(targets).to(device),)
        on_device = (logits.to(device), targets.to(device))
        ctx = no_recompile() if i > 0 else contextlib.nullcontext()
        with ctx:
            loss_c, grad_c = _grad_of(f, *on_device, *args)
        loss_e, grad_e = _grad_of(twin, *on_device, *args)
        assert torch.equal(loss_c, loss_e) or float(loss_c) == pytest.approx(float(loss_e), rel=1e-6), i
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)
        assert torch.equal(grad_c == 0, grad_e == 0)                   # the same tokens selected
        _assert_same_metrics(crit._metrics, twin._metrics)
        if oracle_cfg is not None and i == steps - 1:
            d = score_tokens(logits, targets, scoring=oracle_cfg.get("scoring", "combined")).difficulty.numpy()
            ref = oracle.cggr_loss(as_f64(logits), targets.numpy(), i, difficulty_override=d, **oracle_cfg)
            np.testing.assert_allclose(float(loss_c), ref["loss"], atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(as_f64(grad_c), ref["grad"], atol=1e-5, rtol=1e-4)
        crit.step()
        twin.step()
    assert crit.get_metrics()["step"] == steps - 1
    return crit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selection", NON_SAMPLED)
def test_cggr_loss_compiles_without_breaks_and_matches_eager(selection, backend):
    cfg = dict(selection=selection, warmup_steps=WARMUP, min_tokens_ratio=0.25, dynamic_threshold=True,
               threshold_sensitivity=0.5)
    rng = np.random.default_rng(1)
    crit = _compiled_vs_eager(lambda: CGGRLoss(**cfg), backend, rng, oracle_cfg=cfg)
    ratios = crit.get_metrics()
    assert ratios["token_ratio"] == pytest.approx(0.25)   # the warm-up ran to its end inside one graph


@pytest.mark.slow
def test_cggr_loss_compiles_with_inductor():
    cfg = dict(selection="stratified", warmup_steps=WARMUP)
    _compiled_vs_eager(lambda: CGGRLoss(**cfg), "inductor", np.random.default_rng(2), oracle_cfg=cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_non_finite_rows_and_all_ignored_batches_compile(dtype):
    rng = np.random.default_rng(15)
    crit, twin = CGGRLoss(selection="stratified", warmup_steps=WARMUP), CGGRLoss(selection="stratified",
                                                                               warmup_steps=WARMUP)
    f = torch.compile(lambda x, t: crit(x, t), backend="aot_eager", fullgraph=True)
    for i, (logits, targets) in enumerate(_odd_batches(rng, dtype)):
        with no_recompile() if i else contextlib.nullcontext():
            loss_c, grad_c = _grad_of(f, logits, targets)
        loss_e, grad_e = _grad_of(twin, logits, targets)
        assert torch.isfinite(loss_c) and torch.isfinite(grad_c).all()
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
        assert grad_c.dtype == dtype and torch.equal(grad_c, grad_e)
        _assert_same_metrics(crit._metrics, twin._metrics)
        if bool((targets == -100).all()):
            assert float(loss_c) == 0.0 and not grad_c.any() and int(crit._metrics["tokens_selected"]) == 0
        crit.step()
        twin.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_excess_scoring_compiles(backend):
    rng = np.random.default_rng(3)

    def reference(targets):
        return torch.from_numpy(rng.uniform(0.0, 3.0, size=tuple(targets.shape)).astype(np.float32))

    _compiled_vs_eager(lambda: CGGRLoss(scoring="excess", selection="topk", warmup_steps=WARMUP), backend, rng,
                       extra=reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["combined", "excess"])
def test_sampled_selection_compiles(backend, scoring):
    """``selection='sampled'`` (SPEC §7.4) on the reference path: fullgraph, no recompilation as the step (and
    with it the draws' hash input) moves, the eager values."""
    rng = np.random.default_rng(13)

    def reference(targets):
        return torch.from_numpy(rng.uniform(0.0, 3.0, size=tuple(targets.shape)).astype(np.float32))

    cfg = dict(scoring=scoring, selection="sampled", warmup_steps=WARMUP, dynamic_threshold=True,
               threshold_sensitivity=0.5, sample_seed=5)
    _compiled_vs_eager(lambda: CGGRLoss(**cfg), backend, rng, extra=reference if scoring == "excess" else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_functional_loss_compiles(backend):
    rng = np.random.default_rng(14)
    kw = dict(selection="sampled", warmup_steps=WARMUP, sample_seed=9)
    f = torch.compile(lambda x, t, s: cggr_loss(x, t, s, **kw), backend=backend, fullgraph=True)
    for s in range(STEPS):
        logits, targets = _batch(rng)
        with no_recompile() if s else contextlib.nullcontext():
            loss_c, met_c = f(logits, targets, torch.tensor(s))
        loss_e, met_e = cggr_loss(logits, targets, s, **kw)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
        _assert_same_metrics(met_c, met_e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_loss_takes_a_step_tensor(backend):
    rng = np.random.default_rng(4)
    f = torch.compile(lambda x, t, s: cggr_loss(x, t, s, warmup_steps=WARMUP), backend=backend, fullgraph=True)
    for s in range(STEPS):
        logits, targets = _batch(rng)
        with no_recompile() if s else contextlib.nullcontext():
            (loss_c, met_c) = f(logits, targets, torch.tensor(s))
        loss_e, met_e = cggr_loss(logits, targets, s, warmup_steps=WARMUP)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
        _assert_same_metrics(met_c, met_e)


def test_host_step_bookkeeping_and_state_dict():
    crit = CGGRLoss(warmup_steps=WARMUP)
    assert "curriculum_step" not in crit.state_dict() and crit.state_dict()["_extra_state"] == {"step": 0}
    crit.step()
    crit.step()
    assert crit.current_step == 2 and int(crit.curriculum_step) == 2
    crit.set_step(7)
    assert int(crit.curriculum_step) == 7
    fresh = CGGRLoss(warmup_steps=WARMUP)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.current_step == 7 and int(fresh.curriculum_step) == 7
    with pytest.raises(ValueError, match="step"):
        crit.set_step(-1)
    with pytest.raises(ValueError, match="step"):
        cggr_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.tensor(-1))
    with pytest.raises(ValueError, match="step"):
        cggr_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.tensor(1.0))


def test_step_inside_the_compiled_function_breaks_the_graph_but_never_recompiles():
    rng = np.random.default_rng(5)
    crit, twin = CGGRLoss(warmup_steps=WARMUP), CGGRLoss(warmup_steps=WARMUP)

    def train_step(x, t):
        loss = crit(x, t)
        crit.step()
        return loss

    f = torch.compile(train_step, backend="aot_eager")
    for i in range(STEPS):
        logits, targets = _batch(rng)
        with no_recompile() if i else contextlib.nullcontext():
            loss_c = f(logits, targets)
        loss_e = twin(logits, targets)
        twin.step()
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
    assert crit.current_step == twin.current_step == STEPS and int(crit.curriculum_step) == STEPS


def test_custom_schedule_runs_compiled_with_a_graph_break():
    """A user schedule is a host function: called outside the graph (documented graph break), never a
    recompilation, and the values of eager."""
    def schedule(step):
        return 1.0 if step < 2 else 0.5

    rng = np.random.default_rng(6)
    crit, twin = CGGRLoss(ratio_schedule=schedule), CGGRLoss(ratio_schedule=schedule)
    logits, targets = _batch(rng)
    explanation = torch._dynamo.explain(lambda x, t: crit(x, t))(logits, targets)
    assert explanation.graph_break_count >= 1
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: crit(x, t), backend="aot_eager")
    for i in range(4):
        logits, targets = _batch(rng)
        with no_recompile() if i else contextlib.nullcontext():
            loss_c = f(logits, targets)
        loss_e = twin(logits, targets)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
        _assert_same_metrics(crit._metrics, twin._metrics)
        crit.step()
        twin.step()


def test_out_of_range_targets_assert_inside_a_compiled_call():
    crit = CGGRLoss(warmup_steps=0)
    f = torch.compile(lambda x, t: crit(x, t), backend="aot_eager", fullgraph=True)
    logits = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="targets: every value must lie in"):
        f(logits, torch.tensor([[0, 1, 5], [0, 1, 2]]))


def test_the_default_schedule_compiles_on_a_fresh_module_at_warmup_zero_and_default():
    """The reported crash (``ratio_schedule: expected a number ... got ndarray``) at the defaults."""
    for crit in (CGGRLoss(), CGGRLoss(warmup_steps=0), CGGRLoss(dynamic_threshold=False)):
        torch._dynamo.reset()
        logits, targets = _batch(np.random.default_rng(7))
        loss = torch.compile(lambda x, t: crit(x, t), backend="eager", fullgraph=True)(logits, targets)
        assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------- fused head, DDP
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["reference", pytest.param("kernel", marks=needs_kernel_device)])
def test_fused_head_compiles_and_matches_eager(backend, mode):
    rng = np.random.default_rng(8)
    d, V = 8, 19
    dev = KERNEL_DEVICE if mode == "kernel" else "cpu"      # on a GPU the kernels take CUDA tensors only
    weight = torch.from_numpy(rng.standard_normal((V, d)).astype(np.float32)).to(dev).requires_grad_(True)
    bias = None                   # the kernel case runs without a bias, the reference case with one
    if mode == "reference":
        bias = torch.from_numpy(rng.standard_normal(V).astype(np.float32)).requires_grad_(True)
    crit, twin = (FusedLinearCGGRLoss(selection="stratified", warmup_steps=WARMUP).to(dev) for _ in range(2))
    with dispatch.force(mode):
        f = torch.compile(lambda h, w, t, b: crit(h, w, t, b), backend=backend, fullgraph=True)
        for i in range(STEPS):
            hidden = torch.from_numpy(rng.standard_normal((3, 5, d)).astype(np.float32)).to(dev)
            targets = random_targets(rng, (3, 5), V).to(dev)
            grads = []
            for fn in (f, twin):
                h = hidden.clone().requires_grad_(True)
                weight.grad = None
                if bias is not None:
                    bias.grad = None
                with no_recompile() if (i and fn is f) else contextlib.nullcontext():
                    loss = fn(h, weight, targets, bias)
                loss.backward()
                grads.append((loss.detach(), h.grad, weight.grad) + ((bias.grad,) if bias is not None else ()))
            (lc, *gc), (le, *ge) = grads
            assert float(lc) == pytest.approx(float(le), rel=1e-6)
            for a, b in zip(gc, ge):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            _assert_same_metrics(crit._metrics, twin._metrics)
            crit.step()
            twin.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_distributed_local_scope_without_a_process_group(backend):
    rng = np.random.default_rng(9)
    _compiled_vs_eager(lambda: DistributedCGGRLoss(scope="local", warmup_steps=WARMUP), backend, rng)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_distributed_global_scope_world_size_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rng = np.random.default_rng(10)
        crit = _compiled_vs_eager(lambda: DistributedCGGRLoss(scope="global", warmup_steps=WARMUP), "aot_eager",
                                  rng)
        assert crit.get_metrics()["world_size"] == 1
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------- a whole train step
class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_train_step_compiles_and_matches_eager(backend):
    torch.manual_seed(0)
    models = [_TinyLM(), _TinyLM()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    losses = [CGGRLoss(selection="stratified", warmup_steps=WARMUP) for _ in models]

    def make_step(model, opt, crit):
        def train_step(ids, labels):
            logits, targets = cggr_torch.shift_for_causal_lm(model(ids), labels)
            loss = crit(logits, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return train_step

    compiled = torch.compile(make_step(models[0], opts[0], losses[0]), backend=backend, fullgraph=False)
    eager = make_step(models[1], opts[1], losses[1])
    rng = np.random.default_rng(11)
    for i in range(STEPS):
        ids = torch.from_numpy(rng.integers(0, 17, size=(4, 9)))
        lc, le = compiled(ids, ids), eager(ids, ids)
        assert float(lc) == pytest.approx(float(le), rel=1e-5), i
        for crit in losses:
            crit.step()
    for pc, pe in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
    assert losses[0].get_metrics()["step"] == STEPS - 1


# ------------------------------------------------------------------------------------ the kernel ops
@needs_interpreter
@pytest.mark.parametrize("selection, fused_loss", [(s, True) for s in NON_SAMPLED + ("sampled",)]
                         + [("topk", False), ("stratified", False), ("sampled", False)])
def test_kernel_path_compiles_on_the_interpreter(selection, fused_loss):
    """The fused kernel path (every strategy) and the composable one (scoring kernel, selection kernel,
    selective cross-entropy kernel), 5 steps through the warm-up, on the Triton interpreter."""
    rng = np.random.default_rng(12)
    with dispatch.force("kernel", fused_loss=fused_loss):
        _compiled_vs_eager(lambda: CGGRLoss(selection=selection, warmup_steps=WARMUP), "aot_eager", rng, steps=5,
                           B=2, T=6)


@needs_kernel_device
def test_kernel_custom_ops_pass_opcheck():
    """Every ``cggr`` custom op passes ``torch.library.opcheck`` (schema, fake tensors, AOT dispatch) on the kernel
    device: the interpreter's CPU tensors, or CUDA tensors on a GPU (where the fake functions meet CUDA)."""
    from cggr_torch.kernels import cross_entropy as kce
    from cggr_torch.kernels import scoring as ks
    from cggr_torch.kernels import selection as ksel
    from cggr_torch import fused_linear as fl

    dispatch.preload_kernels()      # every cggr op registered, whatever ran before this test
    rng = np.random.default_rng(13)
    dev = KERNEL_DEVICE
    logits, targets = (x.to(dev) for x in _batch(rng, B=2, T=5, V=11))
    n = targets.numel()
    t = targets.reshape(-1).contiguous()
    readable = ((t != -100) & (t >= 0)).to(torch.uint8)
    ops = []
    out, finite, key, status = ks.scoring_op(logits, targets, -100, 3, 32)
    ops.append((torch.ops.cggr.scoring.default, (logits, targets, -100, 3, 32)))
    ops.append((torch.ops.cggr.scoring.default, (logits, None, -100, -1, 0)))
    d = out[5].reshape(2, 5).contiguous()
    e = (status.reshape(2, 5) & 2) != 0
    for sel in NON_SAMPLED:
        ops.append((torch.ops.cggr.select_tokens.default, (d, e, torch.tensor([0.5], device=dev), 0.0, sel, 3, 1)))
        ops.append((torch.ops.cggr.select_tokens.default, (d, e, None, 0.375, sel, 3, 1)))
        ops.append((torch.ops.cggr.select_from_scores.default,
                    (key, status, out, [2, 5], sel, 3, 1, torch.tensor(0.5, device=dev), True, 0.5,
                     torch.tensor(3, device=dev))))
    ops.append((torch.ops.cggr.rank_tokens.default, (d, e)))
    x = logits.clone().requires_grad_(True)
    rw = torch.rand(n, device=dev)
    ops.append((torch.ops.cggr.selective_cross_entropy.default, (x, t, readable, None, None)))
    ops.append((torch.ops.cggr.selective_cross_entropy.default, (x, t, readable, out[0].contiguous(), rw)))
    ops.append((torch.ops.cggr.scored_selective_cross_entropy.default,
                (x, t, readable.bool(), out[0].contiguous(), out[4].contiguous())))
    h = torch.randn(n, 6, device=dev, requires_grad=True)
    w = torch.randn(11, 6, device=dev, requires_grad=True)
    b = torch.randn(11, device=dev, requires_grad=True)
    ops.append((torch.ops.cggr.fused_linear_statistics.default, (h.detach(), w.detach(), b.detach(), t, -100, 4, 5)))
    safe = torch.where(t >= 0, t, torch.zeros_like(t))
    mask = readable.bool()
    ops.append((torch.ops.cggr.selected_rows_cross_entropy.default,
                (h, w, b, out[4].contiguous(), mask, safe, out[0].contiguous(), mask.sum(), 0, 1 << 20)))
    z = torch.randn(5, 7, device=dev)
    v_t = torch.tensor([0, 3, 9, 2, 4], device=dev)
    half = torch.tensor([0.5], device=dev)
    k_rows = -(-5 // 16)
    ops.append((torch.ops.cggr.chunk_gradient.default,
                (z, torch.randn(5, device=dev), v_t, 2, half, torch.empty(k_rows, 7, device=dev))))
    ops.append((torch.ops.cggr.chunk_gradient.default,
                (z.clone(), torch.randn(5, device=dev), v_t, 2, half, None)))
    # the sampled selection (SPEC §7.4): the composable path's sampler and the fused sampled loss
    ops.append((torch.ops.cggr.sample_tokens.default,
                (d.reshape(-1), e.reshape(-1), half, 0.0, torch.tensor([3], device=dev), 0, 7, 1.0, 0.1, 1e-6)))
    ops.append((torch.ops.cggr.sample_tokens.default, (d.reshape(-1), e.reshape(-1), None, 0.4, None, 5, 7, 2.0,
                                                       0.0, 1e-6)))
    ref = torch.rand(n, device=dev) * 2
    for reference in (None, ref):
        ops.append((torch.ops.cggr.sampled_loss_from_scores.default,
                    (x, t, out, status, reference, torch.tensor(0.5, device=dev), torch.tensor(3, device=dev), True,
                     0.5, 7, 1.5, 0.2, 1e-6)))
    ops.append((torch.ops.cggr.linear_warmup_ratio.default, (torch.tensor(3, device=dev), 0.25, 10)))
    ops.append((torch.ops.cggr.dynamic_ratio.default, tuple(torch.tensor(v, device=dev) for v in (0.5, 0.25, 0.5))))
    with dispatch.force("kernel"):
        for op, args in ops:
            result = torch.library.opcheck(op, args, raise_exception=False)
            assert all(v == "SUCCESS" for v in result.values()), (op, args[4:], result)
    del kce, ksel, fl


@needs_cuda
@pytest.mark.parametrize("selection", NON_SAMPLED + ("sampled",))
@pytest.mark.parametrize("fused_loss", [True, False])
def test_kernel_path_compiled_matches_eager_on_cuda(selection, fused_loss):
    rng = np.random.default_rng(14)
    crit = CGGRLoss(selection=selection, warmup_steps=WARMUP).cuda()
    twin = CGGRLoss(selection=selection, warmup_steps=WARMUP).cuda()
    with dispatch.force("kernel", fused_loss=fused_loss):
        f = torch.compile(lambda x, t: crit(x, t), backend="inductor", fullgraph=True)
        for i in range(STEPS):
            logits, targets = _batch(rng, B=4, T=33, V=1000, dtype=torch.bfloat16)
            logits, targets = logits.cuda(), targets.cuda()
            with no_recompile() if i else contextlib.nullcontext():
                loss_c, grad_c = _grad_of(f, logits, targets)
            loss_e, grad_e = _grad_of(twin, logits, targets)
            assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6)
            torch.testing.assert_close(grad_c, grad_e)
            _assert_same_metrics({k: v.cpu() for k, v in crit._metrics.items()},
                                 {k: v.cpu() for k, v in twin._metrics.items()})
            crit.step()
            twin.step()


@needs_kernel_device
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sampled_excess_compiles_on_the_kernel_device(backend):
    """The fused ``sampled`` path (``cggr::scoring`` → ``cggr::sampled_loss_from_scores``, with a reference):
    fullgraph, no recompilation over the warm-up, the eager values; the odd batches (half precision, non-finite
    rows, all ignored) through the same graph. On the interpreter's CPU tensors, or CUDA tensors on a GPU."""
    rng = np.random.default_rng(16)

    def reference(targets):
        ref = rng.uniform(0.0, 3.0, size=tuple(targets.shape)).astype(np.float32)
        ref.reshape(-1)[2] = np.inf
        return torch.from_numpy(ref)

    cfg = dict(scoring="excess", selection="sampled", warmup_steps=WARMUP, dynamic_threshold=True)
    with dispatch.force("kernel") as log:
        _compiled_vs_eager(lambda: CGGRLoss(**cfg), backend, rng, extra=reference, steps=5, B=2, T=6,
                           device=KERNEL_DEVICE)
    assert log.calls["sample_from_scores"] >= 5           # the eager twin's calls (traced calls are not counted)
    crit, twin = (CGGRLoss(selection="sampled", warmup_steps=WARMUP).to(KERNEL_DEVICE) for _ in range(2))
    torch._dynamo.reset()
    with dispatch.force("kernel"):
        f = torch.compile(lambda x, t: crit(x, t), backend=backend, fullgraph=True)
        for i, (logits, targets) in enumerate(_odd_batches(rng, torch.bfloat16)):
            logits, targets = logits.to(KERNEL_DEVICE), targets.to(KERNEL_DEVICE)
            with no_recompile() if i else contextlib.nullcontext():
                loss_c, grad_c = _grad_of(f, logits, targets)
            loss_e, grad_e = _grad_of(twin, logits, targets)
            assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)
            _assert_same_metrics(crit._metrics, twin._metrics)
            crit.step()
            twin.step()
