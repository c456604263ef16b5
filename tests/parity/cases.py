"""Shared case builders and checks of the parity tests (SPEC §9, §11): random router batches, the JAX bucket
padding, and the three-way comparison of a sequence selection (PyTorch, JAX, the float64 oracle).

A JAX selection runs on batches padded to one bucket shape (extra all-padding sequences below, extra padding
positions after every sequence: neither is ever a target, SPEC §9), so that the bucket compiles once instead of
every random shape compiling anew; its per-sequence results are cut back to the real batch.
"""
from __future__ import annotations

import numpy as np

from tests import oracle

#: The JAX bucket (B, T) of the random sequence batches (B <= 8, T <= 9).
BUCKET = (8, 9)


def pad_to(x: np.ndarray, shape: tuple[int, ...], fill) -> np.ndarray:
    """``x`` padded with ``fill`` at the end of its leading ``len(shape)`` dimensions up to ``shape``."""
    widths = [(0, n - m) for n, m in zip(shape, x.shape)] + [(0, 0)] * (x.ndim - len(shape))
    return np.pad(x, widths, constant_values=fill)


def sequence_batch(rng: np.random.Generator, B: int, T: int, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random router ``(logits, labels, attention_mask)``: float32 ``(B, T, V)`` logits at per-sequence
    temperatures, int64 labels with ~10 % ``-100``, trailing padding; with ``B > 2`` the last sequence is all
    padding and the first all ignored (neither is ever kept)."""
    temps = rng.uniform(0.3, 3.0, size=(B, 1, 1))
    logits = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < 0.1] = -100
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        pad = int(rng.integers(0, T // 2))
        if pad:
            mask[b, T - pad:] = 0
    if B > 2:
        mask[B - 1] = 0        # an all-padding sequence is never kept
        labels[0] = -100       # an all-ignored sequence is never kept
    return logits, labels, mask


def bucketed(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, dtype: str = "float32") -> tuple:
    """The JAX arrays ``(logits, labels, attention_mask)`` of a batch padded to :data:`BUCKET` (logits 0 in
    ``dtype``, labels ``-100``, mask 0; labels and mask int32)."""
    import jax.numpy as jnp

    return (jnp.asarray(pad_to(logits, BUCKET, 0.0)).astype(getattr(jnp, dtype)),
            jnp.asarray(pad_to(labels, BUCKET, -100), dtype=jnp.int32),
            jnp.asarray(pad_to(mask, BUCKET, 0), dtype=jnp.int32))


def real_sequences(selection, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mask, eligible, difficulty)`` of a JAX sequence selection on a :func:`bucketed` batch, cut back to the
    ``B`` real sequences; the padding sequences must be neither eligible nor kept."""
    assert not np.asarray(selection.mask)[B:].any() and not np.asarray(selection.eligible)[B:].any()
    return (np.asarray(selection.mask)[:B], np.asarray(selection.eligible)[:B],
            np.asarray(selection.difficulty)[:B])


def same_sequences(t, j_mask, j_eligible, j_difficulty, j_k, o: dict, ratio) -> bool:
    """SPEC §9 / §11 for one batch: PyTorch's selection ``t`` (a ``SequenceSelection``), JAX's (its mask,
    eligibility, difficulties and ``k`` on the real sequences) and the oracle's ``o`` (``sequence_eligible``,
    ``k``) have the same eligible sequences and ``k``; the difficulties agree within the score parity band; each
    package's mask is exactly the oracle's selection of its own difficulties (level 1); the two masks differ
    only at sequences within the band of the cut (level 3). Returns True when the masks are identical."""
    jm, je, jd = np.asarray(j_mask), np.asarray(j_eligible), np.asarray(j_difficulty)
    e, d, tm = t.eligible.numpy(), t.difficulty.numpy(), t.mask.numpy()
    np.testing.assert_array_equal(e, je)
    np.testing.assert_array_equal(e, o["sequence_eligible"])
    assert int(t.k) == int(j_k) == o["k"]
    np.testing.assert_allclose(d[e], jd[e], atol=oracle.SCORE_PARITY_ATOL, rtol=oracle.SCORE_PARITY_RTOL)
    m_o, _ = oracle.select_tokens(d, e, ratio)
    np.testing.assert_array_equal(tm, m_o)
    m_o, _ = oracle.select_tokens(jd, je, ratio)
    np.testing.assert_array_equal(jm, m_o)
    diff = tm != jm
    if not diff.any():
        return True
    cut = np.sort(d[e])[::-1][int(t.k) - 1]
    assert np.all(np.abs(d[diff] - cut) <= 2 * oracle.SCORE_PARITY_ATOL)
    return False


def same_selection(difficulty: np.ndarray, eligible: np.ndarray, ratio, **kwargs) -> tuple[np.ndarray, int]:
    """SPEC §11 level 1: both packages' ``select_tokens`` on the same float32 difficulties, eligibility and
    ratio (``kwargs``: ``selection``, ``num_strata``, ``min_tokens_per_sequence``) select the same ``k`` tokens,
    bit for bit; returns ``(mask, k)``."""
    import jax.numpy as jnp
    import torch

    from cggr_jax import selection as jsel
    from cggr_torch import selection as tsel

    m_t, k_t = tsel.select_tokens(torch.from_numpy(difficulty), torch.from_numpy(eligible), torch.tensor(ratio),
                                  **kwargs)
    m_j, k_j = jsel.select_tokens(jnp.asarray(difficulty), jnp.asarray(eligible), jnp.float32(ratio), **kwargs)
    assert int(k_t) == int(k_j)
    np.testing.assert_array_equal(m_t.numpy(), np.asarray(m_j))
    return m_t.numpy(), int(k_t)
