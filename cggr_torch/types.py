"""The shared result types of ``cggr_torch`` (mirrored by ``cggr_jax.types``).

They live in their own module so that the kernels (:mod:`cggr_torch.kernels`), the reference functions and the
policy modules all import them from one leaf, without importing each other.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TokenStatistics", "TokenScores", "SequenceSelection"]


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
    """SPEC §3-§4: float32 ``difficulty``, bool ``eligible`` and ``valid`` (token shape), and the statistics.

    ``valid`` = the token has a target other than ``ignore_index`` (all True without targets), AND the
    caller's ``valid_mask`` when one is given; ``eligible`` = valid AND its row is finite AND ``d`` not NaN.
    """

    difficulty: torch.Tensor
    eligible: torch.Tensor
    valid: torch.Tensor
    stats: TokenStatistics


class SequenceSelection(NamedTuple):
    """Result of :func:`cggr_torch.batch_split.select_sequences` (mirrors ``cggr_jax``'s, same fields).

    Attributes:
        mask: ``(B,)`` bool, the kept sequences (exactly ``k`` of them; for ``selection="sampled"`` the random draw of
            SPEC §9.2, ``k`` in expectation).
        k: 0-d int32 ``k_seq``.
        rank: ``(B,)`` int32 SPEC §6 rank of each eligible sequence, −1 for ineligible ones.
        difficulty: ``(B,)`` float32 ``D_b`` (0 for ineligible sequences).
        eligible: ``(B,)`` bool, sequences with at least one eligible shifted target.
        ratio: 0-d float32 effective ratio (after the dynamic threshold) that produced ``k``.
        base_ratio: 0-d float32 curriculum ratio ``base(step)`` (NaN when ``ratio`` was passed directly).
        token_scores: the :class:`TokenScores` of the router's tokens at the input positions ``(B, T)``.
        tokens_out_of_range: 0-d int32 count of non-ignored targets outside ``[0, V)``; always 0 in PyTorch,
            where such labels raise (CPU) or trip a device assertion (CUDA) instead.
    """

    mask: torch.Tensor
    k: torch.Tensor
    rank: torch.Tensor
    difficulty: torch.Tensor
    eligible: torch.Tensor
    ratio: torch.Tensor
    base_ratio: torch.Tensor
    token_scores: TokenScores
    tokens_out_of_range: torch.Tensor
