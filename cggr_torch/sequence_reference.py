"""Batch splitting with a reference loss: ``scoring='excess'`` at sequence level (SPEC §9.1).

The router scores its tokens as for ``scoring='loss'`` (``d = nll``, SPEC §3); then the caller's
``reference_nll`` turns them into excess scores here, before the sequence difficulty:

* **per token**, shape ``(B, T)`` aligned like the *unshifted* labels: ``reference_nll[b, t]`` is the
  reference's loss of predicting ``labels[b, t]``, shifted exactly like the labels (position 0 is never read
  by a causal LM). Token difficulty ``d = nll ⊖ ref`` (SPEC §3.1, through
  :func:`cggr_torch.scoring.difficulty_from_statistics`); a non-finite ``ref`` makes its token not eligible;
  ``D_b`` = mean of ``d`` over the eligible tokens.
* **per sequence**, shape ``(B,)``: the reference's mean loss of sequence ``b``. Every token of ``b`` gets
  ``ref_b`` (so a non-finite ``ref_b`` makes all its valid tokens not eligible, counted in
  ``tokens_nonfinite``); ``D_b`` = (mean router ``nll`` over the eligible tokens) ``⊖ ref_b``.

Nothing here synchronises with the device. Mirrored by ``cggr_jax.sequence_reference``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from cggr import REFERENCE_SCORING_MODES, check_sequence_reference_arguments

from .scoring import check_reference_nll, difficulty_from_statistics
from .types import TokenScores

__all__ = ["router_scoring", "check_sequence_reference", "apply_sequence_reference"]


def router_scoring(scoring: str) -> str:
    """The SPEC §3 mode the router scores its tokens with: ``'loss'`` for the reference modes (the reference
    is subtracted afterwards by :func:`apply_sequence_reference`), else ``scoring`` itself."""
    return "loss" if scoring in REFERENCE_SCORING_MODES else scoring


def check_sequence_reference(reference_nll: Any, scoring: str, batch_shape: tuple[int, int], *,
                             device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """SPEC §9.1's checks of batch splitting's ``reference_nll`` (``ValueError`` naming it): required exactly
    when ``scoring`` is ``'excess'``; a floating tensor of shape ``(B, T)`` (per token, aligned like the
    labels) or ``(B,)`` (per sequence) on ``device``. Returns it detached as float32 (SPEC §3.1's rounding:
    half precision widens exactly, float64 rounds to nearest) or None. Static checks only, no device work."""
    # The missing reference's usual cause: a Trainer (without use_cggr / CGGRTrainer) drops the batch column.
    hint = " (with a Hugging Face Trainer not switched by use_cggr / CGGRTrainer: remove_unused_columns=False)"
    if not check_sequence_reference_arguments(scoring, reference_nll, batch_shape, array_type=torch.Tensor,
                                              kind="tensor", hint=hint):
        return None
    shape = tuple(reference_nll.shape)
    # dtype, device and the float32 rounding of SPEC §3.1, written once in scoring
    return check_reference_nll(reference_nll, scoring, shape, device=device)


def apply_sequence_reference(scores: TokenScores, reference_nll: Optional[torch.Tensor], *,
                             shift: bool = True,
                             columns: Optional[torch.Tensor] = None) -> tuple[TokenScores, Optional[torch.Tensor]]:
    """Turn the router's ``'loss'`` token scores into excess scores (SPEC §9.1).

    ``scores``: the router's token scores of shape ``(B, W)`` with column ``t`` the pair that predicts
    ``labels[:, t + 1]`` (``shift=True``, causal; ``W = T`` with a never-valid last column, or ``W = T − 1``)
    or ``labels[:, t]`` (``shift=False``, masked LMs); ``reference_nll`` as returned by
    :func:`check_sequence_reference`. Returns ``(scores, sequence_reference)``: the token scores with
    ``d = nll ⊖ ref`` and the eligibility of SPEC §3.1, and the float32 ``(B,)`` per-sequence reference to
    subtract from the mean ``nll`` (``sequence_difficulty(scores.stats.nll, scores.eligible, it)``), or None
    for a per-token reference (``D_b`` is then the mean of ``scores.difficulty``). No reference: unchanged.

    ``columns`` (SPEC §9.3, a subset of the router's positions): int64 ``(W,)``, the label column that each
    score column predicts (:func:`cggr_torch.scorer.scored_index`); a per-token reference is then read at those
    columns (``shift`` is not applied: the columns are already the targets').
    """
    if reference_nll is None:
        return scores, None
    B, W = scores.difficulty.shape
    per_sequence = reference_nll.dim() == 1
    if per_sequence:
        aligned = reference_nll[:, None].expand(B, W)
    elif columns is not None:
        aligned = reference_nll.index_select(1, columns)
    else:
        aligned = reference_nll[:, 1:] if shift else reference_nll
        if aligned.shape[1] < W:   # the never-valid last column of input-position scores: never read
            aligned = torch.cat([aligned, aligned.new_zeros((B, W - aligned.shape[1]))], dim=1)
    d = difficulty_from_statistics(scores.stats, "excess", reference_nll=aligned)
    # The router's eligibility (valid, finite row) AND a finite reference (SPEC §3.1): d is NaN exactly there.
    eligible = scores.eligible & ~torch.isnan(d)
    out = TokenScores(d, eligible, scores.valid, scores.stats)
    return out, (reference_nll if per_sequence else None)
