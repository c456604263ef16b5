"""CGGRModel(kept_rows='bound') (SPEC §9.4): the main pass sized by a host bound of the kept count, without a host
synchronisation, against the exact path (kept_rows='exact'), the float64 oracle's selection and the bound's
definition."""
from __future__ import annotations

import os
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from cggr_torch.batch_split import KEPT_ROWS, CGGRModel  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, random_logits, random_targets  # noqa: E402
from tests.torch.test_cggr_model import RecordingLM  # noqa: E402
from tests.torch.test_router import FixedRouter  # noqa: E402
from tests.torch.test_router_options import TinyLM, TinyRouter  # noqa: E402

Vs = 11


def _case(seed: int, dtype: torch.dtype, B: int, T: int, ineligible: bool):
    """Router logits, labels, attention mask; with ``ineligible`` an all-padding row, an all-non-finite router row
    and an all-ignored row (never kept, so the realised count is below the bound)."""
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (B, T, Vs), dtype)
    labels = random_targets(rng, (B, T), Vs)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, T - 3:] = 0                       # right padding
    if ineligible and B >= 4:
        am[1, :] = 0                        # all padding
        logits[2, :, 0] = float("inf")      # every router row non-finite
        labels[3, :] = -100                 # no target
    logits[B - 1, 1, 2] = float("nan")      # one non-finite router row (its sequence stays eligible)
    return logits, labels, am


def _reference(seed: int, labels: torch.Tensor, form: str):
    rng = np.random.default_rng(seed + 100)
    if form == "token":
        return torch.from_numpy(rng.uniform(0.0, 3.0, labels.shape).astype(np.float32))
    return torch.from_numpy(rng.uniform(0.0, 3.0, labels.shape[:1]).astype(np.float32))


def _step(mode: str, model_cls, logits, labels, am, *, ref=None, **kw):
    """One forward + backward; (result, metrics, grads (None → zeros), model)."""
    model = model_cls(Vs)
    cggr = CGGRModel(model, FixedRouter(logits), warmup_steps=0, kept_rows=mode, **kw)
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, Vs, labels.shape))
    res = cggr.forward_with(model, ids, labels, am, reference_nll=ref)
    res.loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return res, cggr.get_metrics(), grads, cggr


def _kept_mask(res, B: int) -> np.ndarray:
    mask = np.zeros(B, dtype=bool)
    kept = res.kept.numpy()
    mask[kept[kept < B]] = True
    return mask


def _assert_same(exact, bound, B: int):
    (re, me, ge, _), (rb, mb, gb, _) = exact, bound
    assert torch.isfinite(rb.loss) and not torch.isnan(rb.loss)
    torch.testing.assert_close(rb.loss.detach(), re.loss.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(ge, gb):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(_kept_mask(rb, B), _kept_mask(re, B))
    assert int(rb.num_kept) == int(re.num_kept) == int(re.kept.numel())
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite", "sequences_selected", "sequences_total",
                "step", "token_ratio", "effective_ratio"):
        assert mb[key] == me[key], key
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty", "sample_ess"):
        assert mb[key] == pytest.approx(me[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("B,T", [(1, 5), (5, 9), (7, 4), (13, 7)])
@pytest.mark.parametrize("ratio", [0.3, 0.55, 1.0])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bound_equals_exact_and_the_oracle(B, T, ratio, dynamic, dtype):
    for ineligible, model_cls, scoring in ((False, RecordingLM, "combined"), (True, TinyLM, "loss"),
                                           (True, RecordingLM, "entropy")):
        logits, labels, am = _case(B * 31 + T, DTYPES[dtype], B, T, ineligible)
        kw = dict(min_tokens_ratio=ratio, dynamic_threshold=dynamic, scoring=scoring)
        exact = _step("exact", model_cls, logits, labels, am, **kw)
        bound = _step("bound", model_cls, logits, labels, am, **kw)
        _assert_same(exact, bound, B)
        res, metrics, _, cggr = bound
        k_max = cggr.kept_rows_bound(B)
        assert res.kept.shape == (k_max,) and int(res.num_kept) <= k_max
        assert res.outputs.logits.shape[0] == k_max if model_cls is RecordingLM else res.outputs.shape[0] == k_max
        if not dynamic and bool(res.sequence_eligible.all()):   # no threshold, all eligible: bound = count
            assert int(res.num_kept) == k_max
        elif not dynamic and ineligible and B >= 4:   # the count of the eligible ones is below the bound
            assert int(res.num_kept) == oracle.num_selected(int(res.sequence_eligible.sum()), np.float32(ratio))
        # the oracle's selection at the package's float32 ratio and sequence difficulties (exact, SPEC §9)
        ok = res.sequence_eligible.numpy()
        ref = oracle.select_sequences(as_f64(logits), labels.numpy(), np.float32(metrics["effective_ratio"]),
                                      scoring, -100, am.numpy())
        np.testing.assert_array_equal(ref["sequence_eligible"], ok)
        mask, k = oracle.select_tokens(res.sequence_difficulty.double().numpy(), ok,
                                       np.float32(metrics["effective_ratio"]), "topk")
        np.testing.assert_array_equal(_kept_mask(res, B), mask)
        assert k == int(res.num_kept) == metrics["sequences_selected"]


@pytest.mark.parametrize("form", ["token", "sequence"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_bound_equals_exact_with_an_excess_reference(form, dynamic):
    B, T = 9, 8
    logits, labels, am = _case(5, torch.float32, B, T, True)
    ref = _reference(5, labels, form)
    ref[4 if form == "sequence" else (4, 5)] = float("nan")   # a non-finite reference: ineligible pairs / row
    kw = dict(min_tokens_ratio=0.4, dynamic_threshold=dynamic, scoring="excess")
    exact = _step("exact", RecordingLM, logits, labels, am, ref=ref, **kw)
    bound = _step("bound", RecordingLM, logits, labels, am, ref=ref, **kw)
    _assert_same(exact, bound, B)
    res, metrics = bound[0], bound[1]
    o = oracle.select_sequences_excess(as_f64(logits), labels.numpy(), np.float32(metrics["effective_ratio"]),
                                       ref.double().numpy(), attention_mask=am.numpy())
    np.testing.assert_array_equal(o["sequence_eligible"], res.sequence_eligible.numpy())
    mask, _ = oracle.select_tokens(res.sequence_difficulty.double().numpy(), res.sequence_eligible.numpy(),
                                   np.float32(metrics["effective_ratio"]), "topk")
    np.testing.assert_array_equal(_kept_mask(res, B), mask)


@pytest.mark.parametrize("buckets", [None, (2, 5)])
def test_sampled_bound_equals_exact(buckets):
    B, T = 11, 6
    logits, labels, am = _case(3, torch.float32, B, T, True)
    kw = dict(min_tokens_ratio=0.35, selection="sampled", buckets=buckets)
    exact = _step("exact", TinyLM, logits, labels, am, **kw)
    bound = _step("bound", TinyLM, logits, labels, am, **kw)
    _assert_same(exact, bound, B)
    assert bound[3].kept_rows_bound(B) == B == bound[0].kept.numel()   # a draw may keep every sequence


@pytest.mark.parametrize("model_cls", [RecordingLM, TinyLM])
@pytest.mark.parametrize("case", ["all_ignored", "all_padding"])
def test_no_kept_sequence_gives_a_zero_loss_and_zero_gradients(model_cls, case):
    B, T = 6, 5
    logits, labels, am = _case(1, torch.float32, B, T, False)
    if case == "all_ignored":
        labels[:] = -100
    else:
        am[:] = 0
    for selection in ("topk", "sampled") if model_cls is TinyLM else ("topk",):   # sampled needs logits
        res, metrics, grads, _ = _step("bound", model_cls, logits, labels, am, selection=selection)
        assert int(res.num_kept) == 0 and float(res.loss.detach()) == 0.0 and res.loss.requires_grad
        assert (res.kept == B).all() and res.outputs is not None   # the static main pass still ran
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        assert metrics["sequences_selected"] == metrics["tokens_selected"] == 0 == metrics["sample_ess"]


class _HostReads(TorchDispatchMode):
    """Records where (the innermost ``cggr_torch`` function) an ATen op reads a tensor on the host or sizes a
    tensor by its data; with ``device_only`` only the reads of a device (non-CPU) tensor: the host
    synchronisations (reading a CPU tensor waits for nothing)."""

    SYNCS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "is_nonzero",
             "equal", "tolist", "unique", "_unique2", "_unique"}

    def __init__(self, device_only: bool = False) -> None:
        super().__init__()
        self.device_only = device_only
        self.sites: set[tuple[str, str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu"
                        for a in list(args) + list((kwargs or {}).values()))
        if name in self.SYNCS and (on_device or not self.device_only):
            frames = [f for f in traceback.extract_stack() if "/cggr_torch/" in f.filename]
            where = (os.path.basename(frames[-1].filename), frames[-1].name) if frames else ("?", "?")
            self.sites.add((name,) + where)
        return func(*args, **(kwargs or {}))


#: Host reads of CPU tensors only: the CPU range checks raise ValueError at once, on CUDA (and under
#: torch.compile) they are device assertions (cggr_torch.utils.check_target_range, curriculum.num_selected).
CPU_ONLY = {("_local_scalar_dense", "utils.py", "check_target_range"),
            ("_local_scalar_dense", "curriculum.py", "num_selected")}


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("selection", ["topk", "sampled"])
def test_the_bound_path_reads_nothing_on_the_host(selection, device):
    """On CUDA (the case SPEC §9.4 is about; the kernels under the default dispatch) nothing synchronises, the
    range checks included (device assertions there)."""
    B, T = 7, 9
    logits, labels, am = (x.to(device) for x in _case(2, torch.float32, B, T, True))
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    seen = {}
    for mode in ("exact", "bound"):
        model = TinyLM(Vs).to(device)
        cggr = CGGRModel(model, FixedRouter(logits), warmup_steps=0, kept_rows=mode, selection=selection).to(device)
        cggr.forward_with(model, ids, labels, am)   # warm: one-time host work (signatures, checks) out of the way
        with _HostReads(device_only=device != "cpu") as reads:
            res = cggr.forward_with(model, ids, labels, am)
            res.loss.backward()
        seen[mode] = reads.sites
    assert ("nonzero", "batch_split.py", "forward_with") in seen["exact"]   # the check sees the exact path's read
    assert seen["bound"] <= (CPU_ONLY if device == "cpu" else set()), seen["bound"]


def test_a_compiled_model_sees_one_shape_while_the_realised_count_varies():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    B, T = 12, 6
    counter = CompileCounter()
    model = TinyLM()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    cggr = CGGRModel(model, TinyRouter(), warmup_steps=0, min_tokens_ratio=0.4, threshold_sensitivity=1.0,
                     kept_rows="bound", buckets=None)
    counts, shapes = set(), set()
    compiled.register_forward_pre_hook(lambda m, a, k: shapes.add(tuple(k["input_ids"].shape)), with_kwargs=True)
    for s in range(8):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, 17, (B, T), generator=g)
        am = torch.ones_like(ids)
        am[: s % 4, :] = 0                  # 0-3 all-padding (ineligible) sequences
        res = cggr.forward_with(compiled, ids, ids, am)
        res.loss.backward()
        counts.add(int(res.num_kept))
        cggr.step()
    assert len(counts) > 1                  # the realised count moved ...
    assert shapes == {(cggr.kept_rows_bound(B), T)} and counter.frame_count == 1   # ... one shape, one compile
    torch._dynamo.reset()


def test_the_bound_bounds_every_ratio_of_the_dynamic_threshold():
    model = TinyLM()
    for sens in (0.0, 0.25, 0.5, 1.0, 3.0):
        for base in (0.05, 0.25, 0.3, 0.5, 0.77, 1.0):
            cggr = CGGRModel(model, TinyRouter(), warmup_steps=0, min_tokens_ratio=base,
                             threshold_sensitivity=sens, kept_rows="bound")
            off = CGGRModel(model, TinyRouter(), warmup_steps=0, min_tokens_ratio=base, dynamic_threshold=False)
            for B in (1, 2, 7, 64, 257):
                k_max = cggr.kept_rows_bound(B)
                assert off.kept_rows_bound(B) == oracle.num_selected(B, np.float32(base))
                worst = max(oracle.num_selected(n, oracle.dynamic_ratio(base, c, sens))
                            for n in range(B + 1) for c in np.linspace(0.0, 1.0, 21))
                assert worst == k_max   # attained at c̄ = 0 with every sequence eligible: the bound is tight


def test_the_bound_follows_the_host_step_of_the_curriculum():
    cggr = CGGRModel(TinyLM(), TinyRouter(), warmup_steps=4, min_tokens_ratio=0.25, dynamic_threshold=False)
    seen = []
    for _ in range(6):
        seen.append(cggr.kept_rows_bound(16))
        cggr.step()
    assert seen == [oracle.num_selected(16, np.float32(1 - min(1, s / 4) * 0.75)) for s in range(6)]


def test_auto_and_bad_values():
    model = TinyLM()
    assert CGGRModel(model, TinyRouter()).kept_rows_mode() == "exact"   # default: the dynamic threshold is on
    assert CGGRModel(model, TinyRouter(), dynamic_threshold=False).kept_rows_mode() == "bound"
    assert CGGRModel(model, TinyRouter(), selection="fixed_quota").kept_rows_mode() == "bound"
    assert CGGRModel(model, TinyRouter(), threshold_sensitivity=0.0).kept_rows_mode() == "bound"
    assert CGGRModel(model, TinyRouter(), dynamic_threshold=False, selection="sampled").kept_rows_mode() == "exact"
    assert CGGRModel(model, TinyRouter(), kept_rows="bound", selection="sampled").kept_rows_mode() == "bound"
    assert KEPT_ROWS == ("auto", "exact", "bound")
    for bad in ("fast", None, 1, "Bound"):
        with pytest.raises(ValueError, match="kept_rows"):
            CGGRModel(model, TinyRouter(), kept_rows=bad)


@pytest.mark.parametrize("options", [dict(buckets=(2, 5)), dict(router_positions=3), dict(router_samples=2),
                                     dict(buckets=(3,), router_positions=4)])
def test_bound_equals_exact_with_buckets_and_cheaper_routers(options):
    """Buckets round k_max up (the main pass has the bucket of the bound, not of the count); a cheaper router
    (SPEC §9.3) can leave sequences without a scored eligible pair (ineligible), which the bound pads."""
    B, T = 9, 10
    logits, labels, am = _case(11, torch.float32, B, T, True)
    am[6, 3:] = 0                           # a short sequence: few scored pairs with a stride
    kw = dict(min_tokens_ratio=0.3, **options)
    exact = _step("exact", TinyLM, logits, labels, am, **kw)
    bound = _step("bound", TinyLM, logits, labels, am, **kw)
    _assert_same(exact, bound, B)
    cggr = bound[3]
    k_max, sizes = cggr.kept_rows_bound(B), cggr.bucket_sizes(B)
    want = k_max if sizes is None else min(b for b in sizes if b >= k_max)
    assert bound[0].outputs.shape[0] == want and bound[0].kept.shape == (k_max,)
