"""``CGGRLoss``: cross-entropy over the hardest tokens only (SPEC §5, §7, §8, §10).

One call::

    scores      = score_tokens(logits, targets)                    (§2-§4, no gradient)
    base        = schedule(step)                                   (§5.1, host float32)
    c̄           = Σ_eligible p1 / max(1, n)                        (device float32)
    ratio       = min(1, base·(1 + (1 − c̄)·sensitivity))            (§5.2; = base when off / fixed_quota)
    mask, k     = select_tokens(d, eligible, ratio, ...)           (§5.3, §7)
    loss        = Σ_{i ∈ mask} ce_i / max(1, |mask|)                (§8, float32)

On CUDA with the default ``base_loss`` the whole forward is the **fused kernel path** (:func:`_forward_fused`),
about ten launches and no host synchronisation:

1. the scoring kernel (:func:`cggr_torch.kernels.scoring.launch_scoring`) writes the statistics, the
   difficulty, an int8 status (valid / eligible / target out of range) and the int32 sort key of SPEC §6;
2. one plan program (:mod:`cggr_torch.kernels.selection`) sums the eligible count, confidence, entropy and
   difficulty in a fixed order, applies the dynamic threshold and computes ``k`` exactly, writing every
   SPEC §10 metric into two small device buffers (plus ``torch._assert_async`` on the target-range flag);
3. one ``torch.sort`` of the keys and one mask pass (plus a row sort and a top-up pass for
   ``sequence_aware``);
4. the loss is the masked mean of the scoring pass's ``nll`` (one program); the backward kernel reads only
   the selected rows and forms ``g/|S|`` on the device.

The loss's difficulties are bit-identical to :func:`cggr_torch.scoring.difficulty_from_statistics` of the
kernel's statistics, and the selection is bit-identical to :func:`cggr_torch.selection.select_tokens` on
them. Other kernel devices (the Triton interpreter in tests) and a custom ``base_loss`` use the composable
path: scoring kernel → :func:`select_tokens` → selective cross-entropy kernel (or ``base_loss``).
``CGGR_DISABLE_KERNELS=1`` forces the PyTorch reference below, and a kernel error is raised, never replaced.

In the reference, ``ce`` is computed on *sanitised* inputs: rows that are not finite are replaced by zeros
and ignored targets by 0, so unselected tokens contribute an exact zero gradient (never ``0·NaN``) and
nothing is read out of bounds. Hence ``∂loss/∂z_i = (softmax(z_i) − onehot(t_i)) / |mask|`` for selected
``i`` and 0 elsewhere, and a call with nothing selectable returns ``0.0`` with an all-zero gradient.

The forward pass never synchronises with the device: ``k``, the masks and the metrics stay tensors; the
curriculum ratio is computed on the host from the Python-int step; metrics are converted to Python numbers
only by :meth:`CGGRLoss.get_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .curriculum import _host_step, dynamic_ratio, linear_warmup_ratio
from .scoring import (
    TokenScores,
    TokenStatistics,
    _row_finite,
    _score_from_statistics,
    _statistics_dispatch,
    import_kernel,
    use_kernels_for,
    warn_no_kernel,
)
from .selection import select_tokens
from .utils import check_config, check_logits, check_ratio_value, check_target_range, check_targets

__all__ = ["CGGRLoss", "cggr_loss", "METRIC_KEYS", "NUMERIC_METRIC_KEYS"]

#: SPEC §10, in this order. ``get_metrics()`` returns all of them; ``cggr_loss`` the numeric ones as tensors.
METRIC_KEYS: tuple[str, ...] = (
    "step", "token_ratio", "effective_ratio", "tokens_selected", "tokens_total", "tokens_nonfinite",
    "tokens_out_of_range", "avg_confidence", "avg_entropy", "avg_difficulty", "selection", "scoring",
)
NUMERIC_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS[:-2]

Schedule = Callable[[int], Any]

_CE_KERNEL_MODULE = "cggr_torch.kernels.cross_entropy"
_ce_kernel_cache: dict[str, Optional[Callable[..., torch.Tensor]]] = {}
_SELECT_KERNEL_MODULE = "cggr_torch.kernels.selection"
_fused_cache: dict[str, Optional[Callable[..., Any]]] = {}
#: Devices whose tensors take the fused kernel path (:func:`_forward_fused`).
_FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def _load_selective_ce() -> Optional[Callable[..., torch.Tensor]]:
    """``selective_cross_entropy_triton`` if its module imports; None if it (or Triton) is absent."""
    return import_kernel(_CE_KERNEL_MODULE, "selective_cross_entropy_triton", _ce_kernel_cache)


@dataclass(frozen=True)
class _Config:
    scoring: str
    selection: str
    dynamic_threshold: bool
    threshold_sensitivity: float
    num_strata: int
    min_tokens_per_sequence: int
    ignore_index: int


def _check_base_loss(base_loss: Any) -> None:
    if base_loss is None:
        return
    if not callable(base_loss):
        raise ValueError(f"base_loss: expected None or a callable loss module, got {type(base_loss).__name__}")
    reduction = getattr(base_loss, "reduction", None)
    if reduction is not None and reduction != "none":
        raise ValueError(f"base_loss: expected reduction='none' (one loss per token), got reduction={reduction!r}")


def _base_ratio(schedule: Schedule, step: int) -> np.float32:
    """The schedule's value at ``step`` as float32, checked to lie in ``(0, 1]`` (host only)."""
    return np.float32(check_ratio_value("ratio_schedule", schedule(step)))


def _validate_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, *,
                     range_check: bool = True) -> None:
    check_logits(logits)
    check_targets(targets, logits)
    if range_check:
        check_target_range(targets, logits.shape[-1], ignore_index)


def _fused_available(logits: torch.Tensor, base_loss: Optional[Callable[..., torch.Tensor]]) -> bool:
    """The fused kernel path applies: default base loss, a fused device, kernels enabled and importable."""
    if base_loss is not None or logits.device.type not in _FUSED_DEVICE_TYPES or not use_kernels_for(logits):
        return False
    if import_kernel(_SELECT_KERNEL_MODULE, "select_from_scores", _fused_cache) is None:
        warn_no_kernel(_SELECT_KERNEL_MODULE)
        return False
    return True


def _forward_fused(logits: torch.Tensor, targets: torch.Tensor, step: int, base: np.float32,
                   cfg: _Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss in ~10 kernel launches on statically validated inputs (see the module docstring).

    The target range is checked by the plan kernel (the ``ok`` slot) and ``torch._assert_async`` - one launch
    instead of eight; an out-of-range target is never read either way (its row is not eligible).
    """
    from .kernels import cross_entropy as kce
    from .kernels import scoring as ks
    from .kernels import selection as ksel

    dev = logits.device
    V = logits.shape[-1]
    token_shape = tuple(logits.shape[:-1])
    with torch.no_grad():
        geom = ks.row_geometry(logits.detach())
        t = ks.flat_targets(targets)
        n = geom.n
        out = torch.empty((6, n), dtype=torch.float32, device=dev)
        finite = torch.empty((n,), dtype=torch.int8, device=dev)
        key = torch.empty((n,), dtype=torch.int32 if ksel.SORT_KEY_BITS == 32 else torch.int64, device=dev)
        status = torch.empty((n,), dtype=torch.int8, device=dev)
        ks.launch_scoring(geom, t, cfg.ignore_index, ks._MODE_CODE[cfg.scoring], out, finite, key=key,
                          status=status)
        plan = ksel.select_from_scores(
            key, status, out, token_shape, selection=cfg.selection, num_strata=cfg.num_strata,
            min_tokens_per_sequence=cfg.min_tokens_per_sequence, base_ratio=float(base),
            dynamic=cfg.dynamic_threshold and cfg.selection != "fixed_quota",
            threshold_sensitivity=cfg.threshold_sensitivity, step=step)
        ints, floats = plan.ints, plan.floats
        if dev.type == "cuda":
            torch._assert_async(ints[ksel.INT_SLOTS["ok"]],
                                f"targets: every value must lie in [0, {V}) or equal ignore_index={cfg.ignore_index}")
        elif not bool(ints[ksel.INT_SLOTS["ok"]]):  # interpreter (CPU tensors): eager, as check_target_range
            check_target_range(targets, V, cfg.ignore_index)
    sel = ksel.INT_SLOTS["tokens_selected"]
    loss = kce.scored_selective_cross_entropy(logits, geom, t, plan.mask.reshape(-1), out[0], out[4],
                                              ints[sel:sel + 1])
    metrics = {name: ints[slot] for name, slot in ksel.INT_SLOTS.items() if name in NUMERIC_METRIC_KEYS}
    metrics.update({name: floats[slot] for name, slot in ksel.FLOAT_SLOTS.items()})
    return loss, {name: metrics[name] for name in NUMERIC_METRIC_KEYS}


def _forward(logits: torch.Tensor, targets: torch.Tensor, step: int, base: np.float32, cfg: _Config,
             base_loss: Optional[Callable[..., torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss on validated inputs; returns ``(loss, metrics)`` with 0-d tensor metrics."""
    with torch.no_grad():
        stats = _statistics_dispatch(logits.detach(), targets, cfg.ignore_index)
        scores, mask, metrics = _select_and_measure(stats, targets, step, base, cfg)
        count = metrics["tokens_selected"]
        valid = scores.valid

    ce_kernel = None
    if base_loss is None and use_kernels_for(logits):
        ce_kernel = _load_selective_ce()
        if ce_kernel is None:
            warn_no_kernel(_CE_KERNEL_MODULE)
    if ce_kernel is not None:
        # Sparse forward/backward: only the selected rows are read; the gradient of the others is written as 0.
        loss = ce_kernel(logits, targets, mask, ignore_index=cfg.ignore_index, lse=stats.lse)
    else:
        with torch.no_grad():
            row_ok = _row_finite(stats, has_targets=True)
        total = _selected_cross_entropy(logits, targets, mask, row_ok, valid, base_loss)
        loss = total / torch.clamp(count, min=1).to(torch.float32)

    return loss, metrics


def _selected_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                            row_ok: torch.Tensor, valid: torch.Tensor,
                            base_loss: Optional[Callable[..., torch.Tensor]]) -> torch.Tensor:
    """``Σ_{i ∈ mask} ce_i`` (float32, with gradient) on sanitised inputs: the reference loss's sum, shared with
    :mod:`cggr_torch.distributed`.

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
    return torch.where(flat, ce, torch.zeros_like(ce)).sum()


def _select_and_measure(stats: TokenStatistics, targets: torch.Tensor, step: int, base: Any,
                        cfg: "_Config") -> tuple[TokenScores, torch.Tensor, dict[str, torch.Tensor]]:
    """SPEC §3-§7 and §10 from per-token statistics: scores, the selection mask and the metric tensors.

    Shared by every loss that has the statistics at hand (materialised logits, the fused LM head); runs under
    ``no_grad`` in the caller and never synchronises with the device.
    """
    dev = stats.lse.device
    scores = _score_from_statistics(stats, targets, cfg.scoring, cfg.ignore_index, None)
    elig = scores.eligible
    n = elig.sum()
    denom = torch.clamp(n, min=1).to(torch.float32)

    def mean_eligible(x: torch.Tensor) -> torch.Tensor:
        return torch.where(elig, x, torch.zeros_like(x)).sum(dtype=torch.float32) / denom

    avg_conf = mean_eligible(stats.confidence)
    base_t = torch.full((), float(base), dtype=torch.float32, device=dev)
    if cfg.dynamic_threshold and cfg.selection != "fixed_quota":
        ratio = dynamic_ratio(base_t, avg_conf, cfg.threshold_sensitivity)
    else:
        ratio = base_t
    mask, _k = select_tokens(scores.difficulty, elig, ratio, selection=cfg.selection,
                             num_strata=cfg.num_strata, min_tokens_per_sequence=cfg.min_tokens_per_sequence)
    metrics = {
        "step": torch.full((), int(step), dtype=torch.int64, device=dev),
        "token_ratio": base_t,
        "effective_ratio": ratio.detach(),
        "tokens_selected": mask.sum(),
        "tokens_total": n,
        "tokens_nonfinite": (scores.valid & ~elig).sum(),
        "tokens_out_of_range": torch.zeros((), dtype=torch.int64, device=dev),
        "avg_confidence": avg_conf,
        "avg_entropy": mean_eligible(stats.entropy).detach(),
        "avg_difficulty": mean_eligible(scores.difficulty).detach(),
    }
    return scores, mask, metrics


def _make_config(scoring: str, selection: str, dynamic_threshold: bool, threshold_sensitivity: float,
                 min_tokens_ratio: float, warmup_steps: int, num_strata: int, min_tokens_per_sequence: int,
                 ignore_index: int, base_loss: Any, ratio_schedule: Optional[Schedule]) -> tuple[_Config, Schedule]:
    check_config(scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
                 threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                 warmup_steps=warmup_steps, num_strata=num_strata,
                 min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index)
    _check_base_loss(base_loss)
    if ratio_schedule is not None and not callable(ratio_schedule):
        raise ValueError(f"ratio_schedule: expected None or a callable step -> ratio in (0, 1], got "
                         f"{type(ratio_schedule).__name__}")
    schedule = ratio_schedule if ratio_schedule is not None else linear_warmup_ratio(min_tokens_ratio, warmup_steps)
    cfg = _Config(scoring, selection, dynamic_threshold, float(threshold_sensitivity), int(num_strata),
                  int(min_tokens_per_sequence), int(ignore_index))
    return cfg, schedule


def cggr_loss(logits: torch.Tensor, targets: torch.Tensor, step: Union[int, torch.Tensor], *,
              scoring: str = "combined", selection: str = "stratified", dynamic_threshold: bool = True,
              threshold_sensitivity: float = 0.5, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000,
              num_strata: int = 4, min_tokens_per_sequence: int = 1,
              base_loss: Optional[Callable[..., torch.Tensor]] = None, ignore_index: int = -100,
              ratio_schedule: Optional[Schedule] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Functional CGGR loss at curriculum ``step`` (a host integer): ``(loss, metrics)``.

    ``loss`` is a float32 scalar with gradient; ``metrics`` maps :data:`NUMERIC_METRIC_KEYS` to detached 0-d
    tensors on the logits' device (no synchronisation). Arguments as :class:`CGGRLoss`.
    """
    cfg, schedule = _make_config(scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio,
                                 warmup_steps, num_strata, min_tokens_per_sequence, ignore_index, base_loss,
                                 ratio_schedule)
    s = _host_step(step)
    fused = _fused_available(logits, base_loss) if isinstance(logits, torch.Tensor) else False
    _validate_inputs(logits, targets, cfg.ignore_index, range_check=not fused)
    if fused:
        return _forward_fused(logits, targets, s, _base_ratio(schedule, s), cfg)
    return _forward(logits, targets, s, _base_ratio(schedule, s), cfg, base_loss)


class CGGRLoss(nn.Module):
    """Confidence-Gated Gradient Routing loss: mean cross-entropy over the hardest tokens.

    Args:
        scoring: difficulty, one of ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'`` (SPEC §3).
        selection: one of ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'`` (SPEC §7).
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

    ``forward(logits, targets)`` takes ``(B, T, V)`` with ``(B, T)`` or ``(N, V)`` with ``(N,)`` (already
    shifted for a causal LM, see :func:`cggr_torch.shift_for_causal_lm`) and returns the float32 loss.
    Call :meth:`step` after each optimizer step; the step counter is part of :meth:`state_dict`.
    """

    def __init__(self, scoring: str = "combined", selection: str = "stratified", dynamic_threshold: bool = True,
                 threshold_sensitivity: float = 0.5, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000,
                 num_strata: int = 4, min_tokens_per_sequence: int = 1,
                 base_loss: Optional[Callable[..., torch.Tensor]] = None, ignore_index: int = -100,
                 ratio_schedule: Optional[Schedule] = None) -> None:
        super().__init__()
        self._cfg, self._schedule = _make_config(
            scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps,
            num_strata, min_tokens_per_sequence, ignore_index, base_loss, ratio_schedule)
        self._min_tokens_ratio = float(min_tokens_ratio)
        self._warmup_steps = int(warmup_steps)
        self._ratio_schedule = ratio_schedule
        self.base_loss = base_loss  # an nn.Module is registered as a submodule (moves with .to())
        self._step = 0
        self._metrics: Optional[dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------------------ configuration (read-only)
    @property
    def scoring(self) -> str:
        return self._cfg.scoring

    @property
    def selection(self) -> str:
        return self._cfg.selection

    @property
    def dynamic_threshold(self) -> bool:
        return self._cfg.dynamic_threshold

    @property
    def threshold_sensitivity(self) -> float:
        return self._cfg.threshold_sensitivity

    @property
    def min_tokens_ratio(self) -> float:
        return self._min_tokens_ratio

    @property
    def warmup_steps(self) -> int:
        return self._warmup_steps

    @property
    def num_strata(self) -> int:
        return self._cfg.num_strata

    @property
    def min_tokens_per_sequence(self) -> int:
        return self._cfg.min_tokens_per_sequence

    @property
    def ignore_index(self) -> int:
        return self._cfg.ignore_index

    @property
    def ratio_schedule(self) -> Optional[Schedule]:
        return self._ratio_schedule

    # ---------------------------------------------------------------------------------------------- steps
    @property
    def current_step(self) -> int:
        """The curriculum step the next ``forward`` will use."""
        return self._step

    def step(self) -> None:
        """Advance the curriculum by one step (call after ``optimizer.step()``)."""
        self._step += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state_dict: expected CGGRLoss extra state {{'step': int}}, got {state!r}")
        self._step = _host_step(state["step"])

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Selective loss of one batch (float32 scalar). Never synchronises with the device."""
        fused = _fused_available(logits, self.base_loss) if isinstance(logits, torch.Tensor) else False
        _validate_inputs(logits, targets, self._cfg.ignore_index, range_check=not fused)
        step = self._step
        if fused:
            loss, metrics = _forward_fused(logits, targets, step, _base_ratio(self._schedule, step), self._cfg)
        else:
            loss, metrics = _forward(logits, targets, step, _base_ratio(self._schedule, step), self._cfg,
                                     self.base_loss)
        self._metrics = metrics
        return loss

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last ``forward`` as Python scalars (this call synchronises).

        Before the first ``forward`` the counts and averages are 0 and ``token_ratio``/``effective_ratio`` are
        the curriculum ratio of the current step.
        """
        out: dict[str, Any]
        if self._metrics is None:
            base = float(_base_ratio(self._schedule, self._step))
            out = {key: 0 for key in NUMERIC_METRIC_KEYS}
            out.update(step=self._step, token_ratio=base, effective_ratio=base, avg_confidence=0.0,
                       avg_entropy=0.0, avg_difficulty=0.0)
        else:
            out = {key: self._metrics[key].item() for key in NUMERIC_METRIC_KEYS}
        out["selection"] = self.selection
        out["scoring"] = self.scoring
        return out

    def extra_repr(self) -> str:
        c = self._cfg
        return (f"scoring={c.scoring!r}, selection={c.selection!r}, dynamic_threshold={c.dynamic_threshold}, "
                f"threshold_sensitivity={c.threshold_sensitivity}, min_tokens_ratio={self.min_tokens_ratio}, "
                f"warmup_steps={self.warmup_steps}, num_strata={c.num_strata}, "
                f"min_tokens_per_sequence={c.min_tokens_per_sequence}, ignore_index={c.ignore_index}, "
                f"step={self._step}")
