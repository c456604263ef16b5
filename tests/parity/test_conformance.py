"""Both packages against the committed conformance vectors (tests/conformance/cases.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import cggr_jax  # noqa: E402
import cggr_torch  # noqa: E402
from tests import oracle  # noqa: E402

CASES = json.loads((Path(__file__).parents[1] / "conformance" / "cases.json").read_text())["cases"]


def _nested(x):
    """JSON nested lists with 'nan'/'inf' strings -> float64 array."""
    return np.vectorize(float, otypes=[np.float64])(np.array(x, dtype=object))


def _run(framework: str, case: dict):
    logits = _nested(case["logits"]).astype(np.float32)
    targets = np.array(case["targets"], dtype=np.int64)
    cfg = dict(case["config"])
    if framework == "torch":
        lt = torch.from_numpy(logits).requires_grad_(True)
        loss, metrics = cggr_torch.cggr_loss(lt, torch.from_numpy(targets), case["step"], **cfg)
        loss.backward()
        sc = cggr_torch.scoring.score_tokens(torch.from_numpy(logits), torch.from_numpy(targets),
                                             scoring=cfg.get("scoring", "combined"))
        conv = lambda t: t.detach().numpy()  # noqa: E731
        return float(loss.detach()), {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}, sc, conv
    loss, metrics = cggr_jax.cggr_loss(jnp.asarray(logits), jnp.asarray(targets, dtype=jnp.int32),
                                       jnp.int32(case["step"]), **cfg)
    sc = cggr_jax.scoring.score_tokens(jnp.asarray(logits), jnp.asarray(targets, dtype=jnp.int32),
                                       scoring=cfg.get("scoring", "combined"))
    return float(loss), {k: np.asarray(v).item() for k, v in metrics.items()}, sc, np.asarray


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance(framework, case):
    exp = case["expected"]
    loss, metrics, sc, conv = _run(framework, case)
    eligible = conv(sc.eligible).astype(bool)
    np.testing.assert_array_equal(eligible, np.array(exp["eligible"], dtype=bool))
    for name, tol_key in [("lse", "lse"), ("entropy", "entropy"), ("confidence", "confidence"),
                          ("runner_up", "runner_up"), ("nll", "nll")]:
        got = conv(getattr(sc.stats, name))[eligible]
        want = _nested(exp[name])[eligible]
        atol, rtol = oracle.SCORE_TOL[tol_key]
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(conv(sc.difficulty)[eligible], _nested(exp["difficulty"])[eligible],
                               atol=atol, rtol=rtol)
    # Given its own float32 scores and the expected float32 ratio, the selection is the expected one exactly.
    pkg = cggr_torch if framework == "torch" else cggr_jax
    ratio = np.float32(exp["ratio"])
    ratio = torch.tensor(ratio) if framework == "torch" else jnp.float32(ratio)
    cfg = case["config"]
    mask, k = pkg.selection.select_tokens(sc.difficulty, sc.eligible, ratio,
                                          selection=cfg.get("selection", "topk"),
                                          num_strata=cfg.get("num_strata", 4),
                                          min_tokens_per_sequence=cfg.get("min_tokens_per_sequence", 1))
    np.testing.assert_array_equal(conv(mask).astype(bool), np.array(exp["mask"], dtype=bool))
    assert int(k) == exp["k"]
    em = exp["metrics"]
    assert metrics["tokens_total"] == em["tokens_total"]
    assert metrics["tokens_selected"] == em["tokens_selected"]
    assert metrics["tokens_nonfinite"] == em["tokens_nonfinite"]
    assert metrics["step"] == em["step"]
    assert metrics["token_ratio"] == pytest.approx(em["token_ratio"], abs=1e-7)
    assert metrics["effective_ratio"] == pytest.approx(em["effective_ratio"], abs=1e-6)
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty"):
        assert metrics[key] == pytest.approx(em[key], abs=1e-4, rel=1e-5), key
    assert np.isfinite(loss)
    assert loss == pytest.approx(exp["loss"], abs=1e-4, rel=1e-5)
