"""NumPy float64 oracle of SPEC.md.

Plain loops and float64 wherever SPEC.md does not prescribe float32 arithmetic, written for clarity rather
than speed: this module is the referee both packages are tested against, so it shares no code with them.
Section numbers refer to SPEC.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

# The modes computed from the logits alone (the conformance vectors and the parity sweeps iterate over these);
# SPEC §3.1's reference mode needs a reference_nll as well.
SCORING_MODES = ("entropy", "margin", "loss", "combined")
REFERENCE_SCORING_MODES = ("excess",)
ALL_SCORING_MODES = SCORING_MODES + REFERENCE_SCORING_MODES
SELECTION_STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")
# SPEC §7.4: the random, weighted strategy (kept apart: the sweeps above compare deterministic masks exactly).
SAMPLED_SELECTIONS = ("sampled",)
# SPEC §11 (sampled): inclusion probabilities of two implementations (or one and this oracle) agree within
# this relative tolerance; an inclusion may differ only where |u − π| lies within PI_RTOL·π of the boundary.
PI_RTOL = 1e-4
# The defaults of cggr.CGGRConfig's sample_* fields (SPEC §7.4).
SAMPLE_DEFAULTS = {"power": 1.0, "uniform_mix": 0.1, "floor": 1e-6, "seed": 0}

# SPEC §11: (atol, rtol) of an implementation's float32 statistic against this oracle.
SCORE_TOL: dict[str, tuple[float, float]] = {
    "lse": (1e-4, 1e-5),
    "entropy": (1e-4, 1e-5),
    "nll": (1e-4, 1e-5),
    "confidence": (1e-5, 1e-5),
    "runner_up": (1e-5, 1e-5),
    "margin": (1e-5, 1e-5),
    "difficulty": (3e-4, 1e-5),
}
SCORE_PARITY_ATOL = 6e-4
SCORE_PARITY_RTOL = 2e-5

F32 = np.float32


# ----------------------------------------------------------------------------------------------- §2 stats
def _row_statistics(z: np.ndarray) -> tuple[float, float, float, float]:
    """lse, entropy, p1, p2 of one row in float64 (nan where the row is not finite)."""
    z = np.asarray(z, dtype=np.float64)
    if np.isnan(z).any() or np.isposinf(z).any() or np.isneginf(z).all():
        return (math.nan,) * 4
    m = z.max()
    finite = ~np.isneginf(z)
    e = np.zeros_like(z)
    e[finite] = np.exp(z[finite] - m)
    d = e.sum()
    lse = m + math.log(d)
    p = e / d
    # H = lse - sum p z, with the p_j = 0 (z_j = -inf) terms contributing nothing.
    entropy = lse - float((p[finite] * z[finite]).sum())
    order = np.sort(z)[::-1]
    p1 = math.exp(order[0] - lse)
    p2 = math.exp(order[1] - lse) if z.size >= 2 and not np.isneginf(order[1]) else 0.0
    return lse, entropy, p1, p2


def token_statistics(logits: np.ndarray, targets: np.ndarray | None = None,
                     ignore_index: int = -100) -> dict[str, np.ndarray]:
    """SPEC §2 for every token. Returns float64 arrays of the token shape plus ``row_finite``."""
    logits = np.asarray(logits, dtype=np.float64)
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    out = {k: np.zeros(flat.shape[0]) for k in ("lse", "entropy", "confidence", "runner_up", "nll")}
    row_finite = np.zeros(flat.shape[0], dtype=bool)
    tflat = None if targets is None else np.asarray(targets).reshape(-1)
    for i, z in enumerate(flat):
        lse, h, p1, p2 = _row_statistics(z)
        out["lse"][i], out["entropy"][i], out["confidence"][i], out["runner_up"][i] = lse, h, p1, p2
        ok = all(math.isfinite(v) for v in (lse, h, p1, p2))
        if tflat is not None and tflat[i] != ignore_index:
            t = int(tflat[i])
            if not 0 <= t < z.size:
                raise ValueError(f"targets: value {t} outside [0, {z.size})")
            nll = lse - z[t]
            out["nll"][i] = nll
            ok = ok and math.isfinite(nll)
        row_finite[i] = ok
    res = {k: v.reshape(shape) for k, v in out.items()}
    res["row_finite"] = row_finite.reshape(shape)
    return res


# ------------------------------------------------------------------------------------------ §3 difficulty
def difficulty_from_statistics(stats: dict[str, np.ndarray], scoring: str = "combined",
                               has_targets: bool = True, reference_nll: np.ndarray | None = None) -> np.ndarray:
    if scoring not in ALL_SCORING_MODES:
        raise ValueError(f"scoring must be one of {ALL_SCORING_MODES}, got {scoring!r}")
    if (scoring == "excess") != (reference_nll is not None):
        raise ValueError("reference_nll is given exactly when scoring='excess'")
    if scoring == "excess":
        # SPEC §3.1: nll - ref in float64 on the reference's own values; a non-finite reference gives NaN
        # (not eligible), never an infinite difficulty that would rank as a number.
        if not has_targets:
            raise ValueError("scoring='excess' needs targets")
        ref = np.asarray(reference_nll, dtype=np.float64).reshape(stats["nll"].shape)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(ref), stats["nll"] - ref, np.nan)
    margin = 1.0 - (stats["confidence"] - stats["runner_up"])
    if scoring == "entropy":
        return stats["entropy"].copy()
    if scoring == "margin":
        return margin
    if scoring == "loss":
        if not has_targets:
            raise ValueError("scoring='loss' needs targets")
        return stats["nll"].copy()
    d = stats["entropy"] + margin
    return d + stats["nll"] if has_targets else d


def score_tokens(logits: np.ndarray, targets: np.ndarray | None = None, scoring: str = "combined",
                 ignore_index: int = -100, valid_mask: np.ndarray | None = None,
                 reference_nll: np.ndarray | None = None) -> dict[str, Any]:
    """SPEC §2-§4 (and §3.1 with ``reference_nll``): difficulty, validity and eligibility of every token.

    ``nonfinite`` (the metric ``tokens_nonfinite``): valid tokens whose row, or (excess) reference, is not
    finite."""
    stats = token_statistics(logits, targets, ignore_index)
    shape = stats["lse"].shape
    if targets is not None:
        valid = np.asarray(targets).reshape(shape) != ignore_index
    else:
        valid = np.ones(shape, dtype=bool)
    if valid_mask is not None:
        valid = valid & np.asarray(valid_mask, dtype=bool).reshape(shape)
    d = difficulty_from_statistics(stats, scoring, has_targets=targets is not None, reference_nll=reference_nll)
    finite = stats["row_finite"].copy()
    if reference_nll is not None:
        finite &= np.isfinite(np.asarray(reference_nll, dtype=np.float64).reshape(shape))
    eligible = valid & finite & ~np.isnan(d)
    nonfinite = valid & ~finite
    return {"difficulty": d, "eligible": eligible, "valid": valid, "stats": stats, "nonfinite": nonfinite}


# ------------------------------------------------------------------------------------------------ §5 ratio
def linear_warmup_ratio(min_tokens_ratio: float = 0.25, warmup_steps: int = 1000) -> Callable[[int], np.float32]:
    """SPEC §5.1 in float32 arithmetic."""
    if not 0.0 < min_tokens_ratio <= 1.0:
        raise ValueError("min_tokens_ratio must be in (0, 1]")
    if warmup_steps < 0:
        raise ValueError("warmup_steps must be >= 0")
    mn = F32(min_tokens_ratio)

    def schedule(step: int) -> np.float32:
        if warmup_steps == 0:
            return mn
        t = min(F32(1.0), F32(step) / F32(warmup_steps))
        return F32(F32(1.0) - F32(t * F32(F32(1.0) - mn)))

    return schedule


def dynamic_ratio(base_ratio: float, mean_confidence: float, threshold_sensitivity: float) -> np.float32:
    """SPEC §5.2 in float32 arithmetic."""
    one = F32(1.0)
    adj = F32(F32(one - F32(mean_confidence)) * F32(threshold_sensitivity))
    return F32(min(one, F32(F32(base_ratio) * F32(one + adj))))


def num_selected(n: int, ratio: float) -> int:
    """SPEC §5.3, exact integer arithmetic."""
    n = int(n)
    if n == 0:
        return 0
    r_q = int(np.round(F32(F32(ratio) * F32(65536.0))))  # np.round is half-to-even
    k = (r_q * n + 32768) // 65536
    return min(n, max(1, k))


# ------------------------------------------------------------------------------------------- §6 the order
def _order_key(d: float) -> float:
    return 0.0 if d == 0 else float(d)  # -0.0 == +0.0


def rank_tokens(difficulty: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Rank of every eligible token (difficulty descending, lower flat index first); -1 elsewhere."""
    d = np.asarray(difficulty, dtype=np.float64).reshape(-1)
    e = np.asarray(eligible, dtype=bool).reshape(-1) & ~np.isnan(d)
    idx = [i for i in range(d.size) if e[i]]
    idx.sort(key=lambda i: (-_order_key(d[i]), i))
    rank = np.full(d.size, -1, dtype=np.int64)
    for r, i in enumerate(idx):
        rank[i] = r
    return rank.reshape(np.shape(difficulty))


# -------------------------------------------------------------------------------------------- §7 strategies
def stratum_counts(n: int, k: int, num_strata: int) -> tuple[list[int], list[int]]:
    """Stratum sizes m_s and effective quotas e_s (SPEC §7.2)."""
    S = num_strata
    bounds = [(s * n) // S for s in range(S + 1)]
    m = [bounds[s + 1] - bounds[s] for s in range(S)]
    W = S * (S + 1) // 2
    q = [(k * (S - s)) // W for s in range(S)]
    for s in range(k - sum(q)):
        q[s] += 1
    e = [0] * S
    carry = 0
    for s in range(S):
        e[s] = min(m[s], q[s] + carry)
        carry = q[s] + carry - e[s]
    for s in range(S):
        extra = min(m[s] - e[s], carry)
        e[s] += extra
        carry -= extra
    assert carry == 0 and sum(e) == k
    return m, e


def _mix32(x: int) -> int:
    """lowbias32 (SPEC §7.4), on Python ints reduced mod 2^32."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def uniform_hash(seed: int, step: int, index: int) -> float:
    """SPEC §7.4: ``u ∈ (0, 1)`` of token ``index`` at ``(seed, step)``; exact (an odd multiple of 2^-24)."""
    h = _mix32(int(seed) ^ 0x9E3779B9)
    h = _mix32(h ^ (int(step) & 0xFFFFFFFF))
    h = _mix32(h ^ (int(index) & 0xFFFFFFFF))
    return ((h >> 8) | 1) * 2.0 ** -24


def sampling_probabilities(difficulty: np.ndarray, eligible: np.ndarray, k: int, power: float = 1.0,
                           uniform_mix: float = 0.1, floor: float = 1e-6) -> np.ndarray:
    """SPEC §7.4: the inclusion probabilities π (float64, the input's shape; 0 where not eligible) whose sum is
    ``min(k, n)``, by the water-filling of the SPEC written as plainly as possible."""
    d = np.asarray(difficulty, dtype=np.float64).reshape(-1)
    e = np.asarray(eligible, dtype=bool).reshape(-1) & ~np.isnan(d)
    idx = [i for i in range(d.size) if e[i]]
    n = len(idx)
    pi = np.zeros(d.size)
    k = min(max(int(k), 0), n)
    if k == 0:
        return pi.reshape(np.shape(difficulty))
    fmax = float(np.finfo(np.float32).max)
    b = {i: min(max(d[i], 0.0) + floor, fmax) for i in idx}
    bmax = max(b.values())
    q = {i: math.exp(power * (math.log(b[i]) - math.log(bmax))) for i in idx}
    Q = sum(q.values())
    p = {i: (1.0 - uniform_mix) * q[i] / Q + uniform_mix / n for i in idx}
    order = sorted(idx, key=lambda i: (-p[i], i))
    ps = [p[i] for i in order]
    suffix = [0.0] * (n + 1)
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] + ps[j]
    jstar = next(j for j in range(k) if (k - j) * ps[j] <= suffix[j])
    c = (k - jstar) / suffix[jstar] if suffix[jstar] > 0 else 0.0
    for m, i in enumerate(order):
        pi[i] = 1.0 if (m < jstar or k == n) else min(1.0, c * ps[m])
    return pi.reshape(np.shape(difficulty))


def sample_tokens(difficulty: np.ndarray, eligible: np.ndarray, ratio: float, step: int = 0, seed: int = 0,
                  power: float = 1.0, uniform_mix: float = 0.1, floor: float = 1e-6
                  ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """SPEC §7.4: ``(mask, weights, k, pi, u)``: token i is in iff eligible and ``u_i < π_i``; ``w = 1/π``."""
    shape = np.shape(difficulty)
    d = np.asarray(difficulty, dtype=np.float64).reshape(-1)
    e = np.asarray(eligible, dtype=bool).reshape(-1) & ~np.isnan(d)
    k = num_selected(int(e.sum()), ratio)
    pi = sampling_probabilities(d, e, k, power, uniform_mix, floor).reshape(-1)
    u = np.array([uniform_hash(seed, step, i) for i in range(d.size)])
    mask = e & (u < pi)
    w = np.where(mask, 1.0 / np.where(mask, pi, 1.0), 0.0)
    return mask.reshape(shape), w.reshape(shape), k, pi.reshape(shape), u.reshape(shape)


def sample_ess(weights: np.ndarray) -> float:
    """SPEC §10: ``(Σw)² / Σw²`` over the selected tokens (0 when none)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def select_tokens(difficulty: np.ndarray, eligible: np.ndarray, ratio: float, selection: str = "topk",
                  num_strata: int = 4, min_tokens_per_sequence: int = 1) -> tuple[np.ndarray, int]:
    """SPEC §7. ``difficulty``/``eligible`` are (N,) or (B, T); rows of a 2-D input are sequences.
    ``sampled`` (§7.4) draws with the default step, seed and parameters (see :func:`sample_tokens`)."""
    if selection in SAMPLED_SELECTIONS:
        mask, _, k, _, _ = sample_tokens(difficulty, eligible, ratio)
        return mask, k
    if selection not in SELECTION_STRATEGIES:
        raise ValueError(f"selection must be one of {SELECTION_STRATEGIES}, got {selection!r}")
    shape = np.shape(difficulty)
    rank = rank_tokens(difficulty, eligible).reshape(-1)
    n = int((rank >= 0).sum())
    k = num_selected(n, ratio)
    mask = np.zeros(rank.size, dtype=bool)
    if selection in ("topk", "fixed_quota", "sequence_aware"):
        mask = (rank >= 0) & (rank < k)
    if selection == "stratified":
        m, e = stratum_counts(n, k, num_strata)
        chosen_ranks = set()
        start = 0
        for s in range(num_strata):
            for j in range(e[s]):
                chosen_ranks.add(start + ((2 * j + 1) * m[s]) // (2 * e[s]))
            start += m[s]
        mask = np.array([r in chosen_ranks for r in rank], dtype=bool) & (rank >= 0)
    if selection == "sequence_aware":
        seq = rank.reshape(shape if len(shape) == 2 else (1, -1))
        d2 = np.asarray(difficulty, dtype=np.float64).reshape(seq.shape)
        e2 = (seq >= 0)
        mask2 = mask.reshape(seq.shape)
        for b in range(seq.shape[0]):
            r_b = rank_tokens(d2[b], e2[b])
            mask2[b] |= (r_b >= 0) & (r_b < min_tokens_per_sequence)
        mask = mask2.reshape(-1)
    return mask.reshape(shape), k


# ----------------------------------------------------------------------------------------------- §8 loss
def cggr_loss(logits: np.ndarray, targets: np.ndarray, step: int, scoring: str = "combined",
              selection: str = "stratified", dynamic_threshold: bool = True, threshold_sensitivity: float = 0.5,
              min_tokens_ratio: float = 0.25, warmup_steps: int = 1000, num_strata: int = 4,
              min_tokens_per_sequence: int = 1, ignore_index: int = -100,
              difficulty_override: np.ndarray | None = None,
              reference_nll: np.ndarray | None = None, sample_power: float = 1.0,
              sample_uniform_mix: float = 0.1, sample_floor: float = 1e-6,
              sample_seed: int = 0) -> dict[str, Any]:
    """The whole CGGRLoss forward and its analytic gradient w.r.t. the logits (float64).

    ``difficulty_override`` lets a test feed an implementation's own float32 difficulties, so that the
    selection is compared exactly while the scores are compared within tolerance.
    """
    logits = np.asarray(logits, dtype=np.float64)
    sc = score_tokens(logits, targets, scoring, ignore_index, reference_nll=reference_nll)
    d = sc["difficulty"] if difficulty_override is None else np.asarray(difficulty_override, np.float64)
    eligible = sc["eligible"]
    n = int(eligible.sum())
    base = linear_warmup_ratio(min_tokens_ratio, warmup_steps)(step)
    conf = sc["stats"]["confidence"]
    mean_conf = float(conf[eligible].mean()) if n else 0.0
    if dynamic_threshold and selection != "fixed_quota":
        ratio = dynamic_ratio(base, mean_conf, threshold_sensitivity)
    else:
        ratio = F32(base)
    if selection in SAMPLED_SELECTIONS:   # SPEC §7.4, §8: Σ w·ce / max(1, n)
        mask, weights, k, _, _ = sample_tokens(d, eligible, ratio, step, sample_seed, sample_power,
                                               sample_uniform_mix, sample_floor)
        denom = max(1, n)
    else:
        mask, k = select_tokens(d, eligible, ratio, selection, num_strata, min_tokens_per_sequence)
        weights = mask.astype(np.float64)
        denom = max(1, int(mask.sum()))
    count = int(mask.sum())
    wflat = weights.reshape(-1)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    mflat = mask.reshape(-1)
    grad = np.zeros_like(flat)
    total = 0.0
    lse = sc["stats"]["lse"].reshape(-1)
    for i in np.nonzero(mflat)[0]:
        total += wflat[i] * sc["stats"]["nll"].reshape(-1)[i]
        p = np.exp(flat[i] - lse[i])
        p[t[i]] -= 1.0
        grad[i] = wflat[i] * p / denom
    loss = total / denom

    def avg(x: np.ndarray) -> float:
        return float(x[eligible].mean()) if n else 0.0

    metrics = {
        "step": int(step),
        "token_ratio": float(base),
        "effective_ratio": float(ratio),
        "tokens_selected": count,
        "tokens_total": n,
        "tokens_nonfinite": int(sc["nonfinite"].sum()),
        "tokens_out_of_range": 0,
        "avg_confidence": avg(conf),
        "avg_entropy": avg(sc["stats"]["entropy"]),
        "avg_difficulty": avg(d),
        "sample_ess": sample_ess(weights) if selection in SAMPLED_SELECTIONS else float(count),
        "selection": selection,
        "scoring": scoring,
    }
    return {"loss": loss, "grad": grad.reshape(logits.shape), "mask": mask, "k": k, "ratio": ratio,
            "weights": weights,
            "metrics": metrics, "scores": sc}


# -------------------------------------------------------------------------------------- §9 sequence level
def effective_labels(labels: np.ndarray, attention_mask: np.ndarray | None = None,
                     ignore_index: int = -100) -> np.ndarray:
    """SPEC §9: a copy of the unshifted ``labels`` with every padding position (``attention_mask == 0``) set to
    ``ignore_index`` (a padding position is never a target)."""
    tgt = np.array(labels).copy()
    if attention_mask is not None:
        tgt[np.asarray(attention_mask) == 0] = ignore_index
    return tgt


def sequence_difficulty(difficulty: np.ndarray, eligible: np.ndarray,
                        sequence_reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §9 / §9.1: ``(D, sequence eligible)``: ``D_b`` = the float64 mean of ``difficulty`` over the eligible
    tokens of row ``b`` (minus ``sequence_reference[b]``, per sequence, when given), rounded once to float32; a
    row without an eligible token is not eligible and its ``D_b`` is 0."""
    d = np.asarray(difficulty, dtype=np.float64)
    e = np.asarray(eligible, dtype=bool)
    seq_d = np.zeros(d.shape[0], dtype=np.float32)
    seq_ok = e.any(axis=1)
    for b in np.flatnonzero(seq_ok):
        mean = d[b][e[b]].mean()
        seq_d[b] = F32(mean - sequence_reference[b] if sequence_reference is not None else mean)
    return seq_d, seq_ok


def _scored_sequence_difficulty(scores: dict[str, Any], sequence_reference: np.ndarray | None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sequence_difficulty` of router token ``scores`` (:func:`score_tokens`): with a per-sequence
    reference (SPEC §9.1) the mean ``nll`` minus ``ref_b``, else the mean token difficulty (per-token ``excess``
    already subtracted the reference in ``scores['difficulty']``)."""
    if sequence_reference is not None:
        return sequence_difficulty(scores["stats"]["nll"], scores["eligible"], sequence_reference)
    return sequence_difficulty(scores["difficulty"], scores["eligible"])


def select_sequences(router_logits: np.ndarray, labels: np.ndarray, ratio: float, scoring: str = "combined",
                     ignore_index: int = -100, attention_mask: np.ndarray | None = None,
                     difficulty_override: np.ndarray | None = None) -> dict[str, Any]:
    """SPEC §9: shift, score tokens, average per sequence, keep the k_seq hardest sequences.

    ``ratio`` is the float32 ratio after the dynamic threshold. ``difficulty_override`` (B, T-1) replaces the
    token difficulties (to compare selection exactly given an implementation's own float32 scores).
    """
    logits = np.asarray(router_logits, dtype=np.float64)[:, :-1]
    tgt = effective_labels(labels, attention_mask, ignore_index)[:, 1:]
    sc = score_tokens(logits, tgt, scoring, ignore_index)
    d = sc["difficulty"] if difficulty_override is None else np.asarray(difficulty_override, np.float64)
    seq_d, seq_ok = sequence_difficulty(d, sc["eligible"])
    mask, k = select_tokens(seq_d, seq_ok, ratio, "topk")
    return {"mask": mask, "k": k, "sequence_difficulty": seq_d, "sequence_eligible": seq_ok, "scores": sc}


def select_sequences_excess(router_logits: np.ndarray, labels: np.ndarray, ratio: float,
                            reference_nll: np.ndarray, ignore_index: int = -100,
                            attention_mask: np.ndarray | None = None, shift: bool = True) -> dict[str, Any]:
    """SPEC §9.1: :func:`select_sequences` with ``scoring='excess'`` and batch splitting's ``reference_nll``,
    per token ``(B, T)`` (aligned like the unshifted labels: shifted with them) or per sequence ``(B,)``.

    Per token: ``d = nll − ref`` (float64, §3.1), ``D_b`` = mean of ``d`` over the eligible tokens. Per
    sequence: every token of ``b`` is checked against ``ref_b`` (non-finite: not eligible, counted in
    ``nonfinite``), ``d = nll − ref_b`` and ``D_b`` = (mean ``nll`` over the eligible tokens) ``− ref_b``.
    ``shift=False`` (masked LMs) pairs ``logits[:, t]`` with ``labels[:, t]``.
    """
    logits = np.asarray(router_logits, dtype=np.float64)
    tgt = effective_labels(labels, attention_mask, ignore_index)
    ref = np.asarray(reference_nll, dtype=np.float64)
    if shift:
        logits, tgt = logits[:, :-1], tgt[:, 1:]
    W = tgt.shape[1]
    per_sequence = ref.ndim == 1
    if per_sequence:
        token_ref = np.repeat(ref[:, None], W, axis=1)
    else:
        token_ref = ref[:, 1:] if shift else ref
    sc = score_tokens(logits, tgt, "excess", ignore_index, reference_nll=token_ref)
    seq_d, seq_ok = _scored_sequence_difficulty(sc, ref if per_sequence else None)
    mask, k = select_tokens(seq_d, seq_ok, ratio, "topk")
    return {"mask": mask, "k": k, "sequence_difficulty": seq_d, "sequence_eligible": seq_ok, "scores": sc}


def sample_sequences(sequence_difficulty: np.ndarray, sequence_eligible: np.ndarray, ratio: float, step: int = 0,
                     seed: int = 0, power: float = 1.0, uniform_mix: float = 0.1, floor: float = 1e-6
                     ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """SPEC §9.2: :func:`sample_tokens` over the ``(B,)`` sequence difficulties (the draw's index is the batch
    index ``b``): ``(mask, weights, k_seq, pi, u)``."""
    d = np.asarray(sequence_difficulty, dtype=np.float64).reshape(-1)
    return sample_tokens(d, np.asarray(sequence_eligible, dtype=bool).reshape(-1), ratio, step, seed, power,
                         uniform_mix, floor)


def sampled_sequence_loss(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                          sequence_eligible: np.ndarray, ignore_index: int = -100,
                          attention_mask: np.ndarray | None = None, shift: bool = True) -> dict[str, Any]:
    """SPEC §9.2 in float64: ``loss = Σ_b w_b · Σ_t ce_{b,t} / max(1, N_tok)`` over the full batch's main-model
    ``logits`` ``(B, T, V)`` (rows with ``w_b = 0`` contribute nothing), ``N_tok`` = the valid shifted targets of
    the eligible sequences; also ``full_mean`` = ``Σ_{eligible b} Σ_t ce_{b,t} / max(1, N_tok)``, the loss's
    expectation, and the per-sequence sums ``row_ce``."""
    z = np.asarray(logits, dtype=np.float64)
    tgt = effective_labels(labels, attention_mask, ignore_index)
    if shift:
        z, tgt = z[:, :-1], tgt[:, 1:]
    valid = tgt != ignore_index
    m = z.max(axis=-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1)))
    picked = np.take_along_axis(z, np.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
    row_ce = np.where(valid, lse - picked, 0.0).sum(axis=1)
    ok = np.asarray(sequence_eligible, dtype=bool)
    n_tok = int((valid & ok[:, None]).sum())
    w = np.asarray(weights, dtype=np.float64)
    return {"loss": float((w * row_ce).sum() / max(1, n_tok)), "n_tok": n_tok,
            "full_mean": float(row_ce[ok].sum() / max(1, n_tok)), "row_ce": row_ce}


# ------------------------------------------------------------------------------ §14 token stats and RL loss
def transform_logits(logits: np.ndarray, temperature: float = 1.0, softcap: float | None = None) -> np.ndarray:
    """SPEC §14.1 in float64: ``softcap·tanh(z/softcap)`` (when given), then divided by ``temperature``."""
    y = np.asarray(logits, dtype=np.float64)
    if softcap is not None:
        with np.errstate(invalid="ignore"):
            y = softcap * np.tanh(y / softcap)
    return y / temperature


def token_stats(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0, softcap: float | None = None,
                ignore_index: int = -100) -> dict[str, np.ndarray]:
    """SPEC §14.1-§14.2 of materialised logits: float64 ``logprob`` (0 for ignored targets), ``entropy``,
    ``lse`` (NaN on non-finite rows, except an ignored target's logprob 0), ``finite`` and the §2 statistics of
    the transformed logits under ``stats`` (NaN in every field of a non-finite row)."""
    y = transform_logits(logits, temperature, softcap)
    st = token_statistics(y, targets, ignore_index)
    ok = st["row_finite"]
    t = np.asarray(targets)
    has_t = t != ignore_index
    stats = {k: np.where(ok, st[k], np.nan) for k in ("lse", "entropy", "confidence", "runner_up", "nll")}
    logprob = np.where(has_t, -stats["nll"], 0.0)
    return {"logprob": logprob, "entropy": stats["entropy"], "lse": stats["lse"], "finite": ok, "stats": stats}


def token_stats_grad(logits: np.ndarray, targets: np.ndarray, g_logprob: np.ndarray, g_entropy: np.ndarray,
                     temperature: float = 1.0, softcap: float | None = None,
                     ignore_index: int = -100) -> np.ndarray:
    """``∂(Σ g_lp·logprob + g_H·H)/∂logits`` in float64 (SPEC §14.1); zero on non-finite rows and, for the
    log-prob part, on ignored targets."""
    z = np.asarray(logits, dtype=np.float64)
    res = token_stats(z, targets, temperature, softcap, ignore_index)
    y = transform_logits(z, temperature, softcap)
    V = z.shape[-1]
    zf, yf = z.reshape(-1, V), y.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    ok = res["finite"].reshape(-1)
    lse, H = res["lse"].reshape(-1), res["entropy"].reshape(-1)
    gl, gh = np.asarray(g_logprob, np.float64).reshape(-1), np.asarray(g_entropy, np.float64).reshape(-1)
    out = np.zeros_like(zf)
    for i in range(zf.shape[0]):
        if not ok[i]:
            continue
        fin = ~np.isneginf(yf[i])
        logp = np.full(V, -np.inf)
        logp[fin] = yf[i, fin] - lse[i]
        p = np.exp(logp)
        gy = np.zeros(V)
        gy[fin] = -gh[i] * p[fin] * (logp[fin] + H[i])
        if t[i] != ignore_index:
            gy -= gl[i] * p
            gy[int(t[i])] += gl[i]
        dy = np.full(V, 1.0 / temperature)
        if softcap is not None:
            dy = (1.0 - np.tanh(zf[i] / softcap) ** 2) / temperature
            dy = np.where(np.isfinite(dy), dy, 0.0)
        out[i] = gy * dy
    return out.reshape(z.shape)


LOSS_TYPES = ("grpo", "sequence-mean", "dapo", "token-mean", "bnpo")


def policy_gradient_terms(logprob: np.ndarray, old_logprob: np.ndarray, advantages: np.ndarray,
                          ref_logprob: np.ndarray | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
                          epsilon_high: float = 0.2) -> dict[str, np.ndarray]:
    """SPEC §14.3 per-token loss ``ℓ`` (float64) and its derivative ``∂ℓ/∂logprob``; ``advantages`` already
    broadcast to the token shape."""
    lp = np.asarray(logprob, np.float64)
    old = np.asarray(old_logprob, np.float64)
    A = np.asarray(advantages, np.float64)
    ratio = np.exp(lp - old)
    clipped = np.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped_wins = ratio * A <= clipped * A          # min(r·A, r̃·A) = r·A (ties: the unclipped one)
    loss = -np.minimum(ratio * A, clipped * A)
    # ∂(−r·A)/∂lp = −r·A where the unclipped term is the minimum; the clipped term is constant in lp
    # wherever the clamp is active (and equals r·A otherwise, which the tie rule assigns to the unclipped).
    grad = np.where(unclipped_wins, -ratio * A, 0.0)
    if ref_logprob is not None and beta != 0.0:
        ref = np.asarray(ref_logprob, np.float64)
        kl = np.exp(ref - lp) - (ref - lp) - 1.0
        loss = loss + beta * kl
        grad = grad + beta * (1.0 - np.exp(ref - lp))
    return {"loss": loss, "grad": grad, "ratio": ratio, "clipped": ~unclipped_wins}


def policy_gradient_loss(token_loss: np.ndarray, token_grad: np.ndarray, kept: np.ndarray, eligible: np.ndarray,
                         weights: np.ndarray | None = None, loss_type: str = "dapo") -> dict[str, Any]:
    """SPEC §14.3 aggregation of the per-token losses over the kept tokens: ``(B, T)`` arrays (a 1-D input is
    one sequence). Returns the float64 loss and ``∂loss/∂logprob`` (zero off the kept tokens)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    ell = np.asarray(token_loss, np.float64)
    g = np.asarray(token_grad, np.float64)
    kept = np.asarray(kept, bool)
    elig = np.asarray(eligible, bool)
    if ell.ndim == 1:
        ell, g, kept, elig = ell[None], g[None], kept[None], elig[None]
        w = None if weights is None else np.asarray(weights, np.float64)[None]
    else:
        w = None if weights is None else np.asarray(weights, np.float64)
    w = kept.astype(np.float64) if w is None else np.where(kept, w, 0.0)
    contrib = np.where(kept, w * np.where(kept, ell, 0.0), 0.0)
    if loss_type in ("grpo", "sequence-mean"):
        denom = np.maximum(1, elig.sum(axis=1, keepdims=True)).astype(np.float64) * ell.shape[0]
    else:
        denom = np.full((ell.shape[0], 1), float(max(1, int(elig.sum()))))
    loss = float((contrib / denom).sum())
    grad = np.where(kept, w * np.where(kept, g, 0.0) / denom, 0.0)
    return {"loss": loss, "grad": grad.reshape(np.asarray(token_loss).shape)}
def router_scored_positions(seq_len: int, router_positions: Any = "all", router_samples: int | None = None,
                            router_prefix: int | None = None, shift: bool = True) -> np.ndarray:
    """SPEC §9.3: the scored router positions ``S`` (ascending int64) of a batch of ``seq_len`` columns.

    ``R = min(P, T)`` read columns, ``L = min(R, T − 1)`` candidates (``R`` without ``shift``); a stride ``s``
    scores ``0, s, 2s, … < L``; a sample ``m`` scores ``⌊j·L/m⌋`` for ``j < m`` (all ``L`` when ``m >= L``)."""
    T = int(seq_len)
    R = T if router_prefix is None else min(int(router_prefix), T)
    L = max(0, min(R, T - 1)) if shift else R
    if router_samples is not None:
        m = int(router_samples)
        return np.arange(L, dtype=np.int64) if m >= L else np.array([j * L // m for j in range(m)], dtype=np.int64)
    s = 1 if router_positions == "all" else int(router_positions)
    return np.arange(0, L, s, dtype=np.int64)


def select_sequences_at(router_logits: np.ndarray, labels: np.ndarray, ratio: float, positions: np.ndarray,
                        scoring: str = "combined", ignore_index: int = -100,
                        attention_mask: np.ndarray | None = None,
                        reference_nll: np.ndarray | None = None) -> dict[str, Any]:
    """SPEC §9.3: :func:`select_sequences` (or :func:`select_sequences_excess` with ``reference_nll``) of a causal
    router scored at the pairs ``(t, t+1)``, ``t ∈ positions`` only; ``router_logits`` ``(B, T, V)`` are the full
    router's (a causal prefix router's logits are the same at the positions it reads). Every statistic —
    ``D_b``, eligibility, ``c̄`` (``mean_confidence``), ``tokens_total`` — is over the scored pairs."""
    pos = np.asarray(positions, dtype=np.int64)
    logits = np.asarray(router_logits, dtype=np.float64)[:, pos]
    tgt = effective_labels(labels, attention_mask, ignore_index)[:, pos + 1]
    sequence_ref = None
    if scoring == "excess":
        ref = np.asarray(reference_nll, dtype=np.float64)
        sequence_ref = ref if ref.ndim == 1 else None
        token_ref = np.repeat(ref[:, None], len(pos), axis=1) if sequence_ref is not None else ref[:, pos + 1]
        sc = score_tokens(logits, tgt, "excess", ignore_index, reference_nll=token_ref)
    else:
        sc = score_tokens(logits, tgt, scoring, ignore_index)
    e = sc["eligible"]
    seq_d, seq_ok = _scored_sequence_difficulty(sc, sequence_ref)
    mask, k = select_tokens(seq_d, seq_ok, ratio, "topk")
    conf = sc["stats"]["confidence"][e]
    return {"mask": mask, "k": k, "sequence_difficulty": seq_d, "sequence_eligible": seq_ok, "scores": sc,
            "tokens_total": int(e.sum()), "mean_confidence": float(conf.mean()) if conf.size else 0.0}
