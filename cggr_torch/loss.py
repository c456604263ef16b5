"""``CGGRLoss``: cross-entropy over the hardest tokens only (SPEC §5, §7, §8, §10).

One call::

    scores      = score_tokens(logits, targets)                    (§2-§4, no gradient)
    base        = schedule(step)                                   (§5.1, float32, from the step tensor)
    c̄           = Σ_eligible p1 / max(1, n)                        (device float32)
    ratio       = min(1, base·(1 + (1 − c̄)·sensitivity))            (§5.2; = base when off / fixed_quota)
    mask, k     = select_tokens(d, eligible, ratio, ...)           (§5.3, §7)
    loss        = Σ_{i ∈ mask} ce_i / max(1, |mask|)                (§8, float32)

The stages are those of :mod:`cggr_torch.pipeline` (SPEC §2-§10). On CUDA with the default ``base_loss`` the
whole forward is the **fused kernel path** (:func:`forward_fused`, the pipeline realised in kernels, chosen
by :func:`cggr_torch.dispatch.use_fused_loss`), about ten launches and no host synchronisation:

1. the scoring kernel (:func:`cggr_torch.kernels.scoring.launch_scoring`) writes the statistics, the
   difficulty, an int8 status (valid / eligible / target out of range) and the int32 sort key of SPEC §6;
2. one plan program (:mod:`cggr_torch.kernels.selection`) sums the eligible count, confidence, entropy and
   difficulty in a fixed order, applies the dynamic threshold and computes ``k`` exactly, writing every
   SPEC §10 metric into two small device buffers (plus ``torch._assert_async`` on the target-range flag);
3. one ``torch.sort`` of the keys and one mask pass (plus a row sort and a top-up pass for
   ``sequence_aware``);
4. the loss is the masked mean of the scoring pass's ``nll`` (one program); the backward kernel reads only
   the selected rows and forms ``g/|S|`` on the device.

``selection='sampled'`` (SPEC §7.4) has its own fused path, :func:`forward_sampled`: the scoring kernel, then
one custom op (:func:`cggr_torch.kernels.sampled_loss.sample_from_scores`: probabilities with every metric and
the dynamic ratio, one sort, water-filling, draws writing the row weights ``w/max(1, n)``, a one-program finish
with the loss ``Σ ω·nll``), five launches and the sort; the backward is the sparse kernel with the row weights.

The loss's difficulties are bit-identical to :func:`cggr_torch.scoring.difficulty_from_statistics` of the
kernel's statistics, and the selection is bit-identical to :func:`cggr_torch.selection.select_tokens` on
them. Other kernel devices (the Triton interpreter in tests) and a custom ``base_loss`` use the composable
path: scoring kernel → :func:`select_tokens` → selective cross-entropy kernel (or ``base_loss``).
``CGGR_DISABLE_KERNELS=1`` (or ``dispatch.force("reference")``) forces the PyTorch reference below, and a
kernel error is raised, never replaced.

In the reference, ``ce`` is computed on *sanitised* inputs: rows that are not finite are replaced by zeros
and ignored targets by 0, so unselected tokens contribute an exact zero gradient (never ``0·NaN``) and
nothing is read out of bounds. Hence ``∂loss/∂z_i = (softmax(z_i) − onehot(t_i)) / |mask|`` for selected
``i`` and 0 elsewhere, and a call with nothing selectable returns ``0.0`` with an all-zero gradient.

The forward pass never synchronises with the device: ``k``, the masks and the metrics stay tensors; the
curriculum ratio is computed on the device from the module's step tensor (SPEC §12.1: the forward compiles
with ``torch.compile(fullgraph=True)``, once for every step); metrics are converted to Python numbers only by
:meth:`CGGRLoss.get_metrics`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cggr import METRIC_KEYS, NUMERIC_METRIC_KEYS, CGGRConfig
from cggr.config import SAMPLED_SELECTIONS

from . import dispatch
from .curriculum import Curriculum, Schedule, base_ratio_tensor, host_step, linear_warmup_ratio, step_tensor
from .pipeline import host_metrics, loss_weights, select_and_measure
from .scoring import check_reference_nll, compute_statistics, row_finite
from .utils import check_logits, check_target_range, check_targets, resolve_config, widen_labels

__all__ = ["CGGRLoss", "cggr_loss", "METRIC_KEYS", "NUMERIC_METRIC_KEYS", "Schedule", "check_base_loss",
           "check_schedule", "validate_inputs", "forward_fused", "forward_reference",
           "forward_sampled", "selected_cross_entropy"]


def check_base_loss(base_loss: Any) -> None:
    """``base_loss`` is None or a callable with ``reduction='none'`` (one loss per token)."""
    if base_loss is None:
        return
    if not callable(base_loss):
        raise ValueError(f"base_loss: expected None or a callable loss module, got {type(base_loss).__name__}")
    reduction = getattr(base_loss, "reduction", None)
    if reduction is not None and reduction != "none":
        raise ValueError(f"base_loss: expected reduction='none' (one loss per token), got reduction={reduction!r}")


def check_schedule(ratio_schedule: Any, config: CGGRConfig) -> Schedule:
    """The ratio schedule of an entry point: ``ratio_schedule`` or the linear warmup of ``config``."""
    if ratio_schedule is None:
        return linear_warmup_ratio(config.min_tokens_ratio, config.warmup_steps)
    if not callable(ratio_schedule):
        raise ValueError(f"ratio_schedule: expected None or a callable step -> ratio in (0, 1], got "
                         f"{type(ratio_schedule).__name__}")
    return ratio_schedule


def validate_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, *,
                    range_check: bool = True) -> torch.Tensor:
    """SPEC §1/§11 checks of a loss call; returns ``targets`` widened by the label-dtype rule."""
    check_logits(logits)
    check_targets(targets, logits)
    targets = widen_labels(targets, ignore_index)
    if range_check:
        check_target_range(targets, logits.shape[-1], ignore_index)
    return targets


def _fused(logits: Any, base_loss: Optional[Callable[..., torch.Tensor]], scoring: str,
           selection: Optional[str] = None) -> bool:
    """The fused kernel path applies: default base loss, dispatch says so (see
    :func:`cggr_torch.dispatch.use_fused_loss`), and its kernels import (``sample_from_scores`` for
    ``sampled``, ``select_from_scores`` for the other strategies)."""
    entry = "sample_from_scores" if selection in SAMPLED_SELECTIONS else "select_from_scores"
    return (base_loss is None and isinstance(logits, torch.Tensor)
            and dispatch.use_fused_loss(logits, scoring, selection)
            and dispatch.kernel(entry) is not None)


def forward_sampled(logits: torch.Tensor, targets: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
                    cfg: CGGRConfig, reference_nll: Optional[torch.Tensor] = None, *,
                    inplace_backward: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused ``sampled`` loss (SPEC §7.4, §8) on statically validated inputs: the scoring kernel (with
    status; ``scoring='excess'`` runs it in mode ``loss`` and the sampler subtracts ``reference_nll``, SPEC §3.1)
    then :func:`cggr_torch.kernels.sampled_loss.sample_from_scores` (probabilities with every SPEC §10 metric, one
    sort, water-filling, draws writing the row weights ``w/max(1, n)``, a one-program finish): about seven
    launches, no host synchronisation. The target range is checked on the device (the ``ok`` slot), as
    :func:`forward_fused` does. Equal to :func:`forward_reference`'s composable kernel path: the same
    ``k``, mask and weights (given the same ratio), the loss and ``sample_ess`` up to float32 summation order.

    ``inplace_backward`` (checked by the caller): the sampler runs on the detached logits and
    :func:`cggr_torch.kernels.cross_entropy.weighted_selective_cross_entropy` attaches the same gradient,
    written into the logits buffer (SPEC §8.1)."""
    from .kernels import cross_entropy as kce
    from .kernels import sampled_loss as ksam
    from .kernels import scoring as ks
    from .kernels import selection as ksel

    sample_from_scores = dispatch.kernel("sample_from_scores")
    V = logits.shape[-1]
    mode = ks.MODE_CODE["loss" if reference_nll is not None else cfg.scoring]
    t = ks.flat_targets(targets)
    with torch.no_grad():
        out, _finite, _key, status = ks.scoring_op(logits.detach(), targets, cfg.ignore_index, mode,
                                                   ksel.SORT_KEY_BITS)
    res = sample_from_scores(   # in place: the op runs on the detached logits, the gradient is attached below
        logits.detach() if inplace_backward else logits, t, out, status, tuple(logits.shape[:-1]),
        reference=reference_nll, base_ratio=base, step=step,
        dynamic=cfg.uses_dynamic_threshold, threshold_sensitivity=cfg.threshold_sensitivity, seed=cfg.sample_seed,
        power=cfg.sample_power, uniform_mix=cfg.sample_uniform_mix, floor=cfg.sample_floor)
    ints, floats = res.ints, res.floats
    ok = ints[ksam.METRIC_INT_SLOTS["ok"]]
    if logits.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok != 0, f"targets: every value must lie in [0, {V}) or equal "
                                     f"ignore_index={cfg.ignore_index}")
    elif not bool(ok):  # interpreter (CPU tensors): eager, as check_target_range
        check_target_range(targets, V, cfg.ignore_index)
    metrics = {name: ints[slot] for name, slot in ksam.METRIC_INT_SLOTS.items()}
    metrics.update({name: floats[slot] for name, slot in ksam.METRIC_FLOAT_SLOTS.items()})
    loss = res.loss
    if inplace_backward:
        loss = kce.weighted_selective_cross_entropy(
            logits, ks.row_geometry(logits.detach()), t, res.mask.reshape(-1), out[0], res.row_weights.reshape(-1),
            res.loss, inplace_backward=True)
    return loss, {name: metrics[name] for name in NUMERIC_METRIC_KEYS}


def forward_fused(logits: torch.Tensor, targets: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
                  cfg: CGGRConfig, *, inplace_backward: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss in ~10 kernel launches on statically validated inputs (see the module docstring).

    The target range is checked by the plan kernel (the ``ok`` slot) and ``torch._assert_async`` - one launch
    instead of eight; an out-of-range target is never read either way (its row is not eligible).
    ``inplace_backward`` (checked by the caller): the backward writes the gradient into the logits buffer
    (SPEC §8.1; the same kernel and values, no ``N·V`` allocation).
    """
    from .kernels import cross_entropy as kce
    from .kernels import scoring as ks
    from .kernels import selection as ksel

    select_from_scores = dispatch.kernel("select_from_scores")
    dev = logits.device
    V = logits.shape[-1]
    token_shape = tuple(logits.shape[:-1])
    with torch.no_grad():
        # One custom op (cggr::scoring): statistics, difficulty, status and sort key in one pass.
        out, _finite, key, status = ks.scoring_op(logits.detach(), targets, cfg.ignore_index,
                                                  ks.MODE_CODE[cfg.scoring], ksel.SORT_KEY_BITS)
        t = ks.flat_targets(targets)
        plan = select_from_scores(
            key, status, out, token_shape, selection=cfg.selection, num_strata=cfg.num_strata,
            min_tokens_per_sequence=cfg.min_tokens_per_sequence, base_ratio=base,
            dynamic=cfg.uses_dynamic_threshold, threshold_sensitivity=cfg.threshold_sensitivity, step=step)
        ints, floats = plan.ints, plan.floats
        if dev.type == "cuda" or torch.compiler.is_compiling():
            torch._assert_async(ints[ksel.INT_SLOTS["ok"]] != 0,
                                f"targets: every value must lie in [0, {V}) or equal ignore_index={cfg.ignore_index}")
        elif not bool(ints[ksel.INT_SLOTS["ok"]]):  # interpreter (CPU tensors): eager, as check_target_range
            check_target_range(targets, V, cfg.ignore_index)
    if inplace_backward:
        count = torch.empty((1,), dtype=torch.int64, device=dev)
        loss = kce.scored_selective_cross_entropy(logits, ks.row_geometry(logits.detach()), t,
                                                  plan.mask.reshape(-1), out[0], out[4], count,
                                                  inplace_backward=True)
    else:
        loss, count = kce.scored_selective_cross_entropy_op(logits, t, plan.mask.reshape(-1), out[0], out[4])
    metrics = {name: ints[slot] for name, slot in ksel.INT_SLOTS.items() if name in NUMERIC_METRIC_KEYS}
    metrics.update({name: floats[slot] for name, slot in ksel.FLOAT_SLOTS.items()})
    metrics["tokens_selected"] = count.reshape(())   # the real count (sequence_aware may exceed k)
    # SPEC §10: an unweighted selection's effective sample size is its count (the fused path is never sampled).
    metrics["sample_ess"] = count.reshape(()).to(torch.float32)
    return loss, {name: metrics[name] for name in NUMERIC_METRIC_KEYS}


def forward_reference(logits: torch.Tensor, targets: torch.Tensor, step: Union[int, torch.Tensor],
                      base: Union[np.float32, torch.Tensor],
                      cfg: CGGRConfig, base_loss: Optional[Callable[..., torch.Tensor]],
                      reference_nll: Optional[torch.Tensor] = None, *, inplace_backward: bool = False
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The composable path on validated inputs: :mod:`cggr_torch.pipeline`, then the selective cross-entropy
    (the kernel where dispatch says so and ``base_loss`` is the default); returns ``(loss, metrics)``.
    ``reference_nll``: the checked float32 reference of ``scoring='excess'`` (SPEC §3.1), else None.
    ``inplace_backward`` (checked by the caller): the kernel writes the gradient into the logits buffer; the
    PyTorch cross-entropy (no kernel, or a ``base_loss``) leaves them intact (SPEC §8.1)."""
    with torch.no_grad():
        stats = compute_statistics(logits.detach(), targets, cfg.ignore_index)
        measured = select_and_measure(stats, targets, step, base, cfg, reference_nll)
        mask, metrics = measured.mask, measured.metrics
        count = metrics["tokens_selected"]
        # SPEC §8: ``sampled`` weights row i by w_i / max(1, n) (Horvitz–Thompson); None: the selected mean.
        row_weights = loss_weights(measured, cfg)

    ce_kernel = None
    if base_loss is None and dispatch.use_kernels(logits):
        ce_kernel = dispatch.kernel("selective_cross_entropy_triton")
    if ce_kernel is not None:
        # Sparse forward/backward: only the selected rows are read; the gradient of the others is written as 0.
        # Keywords only when set: a test's replacement kernel (dispatch.force(kernels=...)) need not take them.
        extra: dict[str, Any] = {} if row_weights is None else {"row_weights": row_weights}
        if inplace_backward:
            extra["inplace_backward"] = True
        loss = ce_kernel(logits, targets, mask, ignore_index=cfg.ignore_index, lse=stats.lse, **extra)
    else:
        with torch.no_grad():
            row_ok = row_finite(stats, has_targets=True)
        total = selected_cross_entropy(logits, targets, mask, row_ok, measured.scores.valid, base_loss,
                                       row_weights)
        loss = total if row_weights is not None else total / torch.clamp(count, min=1).to(torch.float32)
    return loss, metrics


def selected_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           row_ok: torch.Tensor, valid: torch.Tensor,
                           base_loss: Optional[Callable[..., torch.Tensor]],
                           row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_{i ∈ mask} ce_i`` (float32, with gradient) on sanitised inputs: the reference loss's sum (SPEC §8),
    shared with :mod:`cggr_torch.distributed`. With ``row_weights`` (float32, the token shape; ``sampled``,
    SPEC §7.4) the weighted sum ``Σ_{i ∈ mask} row_weights_i·ce_i``.

    Rows that are not finite (``row_ok`` False) are replaced by zeros and ignored/out-of-range targets by 0
    before the cross-entropy, so unselected tokens get an exact zero gradient (never ``0·NaN``) and nothing is
    read out of bounds; ``base_loss`` must return one loss per token.
    """
    V = logits.shape[-1]
    with torch.no_grad():
        safe_t = torch.where(valid & (targets >= 0) & (targets < V), targets, torch.zeros_like(targets))
        safe_t = safe_t.reshape(-1).to(torch.int64)
    z = logits.reshape(-1, V).to(torch.float32)
    z = torch.where(row_ok.reshape(-1, 1), z, torch.zeros_like(z))   # non-finite rows → 0
    if base_loss is None:
        ce = F.cross_entropy(z, safe_t, reduction="none")
    else:
        ce = base_loss(z, safe_t)
        if not isinstance(ce, torch.Tensor) or tuple(ce.shape) != (z.shape[0],):
            got = tuple(ce.shape) if isinstance(ce, torch.Tensor) else type(ce).__name__
            raise ValueError(f"base_loss: expected one loss per token, shape ({z.shape[0]},), got {got}; "
                             f"use reduction='none'")
        ce = ce.to(torch.float32)
    flat = mask.reshape(-1)
    if row_weights is not None:
        ce = ce * row_weights.reshape(-1).to(torch.float32)
    return torch.where(flat, ce, torch.zeros_like(ce)).sum()


def _check_inplace_backward(inplace_backward: Any, logits: torch.Tensor) -> bool:
    """``inplace_backward`` of a loss: a bool; when True, ``logits`` must be able to receive their own gradient
    (eager mode, unit stride along V, rows that do not overlap: the kernels' rule,
    :func:`cggr_torch.kernels.cross_entropy.check_inplace_logits`; SPEC §8.1)."""
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
    if inplace_backward:
        try:
            from .kernels.cross_entropy_backward import check_inplace_logits
        except ImportError:   # no Triton: no kernel can overwrite the logits, the permission is simply unused
            return inplace_backward
        check_inplace_logits(logits)
    return inplace_backward


def _forward(logits: Any, targets: Any, ratio_of: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]],
             cfg: CGGRConfig, base_loss: Optional[Callable[..., torch.Tensor]],
             reference_nll: Optional[torch.Tensor] = None,
             inplace_backward: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Validate, then the fused or the composable path. ``ratio_of(device)`` gives ``(step, base)`` as 0-d
    tensors on the logits' device (SPEC §5.1, §12.1: the step is a tensor, never a constant of a graph)."""
    fused = _fused(logits, base_loss, cfg.scoring, cfg.selection)
    targets = validate_inputs(logits, targets, cfg.ignore_index, range_check=not fused)
    inplace_backward = _check_inplace_backward(inplace_backward, logits)
    reference_nll = check_reference_nll(reference_nll, cfg.scoring, tuple(targets.shape), device=logits.device)
    step, base = ratio_of(logits.device)
    if fused and cfg.selection in SAMPLED_SELECTIONS:
        return forward_sampled(logits, targets, step, base, cfg, reference_nll, inplace_backward=inplace_backward)
    if fused:
        return forward_fused(logits, targets, step, base, cfg, inplace_backward=inplace_backward)
    return forward_reference(logits, targets, step, base, cfg, base_loss, reference_nll,
                             inplace_backward=inplace_backward)


def cggr_loss(logits: torch.Tensor, targets: torch.Tensor, step: Union[int, torch.Tensor], *,
              scoring: str = CGGRConfig.scoring, selection: str = CGGRConfig.selection,
              dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
              threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
              min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
              num_strata: int = CGGRConfig.num_strata,
              min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
              base_loss: Optional[Callable[..., torch.Tensor]] = None, ignore_index: int = CGGRConfig.ignore_index,
              ratio_schedule: Optional[Schedule] = None, config: Optional[CGGRConfig] = None,
              reference_nll: Optional[torch.Tensor] = None, sample_power: float = CGGRConfig.sample_power,
              sample_uniform_mix: float = CGGRConfig.sample_uniform_mix,
              sample_floor: float = CGGRConfig.sample_floor, sample_seed: int = CGGRConfig.sample_seed,
              inplace_backward: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Functional CGGR loss at curriculum ``step``: ``(loss, metrics)``.

    ``step``: a host integer ``>= 0`` or a 0-d integer tensor (on the logits' device). Under
    ``torch.compile`` pass a tensor: a Python int is a constant of the graph (a recompilation when it
    changes, until the compiler marks it dynamic).

    ``loss`` is a float32 scalar with gradient; ``metrics`` maps :data:`NUMERIC_METRIC_KEYS` to detached 0-d
    tensors on the logits' device (no synchronisation). Arguments as :class:`CGGRLoss` (``inplace_backward``
    included); ``reference_nll`` as its ``forward`` (``scoring='excess'`` only, SPEC §3.1).
    """
    cfg = resolve_config(config, dict(
        scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
        threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
        num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index,
        sample_power=sample_power, sample_uniform_mix=sample_uniform_mix, sample_floor=sample_floor,
        sample_seed=sample_seed))
    check_base_loss(base_loss)
    schedule = check_schedule(ratio_schedule, cfg)
    if not isinstance(step, torch.Tensor):
        host_step(step)

    def ratio_of(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s = step_tensor(step, device)
        host = None if isinstance(step, torch.Tensor) else (lambda: int(step))
        return s, base_ratio_tensor(schedule, s, host=host)

    return _forward(logits, targets, ratio_of, cfg, base_loss, reference_nll, inplace_backward)


class CGGRLoss(Curriculum, nn.Module):
    """Confidence-Gated Gradient Routing loss: mean cross-entropy over the hardest tokens.

    Args:
        scoring: difficulty, one of ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'`` (SPEC §3) or
            ``'excess'`` (``nll − reference_nll``, SPEC §3.1; pass ``reference_nll`` to ``forward``).
        selection: one of ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'`` (SPEC §7) or
            ``'sampled'`` (SPEC §7.4: a random draw of ``k`` expected tokens, each loss weighted by ``1/π``).
        dynamic_threshold: scale the ratio by the batch confidence (SPEC §5.2).
        threshold_sensitivity: ``>= 0``, finite; how strongly low confidence raises the ratio.
        min_tokens_ratio: ``(0, 1]``, the ratio reached after warmup.
        warmup_steps: integer ``>= 0``; the ratio decays linearly from 1 to ``min_tokens_ratio``.
        num_strata: ``>= 1``, strata of ``'stratified'``.
        min_tokens_per_sequence: ``>= 0``, per-sequence floor of ``'sequence_aware'``.
        base_loss: ``None`` (float32 cross-entropy) or a module/callable with ``reduction='none'`` mapping
            ``(logits (N, V) float32, targets (N,) int64)`` to ``(N,)`` per-token losses. It receives sanitised
            inputs: rows that are not finite are zeros and ignored targets are 0 (their loss is discarded).
        ignore_index: target value of tokens without a target (never scored, selected or counted).
        ratio_schedule: optional ``step -> ratio`` (host number in ``(0, 1]``) replacing the linear warmup;
            ``min_tokens_ratio`` and ``warmup_steps`` are then validated but unused.
        config: a ready :class:`cggr.CGGRConfig` instead of the settings above (stored as ``.config``).
        sample_power, sample_uniform_mix, sample_floor, sample_seed: ``β >= 0``, ``λ ∈ [0, 1]``, ``ε > 0`` and
            the hash seed of ``'sampled'`` (SPEC §7.4; keyword-only).
        inplace_backward: keyword-only, default False. True lets the backward write ``∂loss/∂logits`` into the
            logits you passed (SPEC §8.1): no ``N·V`` gradient buffer is allocated, but **the
            logits you passed hold the gradient after backward; do not read them again** (and call backward
            once per forward). Any other autograd use of the logits that saved them (``(logits * w).sum()``, a
            view of them) raises PyTorch's "modified by an inplace operation" error rather than a wrong
            gradient. Needs unit stride along V and non-overlapping rows (a slice such as ``logits[:, :-1]`` is
            fine; else ``ValueError`` naming ``logits``); eager only (``ValueError`` under ``torch.compile``).
            The PyTorch reference path (no kernels, or a ``base_loss``) leaves the logits intact.

    ``forward(logits, targets)`` takes ``(B, T, V)`` with ``(B, T)`` or ``(N, V)`` with ``(N,)`` (already
    shifted for a causal LM, see :func:`cggr_torch.shift_for_causal_lm`) and returns the float32 loss.
    Call :meth:`step` after each optimizer step (or :meth:`set_step`); the step is part of :meth:`state_dict`.

    ``torch.compile`` (SPEC §12.1): the forward compiles with ``fullgraph=True`` and is compiled once for every
    step - the step is the module's ``curriculum_step`` buffer, so move the loss to the logits' device
    (``loss.to(device)``) and call :meth:`step` outside the compiled function (inside, it is a graph break).
    A custom ``ratio_schedule`` is called on the host: one graph break per call, no recompilation.
    """

    def __init__(self, scoring: str = CGGRConfig.scoring, selection: str = CGGRConfig.selection,
                 dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                 threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                 min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
                 num_strata: int = CGGRConfig.num_strata,
                 min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                 base_loss: Optional[Callable[..., torch.Tensor]] = None,
                 ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None, *,
                 config: Optional[CGGRConfig] = None, sample_power: float = CGGRConfig.sample_power,
                 sample_uniform_mix: float = CGGRConfig.sample_uniform_mix,
                 sample_floor: float = CGGRConfig.sample_floor, sample_seed: int = CGGRConfig.sample_seed,
                 inplace_backward: bool = False) -> None:
        super().__init__()
        self.config = resolve_config(config, dict(
            scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence,
            ignore_index=ignore_index, sample_power=sample_power, sample_uniform_mix=sample_uniform_mix,
            sample_floor=sample_floor, sample_seed=sample_seed))
        check_base_loss(base_loss)
        self._init_curriculum(self.config.min_tokens_ratio, self.config.warmup_steps,
                              check_schedule(ratio_schedule, self.config))
        self.base_loss = base_loss  # an nn.Module is registered as a submodule (moves with .to())
        self._metrics: Optional[dict[str, torch.Tensor]] = None
        if not isinstance(inplace_backward, bool):
            raise ValueError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
        if inplace_backward and type(self).forward is not CGGRLoss.forward:
            # A subclass with its own forward (distributed, fused head) would silently ignore the permission.
            raise ValueError(f"inplace_backward: {type(self).__name__} does not support True (CGGRLoss only)")
        self.inplace_backward = inplace_backward

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selective loss of one batch (float32 scalar). Never synchronises with the device.

        ``reference_nll``: with ``scoring='excess'`` (and only then), the reference model's per-token loss, a
        floating tensor of the targets' shape; the difficulty is ``nll − reference_nll`` (SPEC §3.1).
        """
        loss, self._metrics = _forward(logits, targets, self.base_ratio_on, self.config, self.base_loss,
                                       reference_nll, self.inplace_backward)
        return loss

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last ``forward`` as Python scalars (this call synchronises).

        Before the first ``forward`` the counts and averages are 0 and ``token_ratio``/``effective_ratio`` are
        the curriculum ratio of the current step.
        """
        return host_metrics(self._metrics, self._step, self.base_ratio(), self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"scoring={c.scoring!r}, selection={c.selection!r}, dynamic_threshold={c.dynamic_threshold}, "
                f"threshold_sensitivity={c.threshold_sensitivity}, min_tokens_ratio={c.min_tokens_ratio}, "
                f"warmup_steps={c.warmup_steps}, num_strata={c.num_strata}, "
                f"min_tokens_per_sequence={c.min_tokens_per_sequence}, ignore_index={c.ignore_index}, "
                f"step={self._step}" + (", inplace_backward=True" if self.inplace_backward else ""))
