"""Per-token statistics and difficulty (SPEC §2-§4), the pure-PyTorch reference.

For one row ``z ∈ R^V`` (upcast to float32 first)::

    m    = max_j z_j
    s    = Σ_j exp(z_j − m)                 lse = m + log s
    H    = lse − Σ_j p_j z_j = log s − Σ_j p_j (z_j − m)        (terms with p_j = 0 contribute 0)
    p1   = exp(m − lse)       p2 = exp(z_(2) − lse)             (z_(2): second largest, ties counted)
    nll  = lse − z[target] = log s − (z[target] − m)

The entropy is evaluated on the shifted logits ``z − m`` (mathematically identical to ``lse − Σ p z``, but
without the cancellation of two numbers of size ``|m|``); masked ``−∞`` entries are excluded explicitly
(no ``0·(−∞)``, no ``log(p + eps)``).

Kernel dispatch (:mod:`cggr_torch.dispatch`): :func:`token_statistics` sends CUDA tensors to
``cggr_torch.kernels.scoring.token_statistics_triton(logits, targets, ignore_index)`` when that module can be
imported (it needs Triton); ``CGGR_DISABLE_KERNELS=1`` or ``dispatch.force("reference")`` forces this
reference. An error raised *by* the kernel propagates; the reference is never used as a silent fallback.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from cggr import REFERENCE_SCORING_MODES, SCORING_MODES, check_reference_arguments

from . import dispatch
from .types import TokenScores, TokenStatistics
from .utils import check_logits, check_scoring, check_target_range, check_targets, widen_labels

__all__ = [
    "SCORING_MODES",
    "TokenStatistics",
    "TokenScores",
    "token_statistics",
    "token_statistics_reference",
    "reference_statistics",
    "compute_statistics",
    "difficulty_from_statistics",
    "row_finite",
    "scores_from_statistics",
    "score_tokens",
    "score_next_tokens",
    "check_reference_nll",
]

_STATISTICS_KERNEL = "token_statistics_triton"


def _check_kernel_output(out: object, shape: tuple[int, ...]) -> None:
    """Static check of a kernel's result (no device work): a TokenStatistics of float32 token-shaped tensors."""
    if not isinstance(out, TokenStatistics):
        raise RuntimeError(f"{_STATISTICS_KERNEL} returned {type(out).__name__}, expected TokenStatistics")
    for name, x in zip(TokenStatistics._fields, out):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or tuple(x.shape) != shape:
            raise RuntimeError(f"{_STATISTICS_KERNEL}: field {name} must be a float32 tensor of shape {shape}, "
                               f"got {(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")


# ------------------------------------------------------------------------------------------- the reference
def _validate(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """Checks of SPEC §1/§11; returns ``targets`` widened by the label-dtype rule (:func:`widen_labels`)."""
    check_logits(logits)
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
    if targets is not None:
        check_targets(targets, logits)
        targets = widen_labels(targets, ignore_index)
        check_target_range(targets, logits.shape[-1], ignore_index)
    return targets


@torch.no_grad()
def reference_statistics(logits: torch.Tensor, targets: Optional[torch.Tensor],
                          ignore_index: int) -> TokenStatistics:
    """SPEC §2 in float32 on already validated inputs (see the module docstring for the formulas)."""
    z = logits.detach().to(torch.float32)
    V = z.shape[-1]
    m = z.amax(dim=-1, keepdim=True)                  # NaN / ±inf for rows that are not finite
    shifted = z - m                                   # ≤ 0 on finite rows (−inf for masked entries)
    e = torch.exp(shifted)
    s = e.sum(dim=-1)
    log_s = torch.log(s)
    m0 = m.squeeze(-1)
    lse = m0 + log_s
    # Σ_j e_j (z_j − m) over the entries with e_j ≠ 0 (a masked or underflowed entry contributes 0).
    e_shift = torch.where(e == 0, torch.zeros_like(e), e * shifted)
    entropy = log_s - e_shift.sum(dim=-1) / s
    confidence = torch.exp(-log_s)                    # exp(m − lse)
    if V >= 2:
        z2 = torch.topk(z, k=2, dim=-1).values[..., 1]  # second largest, ties counted
        runner_up = torch.exp((z2 - m0) - log_s)       # equal maxima give bit-identical p2 = p1
    else:
        runner_up = torch.zeros_like(confidence)      # V = 1: no runner-up
    if targets is None:
        nll = torch.zeros_like(lse)
    else:
        valid = targets != ignore_index
        in_range = valid & (targets >= 0) & (targets < V)
        safe = torch.where(in_range, targets, torch.zeros_like(targets)).to(torch.int64)
        z_t = torch.gather(z, -1, safe.unsqueeze(-1)).squeeze(-1)
        nll = torch.where(valid, log_s - (z_t - m0), torch.zeros_like(lse))
        # An out-of-range target (reachable only on CUDA, where the range check is a device assertion) is
        # never read: its nll is NaN, so its row is not finite and the token is never selected.
        nll = torch.where(valid & ~in_range, torch.full_like(nll, float("nan")), nll)
    return TokenStatistics(lse, entropy, confidence, runner_up, nll)


def token_statistics_reference(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                               ignore_index: int = -100) -> TokenStatistics:
    """The pure-PyTorch SPEC §2 statistics on any device, never dispatched to a kernel.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, float32/float16/bfloat16/float64 (computed in float32).
        targets: optional integer tensor of shape ``logits.shape[:-1]``; values in ``[0, V)`` or
            ``ignore_index``.
        ignore_index: target value marking a token without a target.
    """
    targets = _validate(logits, targets, ignore_index)
    return reference_statistics(logits, targets, ignore_index)


def compute_statistics(logits: torch.Tensor, targets: Optional[torch.Tensor],
                       ignore_index: int) -> TokenStatistics:
    """SPEC §2 statistics of already validated inputs, from the kernel or the reference as
    :mod:`cggr_torch.dispatch` decides (the first stage of :mod:`cggr_torch.pipeline`)."""
    if dispatch.use_kernels(logits):
        kernel = dispatch.kernel(_STATISTICS_KERNEL)
        if kernel is not None:
            with torch.no_grad():
                out = kernel(logits.detach(), targets, ignore_index)
            _check_kernel_output(out, tuple(logits.shape[:-1]))
            return out
    return reference_statistics(logits, targets, ignore_index)


def token_statistics(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                     ignore_index: int = -100) -> TokenStatistics:
    """SPEC §2 statistics of every token, float32 of shape ``logits.shape[:-1]``.

    CUDA tensors go to the Triton kernel when available (see the module docstring and
    ``CGGR_DISABLE_KERNELS``); everything else uses the reference. No gradient flows through the result.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, float32/float16/bfloat16/float64 (computed in float32).
        targets: optional integer tensor of shape ``logits.shape[:-1]``; values in ``[0, V)`` or
            ``ignore_index``. Ignored (and, on CUDA after a failed device assertion, out-of-range) targets
            are read as index 0 and get ``nll = 0``.
        ignore_index: target value marking a token without a target.

    Raises:
        ValueError: bad shapes/dtypes, or (CPU) targets out of range.
    """
    targets = _validate(logits, targets, ignore_index)
    return compute_statistics(logits, targets, ignore_index)


# ------------------------------------------------------------------------------------------- difficulty
def check_reference_nll(reference_nll: Optional[torch.Tensor], scoring: str, token_shape: tuple[int, ...], *,
                        has_targets: bool = True, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """SPEC §3.1's checks of ``reference_nll`` (``ValueError`` naming it); returns it detached as float32
    (float16/bfloat16 widen exactly, float64 rounds to nearest) or None. No device synchronisation."""
    if reference_nll is not None and not isinstance(reference_nll, torch.Tensor):
        raise ValueError(f"reference_nll: expected a floating tensor of shape {tuple(token_shape)} or None, got "
                         f"{type(reference_nll).__name__}")
    check_reference_arguments(scoring, None if reference_nll is None else tuple(reference_nll.shape),
                              tuple(token_shape), has_targets=has_targets)
    if reference_nll is None:
        return None
    if not reference_nll.dtype.is_floating_point:
        raise ValueError(f"reference_nll: expected a floating dtype (float16/bfloat16/float32/float64), got "
                         f"{reference_nll.dtype}")
    if device is not None and reference_nll.device != device:
        raise ValueError(f"reference_nll: expected device {device} (the logits'), got {reference_nll.device}")
    return reference_nll.detach().to(torch.float32)


def difficulty_from_statistics(stats: TokenStatistics, scoring: str = "combined", *,
                               has_targets: bool = True,
                               reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SPEC §3 difficulty in float32::

        margin_term = 1 − (p1 − p2)
        entropy  : d = H
        margin   : d = margin_term
        loss     : d = nll                           (needs targets)
        combined : d = (H + margin_term) + nll       (H + margin_term without targets)
        excess   : d = nll − reference_nll            (SPEC §3.1; NaN where the reference is not finite,
                                                       so such a token is never eligible)

    Raises:
        ValueError: unknown ``scoring``, ``scoring='loss'``/``'excess'`` with ``has_targets=False``, or a
        missing, misplaced or mis-shaped ``reference_nll`` (SPEC §3.1).
    """
    check_scoring(scoring)
    if not isinstance(stats, TokenStatistics):
        raise ValueError(f"stats: expected a TokenStatistics, got {type(stats).__name__}")
    ref = check_reference_nll(reference_nll, scoring, tuple(stats.nll.shape), has_targets=has_targets,
                              device=stats.nll.device)
    if ref is not None:
        # A non-finite reference must not rank as a number (nll − (+inf) = −inf would be "easiest"): NaN makes
        # the token not eligible, and the pipeline counts it in tokens_nonfinite (valid, not eligible).
        return torch.where(torch.isfinite(ref), stats.nll - ref, torch.full_like(ref, float("nan")))
    if scoring == "entropy":
        return stats.entropy
    margin_term = 1.0 - (stats.confidence - stats.runner_up)
    if scoring == "margin":
        return margin_term
    if scoring == "loss":
        if not has_targets:
            raise ValueError("scoring: 'loss' needs targets (has_targets=False / targets=None)")
        return stats.nll
    d = stats.entropy + margin_term
    return d + stats.nll if has_targets else d


def row_finite(stats: TokenStatistics, has_targets: bool) -> torch.Tensor:
    """SPEC §4: the row's statistics are finite (lse, H, p1, p2 and, with targets, nll)."""
    ok = (torch.isfinite(stats.lse) & torch.isfinite(stats.entropy) & torch.isfinite(stats.confidence)
          & torch.isfinite(stats.runner_up))
    if has_targets:
        ok = ok & torch.isfinite(stats.nll)  # nll is 0 for tokens without a valid target
    return ok


def scores_from_statistics(stats: TokenStatistics, targets: Optional[torch.Tensor], scoring: str,
                           ignore_index: int, valid_mask: Optional[torch.Tensor] = None,
                           reference_nll: Optional[torch.Tensor] = None) -> TokenScores:
    """SPEC §3-§4 from the statistics: difficulty, ``valid`` (target ≠ ``ignore_index``, AND ``valid_mask``)
    and ``eligible`` (valid, finite row, difficulty not NaN). No validation, no device synchronisation."""
    has_targets = targets is not None
    if has_targets:
        valid = targets != ignore_index
    else:
        valid = torch.ones(stats.lse.shape, dtype=torch.bool, device=stats.lse.device)
    if valid_mask is not None:
        valid = valid & valid_mask
    d = difficulty_from_statistics(stats, scoring, has_targets=has_targets, reference_nll=reference_nll)
    eligible = valid & row_finite(stats, has_targets) & ~torch.isnan(d)
    return TokenScores(d, eligible, valid, stats)


def score_tokens(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *, scoring: str = "combined",
                 ignore_index: int = -100, valid_mask: Optional[torch.Tensor] = None,
                 reference_nll: Optional[torch.Tensor] = None) -> TokenScores:
    """SPEC §2-§4: difficulty, validity and eligibility of every token.

    ``valid`` = ``targets != ignore_index`` (all True without targets), AND ``valid_mask`` when given.
    ``eligible`` = valid AND the row is finite (lse, H, p1, p2 and, with targets, nll) AND ``d`` not NaN.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)`` floating tensor.
        targets: optional integer tensor of shape ``logits.shape[:-1]``.
        scoring: one of :data:`SCORING_MODES`; ``'loss'`` needs targets.
        ignore_index: target value marking a token without a target.
        valid_mask: optional bool tensor of shape ``logits.shape[:-1]`` (e.g. an attention mask).
        reference_nll: ``scoring='excess'`` only (and required there): the reference model's per-token loss,
            a floating tensor of the targets' shape (SPEC §3.1); a non-finite value makes its token not eligible.
    """
    check_scoring(scoring)
    if scoring == "loss" and targets is None:
        raise ValueError("targets: scoring='loss' needs targets, got None")
    targets = _validate(logits, targets, ignore_index)
    reference_nll = check_reference_nll(reference_nll, scoring, tuple(logits.shape[:-1]),
                                        has_targets=targets is not None, device=logits.device)
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask: expected a bool tensor, got "
                             f"{valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask)}")
        if tuple(valid_mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"valid_mask: expected shape {tuple(logits.shape[:-1])}, got {tuple(valid_mask.shape)}")
        if valid_mask.device != logits.device:
            raise ValueError(f"valid_mask: expected device {logits.device}, got {valid_mask.device}")
    stats = compute_statistics(logits, targets, ignore_index)
    return scores_from_statistics(stats, targets, scoring, ignore_index, valid_mask, reference_nll)


# ------------------------------------------------------------------------- scores at the input positions
def _pad_last(x: torch.Tensor, value: Union[int, float, bool]) -> torch.Tensor:
    """Append one column of ``value`` along dim 1 (re-aligns shifted scores to the input positions)."""
    pad = torch.full((x.shape[0], 1), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def score_next_tokens(logits: torch.Tensor, labels: Optional[torch.Tensor],
                      attention_mask: Optional[torch.Tensor], *, scoring: str, ignore_index: int,
                      shift: bool = True) -> tuple[TokenScores, torch.Tensor]:
    """Score a router's logits ``(B, T, V)`` per input position (SPEC §2-§4, §9).

    * With ``labels`` and ``shift=True`` (causal LMs): position ``t`` is scored as the pair ``logits[:, t]`` /
      ``labels[:, t+1]`` (``shift_for_causal_lm``); the pair is valid when ``labels[:, t+1] != ignore_index``
      and ``attention_mask[:, t+1] != 0`` (a padding target is ignored). The last position has no target: its
      difficulty and statistics are 0 and it is neither valid nor eligible.
    * With ``labels`` and ``shift=False`` (masked LMs): ``logits[:, t]`` / ``labels[:, t]``, valid when
      ``labels[:, t] != ignore_index`` and ``attention_mask[:, t] != 0``.
    * Without ``labels``: every position whose attention mask is non-zero is valid and the difficulty is the
      target-free formula of §3 (``scoring='loss'`` is a ``ValueError``).

    Returns:
        ``(scores, nonfinite)``: a :class:`~cggr_torch.scoring.TokenScores` whose tensors have the input
        shape ``(B, T)``, and the 0-d int64 count of valid tokens excluded because their router row was not
        finite (the metric ``tokens_nonfinite``).
    """
    if scoring in REFERENCE_SCORING_MODES:
        # The reference is applied after the router's scores (SPEC §9.1), by the caller that holds it.
        raise ValueError(f"scoring: {scoring!r} is applied after the router's scores (SPEC §9.1): call "
                         f"score_next_tokens with scoring='loss', then "
                         f"cggr_torch.sequence_reference.apply_sequence_reference")
    if labels is None:
        valid_mask = None if attention_mask is None else attention_mask != 0
        scores = score_tokens(logits, None, scoring=scoring, valid_mask=valid_mask)
    else:
        # The caller passed labels: range errors name them (score_tokens would say targets).
        check_target_range(labels, logits.shape[-1], ignore_index, name="labels")
        tgt = labels
        if attention_mask is not None:
            tgt = tgt.masked_fill(attention_mask == 0, ignore_index)
        if shift:
            shifted = score_tokens(logits[:, :-1], tgt[:, 1:], scoring=scoring, ignore_index=ignore_index)
            stats = TokenStatistics(*(_pad_last(x, 0.0) for x in shifted.stats))
            scores = TokenScores(_pad_last(shifted.difficulty, 0.0), _pad_last(shifted.eligible, False),
                                 _pad_last(shifted.valid, False), stats)
        else:
            scores = score_tokens(logits, tgt, scoring=scoring, ignore_index=ignore_index)
    nonfinite = (scores.valid & ~scores.eligible).sum()
    return scores, nonfinite
