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

Kernel dispatch: :func:`token_statistics` sends CUDA tensors to
``cggr_torch.kernels.scoring.token_statistics_triton(logits, targets, ignore_index)`` when that module can be
imported (it needs Triton). Set the environment variable ``CGGR_DISABLE_KERNELS=1`` to force this reference
everywhere. An error raised *by* the kernel propagates; the reference is never used as a silent fallback.
Only the absence of the kernel module (or of Triton) selects the reference, with a one-time warning for CUDA
tensors. :class:`cggr_torch.CGGRLoss` applies the same rule to the selective cross-entropy kernel
(``cggr_torch.kernels.cross_entropy.selective_cross_entropy_triton``) when ``base_loss`` is the default.
"""
from __future__ import annotations

import importlib
import numbers
import os
import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch

from .utils import check_logits, check_scoring, check_target_range, check_targets

__all__ = [
    "SCORING_MODES",
    "TokenStatistics",
    "TokenScores",
    "token_statistics",
    "token_statistics_reference",
    "difficulty_from_statistics",
    "score_tokens",
    "kernels_enabled",
    "use_kernels_for",
]

SCORING_MODES: tuple[str, ...] = ("entropy", "margin", "loss", "combined")


class TokenStatistics(NamedTuple):
    """SPEC §2 statistics, each float32 of the token shape (``logits.shape[:-1]``).

    ``nll`` is 0 where there is no valid target (no targets given, or ``target == ignore_index``). Rows that
    are not finite (NaN, ``+∞``, only ``−∞``) carry non-finite values in at least one field.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    confidence: torch.Tensor
    runner_up: torch.Tensor
    nll: torch.Tensor


class TokenScores(NamedTuple):
    """SPEC §3-§4: float32 ``difficulty``, bool ``eligible`` and ``valid`` (token shape), and the statistics."""

    difficulty: torch.Tensor
    eligible: torch.Tensor
    valid: torch.Tensor
    stats: TokenStatistics


# ------------------------------------------------------------------------------------------ kernel dispatch
_KERNEL_MODULE = "cggr_torch.kernels.scoring"
_KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # devices whose tensors go to the kernel
_kernel_cache: dict[str, Optional[Callable[..., TokenStatistics]]] = {}
_warned_no_kernel = False


def kernels_enabled() -> bool:
    """False when the environment variable ``CGGR_DISABLE_KERNELS`` is set to ``1``/``true``/``yes``."""
    return os.environ.get("CGGR_DISABLE_KERNELS", "").strip().lower() not in ("1", "true", "yes")


def import_kernel(module_name: str, attr: str, cache: dict) -> Optional[Callable[..., Any]]:
    """``module_name.attr`` if the module imports; None if that module (or Triton) does not exist.

    Any other import error (a bug in the kernel module) propagates. The result is memoised in ``cache``.
    """
    if "fn" not in cache:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing in (module_name, "cggr_torch.kernels", "triton") or missing.startswith("triton."):
                cache["fn"] = None
                return None
            raise
        cache["fn"] = getattr(module, attr)
    return cache["fn"]


def use_kernels_for(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` lives on a kernel device (CUDA) and ``CGGR_DISABLE_KERNELS`` is not set."""
    return tensor.device.type in _KERNEL_DEVICE_TYPES and kernels_enabled()


def warn_no_kernel(what: str) -> None:
    """One warning per process that a kernel device uses the reference because Triton is not importable."""
    global _warned_no_kernel
    if not _warned_no_kernel:
        _warned_no_kernel = True
        warnings.warn(f"cggr_torch: the Triton kernels ({what}) are not importable; CUDA tensors use the "
                      f"PyTorch reference", RuntimeWarning, stacklevel=3)


def _load_kernel() -> Optional[Callable[..., TokenStatistics]]:
    """``token_statistics_triton`` if its module imports; None if the module or Triton is absent."""
    return import_kernel(_KERNEL_MODULE, "token_statistics_triton", _kernel_cache)


def _check_kernel_output(out: object, shape: tuple[int, ...]) -> None:
    """Static check of a kernel's result (no device work): a TokenStatistics of float32 token-shaped tensors."""
    if not isinstance(out, TokenStatistics):
        raise RuntimeError(f"{_KERNEL_MODULE}.token_statistics_triton returned {type(out).__name__}, "
                           f"expected TokenStatistics")
    for name, x in zip(TokenStatistics._fields, out):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or tuple(x.shape) != shape:
            raise RuntimeError(f"{_KERNEL_MODULE}.token_statistics_triton: field {name} must be a float32 "
                               f"tensor of shape {shape}, got "
                               f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")


# ------------------------------------------------------------------------------------------- the reference
def _validate(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int) -> None:
    check_logits(logits)
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
    if targets is not None:
        check_targets(targets, logits)
        check_target_range(targets, logits.shape[-1], ignore_index)


@torch.no_grad()
def _reference_statistics(logits: torch.Tensor, targets: Optional[torch.Tensor],
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
    _validate(logits, targets, ignore_index)
    return _reference_statistics(logits, targets, ignore_index)


def _statistics_dispatch(logits: torch.Tensor, targets: Optional[torch.Tensor],
                         ignore_index: int) -> TokenStatistics:
    if use_kernels_for(logits):
        kernel = _load_kernel()
        if kernel is not None:
            with torch.no_grad():
                out = kernel(logits.detach(), targets, ignore_index)
            _check_kernel_output(out, tuple(logits.shape[:-1]))
            return out
        warn_no_kernel(_KERNEL_MODULE)
    return _reference_statistics(logits, targets, ignore_index)


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
    _validate(logits, targets, ignore_index)
    return _statistics_dispatch(logits, targets, ignore_index)


# ------------------------------------------------------------------------------------------- difficulty
def difficulty_from_statistics(stats: TokenStatistics, scoring: str = "combined", *,
                               has_targets: bool = True) -> torch.Tensor:
    """SPEC §3 difficulty in float32::

        margin_term = 1 − (p1 − p2)
        entropy  : d = H
        margin   : d = margin_term
        loss     : d = nll                           (needs targets)
        combined : d = (H + margin_term) + nll       (H + margin_term without targets)

    Raises:
        ValueError: unknown ``scoring``, or ``scoring='loss'`` with ``has_targets=False``.
    """
    check_scoring(scoring)
    if not isinstance(stats, TokenStatistics):
        raise ValueError(f"stats: expected a TokenStatistics, got {type(stats).__name__}")
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


def _row_finite(stats: TokenStatistics, has_targets: bool) -> torch.Tensor:
    ok = (torch.isfinite(stats.lse) & torch.isfinite(stats.entropy) & torch.isfinite(stats.confidence)
          & torch.isfinite(stats.runner_up))
    if has_targets:
        ok = ok & torch.isfinite(stats.nll)  # nll is 0 for tokens without a valid target
    return ok


def _score_from_statistics(stats: TokenStatistics, targets: Optional[torch.Tensor], scoring: str,
                           ignore_index: int, valid_mask: Optional[torch.Tensor]) -> TokenScores:
    has_targets = targets is not None
    if has_targets:
        valid = targets != ignore_index
    else:
        valid = torch.ones(stats.lse.shape, dtype=torch.bool, device=stats.lse.device)
    if valid_mask is not None:
        valid = valid & valid_mask
    d = difficulty_from_statistics(stats, scoring, has_targets=has_targets)
    eligible = valid & _row_finite(stats, has_targets) & ~torch.isnan(d)
    return TokenScores(d, eligible, valid, stats)


def score_tokens(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *, scoring: str = "combined",
                 ignore_index: int = -100, valid_mask: Optional[torch.Tensor] = None) -> TokenScores:
    """SPEC §2-§4: difficulty, validity and eligibility of every token.

    ``valid`` = ``targets != ignore_index`` (all True without targets), AND ``valid_mask`` when given.
    ``eligible`` = valid AND the row is finite (lse, H, p1, p2 and, with targets, nll) AND ``d`` not NaN.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)`` floating tensor.
        targets: optional integer tensor of shape ``logits.shape[:-1]``.
        scoring: one of :data:`SCORING_MODES`; ``'loss'`` needs targets.
        ignore_index: target value marking a token without a target.
        valid_mask: optional bool tensor of shape ``logits.shape[:-1]`` (e.g. an attention mask).
    """
    check_scoring(scoring)
    if scoring == "loss" and targets is None:
        raise ValueError("targets: scoring='loss' needs targets, got None")
    _validate(logits, targets, ignore_index)
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask: expected a bool tensor, got "
                             f"{valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask)}")
        if tuple(valid_mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"valid_mask: expected shape {tuple(logits.shape[:-1])}, got {tuple(valid_mask.shape)}")
        if valid_mask.device != logits.device:
            raise ValueError(f"valid_mask: expected device {logits.device}, got {valid_mask.device}")
    stats = _statistics_dispatch(logits, targets, ignore_index)
    return _score_from_statistics(stats, targets, scoring, ignore_index, valid_mask)
