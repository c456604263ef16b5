"""The NamedTuples shared by the modules of ``cggr_jax`` (the same names and fields as ``cggr_torch.types``).

Kernel modules return :class:`TokenStatistics`; the policy modules build :class:`TokenScores` and
:class:`SequenceSelection` from them. Nothing here imports another ``cggr_jax`` module.
"""
from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["TokenStatistics", "TokenScores", "SequenceSelection"]


class TokenStatistics(NamedTuple):
    """Float32 statistics of every token (SPEC §2; token shape = the logits' shape without ``V``).

    ``nll`` is 0 where there is no usable target (no targets given, ``ignore_index``, or out of range).
    """

    lse: jax.Array
    entropy: jax.Array
    confidence: jax.Array
    runner_up: jax.Array
    nll: jax.Array


class TokenScores(NamedTuple):
    """Difficulty, validity and eligibility of every token (SPEC §3–§4).

    ``difficulty`` float32; ``valid`` = the token has a target ``!= ignore_index`` (every token when no
    targets are given), and lies inside ``valid_mask`` where one is passed (SPEC §4); ``eligible`` = ``valid``
    and the target inside ``[0, V)`` and the row finite and the difficulty not NaN; ``stats`` the
    :class:`TokenStatistics`. (A traced out-of-range target is valid but never eligible: SPEC §11.)
    """

    difficulty: jax.Array
    eligible: jax.Array
    valid: jax.Array
    stats: TokenStatistics


class SequenceSelection(NamedTuple):
    """Sequence selection of batch splitting (SPEC §9); ``B`` = batch size. The same fields in both packages.

    Attributes:
        mask: ``(B,)`` bool, the kept sequences (exactly ``k`` of them; for ``selection="sampled"`` the random draw of
            SPEC §9.2, ``k`` in expectation).
        k: int32 scalar ``k_seq``.
        rank: ``(B,)`` int32 SPEC §6 rank of each eligible sequence, −1 for ineligible ones.
        difficulty: ``(B,)`` float32 ``D_b`` (0 for ineligible sequences).
        eligible: ``(B,)`` bool, sequences with at least one eligible shifted target.
        ratio: float32 effective ratio (after the dynamic threshold) that produced ``k``.
        base_ratio: float32 curriculum ratio ``base(step)`` (NaN when ``ratio`` was passed directly).
        token_scores: the :class:`TokenScores` of the shifted pairs, shape ``(B, T−1)``.
        tokens_out_of_range: int32 count of valid shifted targets outside ``[0, V)`` (traced input only;
            concrete input raises instead).
    """

    mask: jax.Array
    k: jax.Array
    rank: jax.Array
    difficulty: jax.Array
    eligible: jax.Array
    ratio: jax.Array
    base_ratio: jax.Array
    token_scores: TokenScores
    tokens_out_of_range: jax.Array
