"""Regenerate the committed conformance vectors from the float64 oracle.

    python -m tests.conformance.generate        # rewrites tests/conformance/cases.json

Each case stores its inputs and the oracle's outputs. `tests/test_oracle.py` checks that the oracle still
reproduces them (so a change of the oracle is a visible diff of this file), and
`tests/parity/test_conformance.py` runs both packages on every case.

Cases are built so that the expected selection does not depend on float32-vs-float64 rounding: ties are
exact (identical rows give bit-identical scores in any implementation) and distinct scores are far apart.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tests import oracle

OUT = Path(__file__).with_name("cases.json")


def _enc(x):
    if isinstance(x, np.ndarray):
        return _enc(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_enc(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def _spread_logits(rng: np.random.Generator, n: int, V: int, scale: float = 3.0) -> np.ndarray:
    """Rows whose difficulties are well separated (different temperatures)."""
    base = rng.standard_normal((n, V))
    temps = np.linspace(0.2, 4.0, n)
    rng.shuffle(temps)
    return (base * scale / temps[:, None]).astype(np.float32)


def build_cases() -> list[dict]:
    rng = np.random.default_rng(20261124)
    cases: list[dict] = []

    def add(name: str, logits: np.ndarray, targets: np.ndarray, step: int, **config) -> None:
        logits = np.asarray(logits, dtype=np.float32)
        config = {"selection": "stratified", **config}  # the loss default (SPEC §7), written out
        res = oracle.cggr_loss(logits, targets, step, **config)
        sc = res["scores"]
        cases.append({
            "name": name,
            "logits": _enc(logits),
            "targets": _enc(np.asarray(targets)),
            "step": step,
            "config": config,
            "expected": {
                "lse": _enc(sc["stats"]["lse"]),
                "entropy": _enc(sc["stats"]["entropy"]),
                "confidence": _enc(sc["stats"]["confidence"]),
                "runner_up": _enc(sc["stats"]["runner_up"]),
                "nll": _enc(sc["stats"]["nll"]),
                "difficulty": _enc(sc["difficulty"]),
                "eligible": _enc(sc["eligible"]),
                "mask": _enc(res["mask"]),
                "k": res["k"],
                "ratio": float(res["ratio"]),
                "loss": res["loss"],
                "metrics": _enc(res["metrics"]),
            },
        })

    # Docs' metrics example: warmup 1000, min 0.25, step 500 -> ratio 0.625, 160 of 256 tokens.
    logits = _spread_logits(rng, 256, 11)
    targets = rng.integers(0, 11, size=256)
    add("docs_metrics_example", logits, targets, 500, dynamic_threshold=False, warmup_steps=1000,
        min_tokens_ratio=0.25)
    # After warmup, 3-D input, V not a power of two, every scoring mode.
    logits3 = _spread_logits(rng, 4 * 9, 37).reshape(4, 9, 37)
    targets3 = rng.integers(0, 37, size=(4, 9))
    for scoring in oracle.SCORING_MODES:
        add(f"scoring_{scoring}_3d", logits3, targets3, 2000, scoring=scoring, dynamic_threshold=True,
            warmup_steps=1000)
    # Every selection strategy on the same batch, with ignored tokens and a fully ignored sequence.
    targets_ign = targets3.copy()
    targets_ign[1, :] = -100
    targets_ign[0, ::3] = -100
    for selection in oracle.SELECTION_STRATEGIES:
        add(f"selection_{selection}_ignored", logits3, targets_ign, 10_000, selection=selection,
            min_tokens_per_sequence=2, num_strata=3, warmup_steps=100)
    # Stratified with spill-over (ratio high enough that the hardest stratum overflows).
    add("stratified_spill", logits3, targets3, 300, selection="stratified", warmup_steps=1000,
        dynamic_threshold=False)
    # Ties: identical rows -> identical difficulties, broken by lower flat index; equal maxima -> margin 1.
    tie_row = np.array([2.0, 2.0, -1.0, 0.5, 0.0, -3.0, 1.0], dtype=np.float32)
    other = rng.standard_normal((6, 7)).astype(np.float32) * 0.1  # high entropy rows, well above the ties
    tied = np.concatenate([np.tile(tie_row, (6, 1)), other])
    perm = rng.permutation(12)
    tied = tied[perm]
    tied_targets = np.full(12, 3)
    add("ties_topk", tied, tied_targets, 5000, scoring="margin", min_tokens_ratio=0.75, warmup_steps=10,
        dynamic_threshold=False)
    add("ties_entropy_stratified", tied, tied_targets, 5000, scoring="entropy", selection="stratified",
        min_tokens_ratio=0.5, warmup_steps=10, dynamic_threshold=False)
    # NaN / +inf / -inf rows, -inf entries (masked vocabulary), a target whose logit is -inf.
    bad = _spread_logits(rng, 10, 13)
    bad[1, 4] = np.nan
    bad[3, 0] = np.inf
    bad[5, :] = -np.inf
    bad[6, 2:9] = -np.inf       # masked entries in a finite row: legal
    bad[7, 5] = -np.inf         # target below is 5: nll = inf -> not finite
    bad_t = rng.integers(0, 13, size=10)
    bad_t[6] = 0
    bad_t[7] = 5
    add("nonfinite_rows", bad, bad_t, 50, warmup_steps=100)
    # All ignored: loss 0, nothing selected.
    add("all_ignored", logits3, np.full((4, 9), -100), 10, warmup_steps=100)
    # V = 1: p2 = 0, margin term 0, entropy 0.
    add("vocab_one", rng.standard_normal((5, 1)).astype(np.float32), np.zeros(5, dtype=np.int64), 0,
        scoring="combined", warmup_steps=0, min_tokens_ratio=0.4)
    # Dynamic threshold with custom sensitivity, 2-D input of odd size, ratio rounding half-up.
    add("dynamic_sensitivity", _spread_logits(rng, 23, 5), rng.integers(0, 5, size=23), 7,
        threshold_sensitivity=0.9, warmup_steps=20, min_tokens_ratio=0.3)
    return cases


def main() -> None:
    cases = build_cases()
    OUT.write_text(json.dumps({"spec_version": 1, "cases": cases}, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
