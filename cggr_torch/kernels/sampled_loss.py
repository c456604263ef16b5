"""The fused ``sampled`` loss (SPEC §7.4, §8) after the scoring kernel: :func:`sample_from_scores`, the custom
op ``cggr::sampled_loss_from_scores`` behind :class:`cggr_torch.CGGRLoss` on CUDA (``loss.forward_sampled``).

It runs the steps of the sampler (:mod:`cggr_torch.kernels.sampling`, whose module docstring states the
arithmetic) from the scoring kernel's buffers: step 1's first pass also sums every SPEC §10 metric and applies
the dynamic threshold (§5.2) to the device base ratio; step 4 writes the loss's row weights
``w ⊘ f32(max(1, n))`` and per-program partials (count, ``Σw``, ``Σw²``, ``Σ ω ⊗ nll``), which one finish
program reduces in a fixed order (``tokens_selected``, ``sample_ess``, the loss). Five launches with the
scoring kernel, plus the sort; the backward is the selective cross-entropy's sparse kernel with the row
weights.

The sampler's launch steps and tunables (``launch_water_filling``, ``launch_draws``, ``REDUCE_BLOCK``, …) are
read from the :mod:`~cggr_torch.kernels.sampling` module at call time, and so are this module's own two
launchers, which that module re-exports: the sampler module is the one namespace of the whole ``sampled``
path, so what a test or a benchmark stubs or re-tunes there applies to the fused loss too.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from . import sampling as sampler
from .cross_entropy import launch_selective_backward
from .inputs import device_guard, row_geometry
from .sampling import use_libdevice
from .sampling_math import expected_count, log_b, mass_and_share, probability_key, q_value, store_counts

__all__ = [
    "METRIC_INT_SLOTS",
    "METRIC_FLOAT_SLOTS",
    "SampledLoss",
    "sample_from_scores",
    "sampled_loss_from_scores_op",
    "sampled_loss_backward_op",
    "launch_scored_probabilities",
    "launch_finish",
]

#: Slots of the fused ``sampled`` loss's int64 metric buffer (SPEC §10 names; those of
#: :mod:`cggr_torch.kernels.selection`'s plan).
METRIC_INT_SLOTS = {"step": 0, "tokens_selected": 1, "tokens_total": 2, "tokens_nonfinite": 3,
                    "tokens_out_of_range": 4, "k": 5, "ok": 6}
#: Slots of its float32 metric buffer.
METRIC_FLOAT_SLOTS = {"token_ratio": 0, "effective_ratio": 1, "avg_confidence": 2, "avg_entropy": 3,
                      "avg_difficulty": 4, "sample_ess": 5}
_N_METRICS = 8


# =============================================================================================== kernels
@triton.jit
def _load_scored(status_ptr, stats_ptr, ref_ptr, idx, inb, N, HAS_REF: tl.constexpr):
    """``(status, e, d)`` of tokens ``idx`` from the scoring kernel's buffers (``stats`` float32 ``(6, N)``).
    With ``HAS_REF`` (``scoring='excess'``, the scoring pass run in mode ``loss``): ``d = nll ⊖ ref`` where the
    reference is finite, NaN (not eligible) elsewhere (SPEC §3.1); else ``d`` is the scoring pass's row 5."""
    st = tl.load(status_ptr + idx, mask=inb, other=0).to(tl.int32)
    if HAS_REF:
        nll = tl.load(stats_ptr + 4 * N + idx, mask=inb, other=0.0)
        ref = tl.load(ref_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        fin = tl.abs(ref) < float("inf")                              # false for ±inf and NaN
        d = tl.where(fin, nll - ref, float("nan"))
        e = ((st & 2) != 0) & fin & (d == d)
    else:
        d = tl.load(stats_ptr + 5 * N + idx, mask=inb, other=0.0)
        e = (st & 2) != 0                                             # eligible ⇒ d is not NaN (SPEC §4)
    return st, e, d


@triton.jit
def _scored_probabilities_kernel(
    status_ptr, stats_ptr, ref_ptr, base_ptr, step_ptr, key_ptr, ints_ptr, floats_ptr, mints_ptr, mfloats_ptr,
    N, sensitivity, floor, power, one_minus_mix, mix,
    HAS_REF: tl.constexpr, DYNAMIC: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program, the fused ``sampled`` loss's step 1 from the scoring kernel's buffers: pass 1 also sums
    every SPEC §10 metric (fixed order, as the selection plan), applies the dynamic threshold (§5.2) to the
    device base ratio and computes ``k`` (§5.3); passes 2-3 as the sampler's one-program probability kernel.
    Metrics go to ``mints`` (int64) / ``mfloats`` (float32), slots :data:`METRIC_INT_SLOTS` /
    :data:`METRIC_FLOAT_SLOTS`."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    cnt = tl.zeros([BLOCK], tl.int32)
    nonfinite = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    conf_acc = tl.zeros([BLOCK], tl.float32)
    ent_acc = tl.zeros([BLOCK], tl.float32)
    diff_acc = tl.zeros([BLOCK], tl.float32)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        st, e, d = _load_scored(status_ptr, stats_ptr, ref_ptr, idx, inb, N, HAS_REF)
        conf = tl.load(stats_ptr + 2 * N + idx, mask=inb, other=0.0)
        ent = tl.load(stats_ptr + N + idx, mask=inb, other=0.0)
        cnt += e.to(tl.int32)
        nonfinite += (((st & 1) != 0) & ~e).to(tl.int32)                # valid, not eligible
        bad += ((st & 4) != 0).to(tl.int32)
        conf_acc += tl.where(e, conf, 0.0)
        ent_acc += tl.where(e, ent, 0.0)
        diff_acc += tl.where(e, d, 0.0)
        top = tl.maximum(top, tl.where(e, log_b(d, floor, LIBDEVICE), float("-inf")))
    n = tl.sum(cnt.to(tl.int64), 0)
    nf = tl.maximum(n, 1).to(tl.float32)
    mean_conf = tl.math.div_rn(tl.sum(conf_acc, 0), nf)
    base = tl.load(base_ptr).to(tl.float32)
    if DYNAMIC:  # SPEC §5.2, operation by operation (compiled without FMA contraction)
        ratio = tl.minimum(base * (1.0 + (1.0 - mean_conf) * sensitivity), 1.0)
    else:
        ratio = base
    lb_max = tl.where(n > 0, tl.max(top, 0), 0.0)
    k, ok = expected_count(n, ints_ptr, ints_ptr, ratio, 0, 0)
    ok = ok & (tl.sum(bad, 0) == 0)
    q_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        _st, e, d = _load_scored(status_ptr, stats_ptr, ref_ptr, idx, inb, N, HAS_REF)
        q_acc += q_value(e, log_b(d, floor, LIBDEVICE), lb_max, power, LIBDEVICE)
    Q, share = mass_and_share(tl.sum(q_acc, 0), n, mix)
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        _st, e, d = _load_scored(status_ptr, stats_ptr, ref_ptr, idx, inb, N, HAS_REF)
        q = q_value(e, log_b(d, floor, LIBDEVICE), lb_max, power, LIBDEVICE)
        tl.store(key_ptr + idx, probability_key(e, q, Q, share, one_minus_mix), mask=inb)
    store_counts(ints_ptr, floats_ptr, n, k, ok, lb_max)
    tl.store(floats_ptr + 2, Q)
    zero_i = tl.zeros([], tl.int64)
    zero_f = tl.zeros([], tl.float32)
    tl.store(mints_ptr + 0, tl.load(step_ptr).to(tl.int64))
    tl.store(mints_ptr + 1, zero_i)                       # tokens_selected: the finish kernel's
    tl.store(mints_ptr + 2, n)
    tl.store(mints_ptr + 3, tl.sum(nonfinite.to(tl.int64), 0))
    tl.store(mints_ptr + 4, zero_i)
    tl.store(mints_ptr + 5, k)
    tl.store(mints_ptr + 6, ok.to(tl.int64))
    tl.store(mints_ptr + 7, zero_i)
    tl.store(mfloats_ptr + 0, base)
    tl.store(mfloats_ptr + 1, ratio)
    tl.store(mfloats_ptr + 2, mean_conf)
    tl.store(mfloats_ptr + 3, tl.math.div_rn(tl.sum(ent_acc, 0), nf))
    tl.store(mfloats_ptr + 4, tl.math.div_rn(tl.sum(diff_acc, 0), nf))
    tl.store(mfloats_ptr + 5, zero_f)                     # sample_ess: the finish kernel's
    tl.store(mfloats_ptr + 6, zero_f)
    tl.store(mfloats_ptr + 7, zero_f)


@triton.jit
def _finish_kernel(pcnt_ptr, pf_ptr, mints_ptr, mfloats_ptr, loss_ptr, G, R_BLOCK: tl.constexpr):
    """One program: the draw programs' partials reduced in one fixed order: ``tokens_selected``,
    ``sample_ess = (Σw)² ⊘ Σw²`` (0 when nothing is kept, SPEC §10) and the loss ``Σ ω ⊗ nll`` (SPEC §8)."""
    r = tl.arange(0, R_BLOCK)
    cnt = tl.zeros([R_BLOCK], tl.int64)
    s1 = tl.zeros([R_BLOCK], tl.float32)
    s2 = tl.zeros([R_BLOCK], tl.float32)
    sl = tl.zeros([R_BLOCK], tl.float32)
    for s0 in range(0, G, R_BLOCK):
        inr = (s0 + r) < G
        cnt += tl.load(pcnt_ptr + s0 + r, mask=inr, other=0).to(tl.int64)
        s1 += tl.load(pf_ptr + s0 + r, mask=inr, other=0.0)
        s2 += tl.load(pf_ptr + G + s0 + r, mask=inr, other=0.0)
        sl += tl.load(pf_ptr + 2 * G + s0 + r, mask=inr, other=0.0)
    S1 = tl.sum(s1, 0)
    S2 = tl.sum(s2, 0)
    ess = tl.where(S2 > 0.0, tl.math.div_rn(S1 * S1, tl.where(S2 > 0.0, S2, 1.0)), 0.0)
    tl.store(mints_ptr + 1, tl.sum(cnt, 0))
    tl.store(mfloats_ptr + 5, ess)
    tl.store(loss_ptr, tl.sum(sl, 0))


# ============================================================================================ launchers
def launch_scored_probabilities(status: torch.Tensor, stats: torch.Tensor, reference: Optional[torch.Tensor],
                                base: torch.Tensor, step: torch.Tensor, key: torch.Tensor, ints: torch.Tensor,
                                floats: torch.Tensor, mints: torch.Tensor, mfloats: torch.Tensor, *,
                                dynamic: bool, sensitivity: float, power: float, uniform_mix: float,
                                floor: float) -> None:
    """Step 1 of the fused ``sampled`` loss (one program): from the scoring kernel's ``status`` (int8 ``(N,)``)
    and ``stats`` (float32 ``(6, N)``), plus ``reference`` (float32 ``(N,)``, ``scoring='excess'``), the sort
    key of ``p``, the sampler's ``ints``/``floats`` and every SPEC §10 metric into ``mints`` (int64 ``(8,)``)
    and ``mfloats`` (float32 ``(8,)``). ``base`` (float32) and ``step`` (int64) are one-element device tensors.

    One program whatever ``N``: the multi-program probability kernels do not sum the metrics (above the
    sampler's ``SINGLE_PROGRAM_MAX_TOKENS`` this launch is slower than they are, but never wrong)."""
    n_tok = status.numel()
    floor_v, power_v = float(np.float32(floor)), float(np.float32(power))
    keep_v, mix_v = float(np.float32(1.0 - uniform_mix)), float(np.float32(uniform_mix))
    with device_guard(status):
        _scored_probabilities_kernel[(1,)](
            status, stats, reference if reference is not None else stats, base, step, key, ints, floats, mints,
            mfloats, n_tok, float(sensitivity), floor_v, power_v, keep_v, mix_v,
            HAS_REF=reference is not None, DYNAMIC=bool(dynamic), LIBDEVICE=use_libdevice(),
            BLOCK=sampler.PROB_BLOCK, num_warps=sampler.PROB_WARPS, enable_fp_fusion=False,
        )


def launch_finish(fused: sampler.DrawPartials, mints: torch.Tensor, mfloats: torch.Tensor,
                  loss: torch.Tensor) -> None:
    """One program: ``tokens_selected``, ``sample_ess`` and the loss (float32, one element) from the draw
    programs' partials."""
    with device_guard(mints):
        _finish_kernel[(1,)](fused.count, fused.sums, mints, mfloats, loss, fused.count.numel(),
                             R_BLOCK=sampler.REDUCE_BLOCK, num_warps=4, enable_fp_fusion=False)


# ========================================================================================== public API
class SampledLoss(NamedTuple):
    """Result of :func:`sample_from_scores`: the float32 ``loss`` ``Σ_{i∈mask} ω_i·nll_i`` (with gradient
    through the logits), the bool ``mask`` and float32 ``row_weights`` ``ω = w/max(1, n)`` (token shape,
    detached), and the SPEC §10 metric buffers ``ints`` (int64) / ``floats`` (float32), slots
    :data:`METRIC_INT_SLOTS` / :data:`METRIC_FLOAT_SLOTS`."""

    loss: torch.Tensor
    mask: torch.Tensor
    row_weights: torch.Tensor
    ints: torch.Tensor
    floats: torch.Tensor


def sample_from_scores(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, status: torch.Tensor,
                       token_shape: tuple[int, ...], *, reference: Optional[torch.Tensor],
                       base_ratio: torch.Tensor, step: torch.Tensor, dynamic: bool, threshold_sensitivity: float,
                       seed: int, power: float, uniform_mix: float, floor: float) -> SampledLoss:
    """:class:`cggr_torch.CGGRLoss`'s fused ``sampled`` path after the scoring kernel (no checks: the buffers
    come from :func:`cggr_torch.kernels.scoring.scoring_op` with a sort key, the parameters from a validated
    ``CGGRConfig``). Five launches around one ``torch.sort``: probabilities from the scores (every metric, the
    dynamic ratio, ``k``), the sort, water-filling, the draws (mask, row weights, per-program partials) and a
    one-program finish (count, ``sample_ess``, loss); the backward is the selective cross-entropy's sparse
    kernel with the row weights. Runs as the custom op ``cggr::sampled_loss_from_scores`` (SPEC §12.1).

    Args:
        logits: the differentiable logits (read only by the backward).
        targets: flat int64 ``(N,)`` (:func:`cggr_torch.kernels.scoring.flat_targets`).
        stats, status: the scoring kernel's float32 ``(6, N)`` and int8 ``(N,)`` buffers.
        reference: ``scoring='excess'``: float32 reference losses (``N`` elements; the scoring pass ran in mode
            ``loss``), else None.
        base_ratio, step: 0-d float32 / int64 tensors on the device (the curriculum, SPEC §5.1, §12.1).
        dynamic, threshold_sensitivity: SPEC §5.2.
        seed, power, uniform_mix, floor: SPEC §7.4.
    """
    ref = None if reference is None else reference.reshape(-1).to(torch.float32).contiguous()
    loss, mask, w, ints, floats = sampled_loss_from_scores_op(
        logits, targets, stats, status, ref, base_ratio.reshape(()), step.reshape(()), bool(dynamic),
        float(threshold_sensitivity), int(seed), float(power), float(uniform_mix), float(floor))
    return SampledLoss(loss, mask.view(token_shape), w.detach().view(token_shape), ints, floats.detach())


@torch.library.custom_op("cggr::sampled_loss_from_scores", mutates_args=())
def sampled_loss_from_scores_op(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                                status: torch.Tensor, reference: Optional[torch.Tensor], base_ratio: torch.Tensor,
                                step: torch.Tensor, dynamic: bool, threshold_sensitivity: float, seed: int,
                                power: float, uniform_mix: float, floor: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_from_scores` as a custom op: ``(loss, mask, row_weights, ints, floats)`` (flat mask and
    weights). Every output element is written by a kernel."""
    dev = stats.device
    n_tok = status.numel()
    ints, floats = sampler.plan_buffers(dev)
    mints = torch.empty((_N_METRICS,), dtype=torch.int64, device=dev)
    mfloats = torch.empty((_N_METRICS,), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    key = torch.empty((n_tok,), dtype=torch.int32, device=dev)
    base_t, step_t = base_ratio.reshape(1), step.reshape(1)
    sampler.launch_scored_probabilities(status, stats, reference, base_t, step_t, key, ints, floats, mints, mfloats,
                                dynamic=dynamic, sensitivity=threshold_sensitivity, power=power,
                                uniform_mix=uniform_mix, floor=floor)
    sorted_key, order = sampler.sort_by_probability(key)
    partials = sampler.launch_water_filling(sorted_key, ints, floats)
    mask = torch.empty((n_tok,), dtype=torch.bool, device=dev)
    weights = torch.empty((n_tok,), dtype=torch.float32, device=dev)
    g = sampler.draw_programs(n_tok)
    fused = sampler.DrawPartials(stats[4], torch.empty((g,), dtype=torch.int32, device=dev),
                         torch.empty((3, g), dtype=torch.float32, device=dev))
    sampler.launch_draws(sorted_key, order, ints, floats, mask=mask, weights=weights, seed=seed, step=step_t,
                 partials=partials, fused=fused)
    sampler.launch_finish(fused, mints, mfloats, loss)
    return loss, mask, weights, mints, mfloats


@sampled_loss_from_scores_op.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, status: torch.Tensor,
      reference: Optional[torch.Tensor], base_ratio: torch.Tensor, step: torch.Tensor, dynamic: bool,
      threshold_sensitivity: float, seed: int, power: float, uniform_mix: float, floor: float
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = stats.device
    n = status.shape[0]
    return (torch.empty((), dtype=torch.float32, device=dev), torch.empty((n,), dtype=torch.bool, device=dev),
            torch.empty((n,), dtype=torch.float32, device=dev),
            torch.empty((_N_METRICS,), dtype=torch.int64, device=dev),
            torch.empty((_N_METRICS,), dtype=torch.float32, device=dev))


@torch.library.custom_op("cggr::sampled_loss_backward", mutates_args=())
def sampled_loss_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                             mask: torch.Tensor, stats: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``∂loss/∂logits`` of :func:`sampled_loss_from_scores_op`: ``g·ω_i·(softmax(z_i) − onehot(t_i))`` on the
    kept rows (from the scoring pass's ``lse``, ``stats[0]``), exact zeros elsewhere (SPEC §8)."""
    geom = row_geometry(logits.detach())
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    grad = torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    launch_selective_backward(geom, targets, mask, stats[0], g, grad, None, row_weights=row_weights)
    return grad


@sampled_loss_backward_op.register_fake
def _(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
      stats: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)


def _sampled_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    logits, targets, stats = inputs[0], inputs[1], inputs[2]
    _loss, mask, weights, _ints, _floats = output
    ctx.save_for_backward(logits, targets, mask, stats, weights)


def _sampled_backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
    logits, targets, mask, stats, weights = ctx.saved_tensors
    grad = sampled_loss_backward_op(grad_loss, logits, targets, mask, stats, weights)
    return (grad,) + (None,) * 12


sampled_loss_from_scores_op.register_autograd(_sampled_backward, setup_context=_sampled_setup_context)
