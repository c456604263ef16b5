"""``cggr_torch.policy_gradient`` (SPEC §14.3) against the float64 oracle.

The oracle takes the materialised logits ``F.linear(hidden, weight, bias)``, computes the per-token log-probs
(``oracle.token_stats``), selects on the implementation's own float32 difficulties (so that the masks compare
exactly, SPEC §11 level 1), evaluates the clipped objective and its aggregation in float64
(``oracle.policy_gradient_terms`` / ``policy_gradient_loss``) and chains ``∂loss/∂logprob`` through
``oracle.token_stats_grad`` to ``∂h``, ``∂W``, ``∂b``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cggr import CGGRConfig
from cggr_torch import policy_gradient_loss
from cggr_torch.policy_gradient import PG_CONFIG, PG_METRIC_KEYS, PolicyGradientLoss, policy_gradient_capacity
from cggr_torch.loss import METRIC_KEYS
from tests import oracle
from tests.torch import as_f64

B, T, D, V = 3, 13, 23, 301
CHUNKS = dict(row_chunk_size=7, vocab_chunk_size=64)


def _inputs(seed, dtype=torch.float32, per_token_adv=False):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((B, T, D)) * rng.uniform(0.3, 3.0, (B, T, 1))).astype(np.float32)
    w = (rng.standard_normal((V, D)) * (1.5 / np.sqrt(D))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, (B, T))
    t[:, :3] = -100                     # the prompt
    t[1, 9:] = -100                     # a shorter completion
    adv = rng.standard_normal((B, T) if per_token_adv else (B,)).astype(np.float32)
    lp0 = -rng.uniform(2.0, 8.0, (B, T)).astype(np.float32)
    return dict(h=torch.from_numpy(h).to(dtype), w=torch.from_numpy(w).to(dtype), b=torch.from_numpy(b).to(dtype),
                t=torch.from_numpy(t), adv=torch.from_numpy(adv), lp0=torch.from_numpy(lp0))


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _oracle(x, out, *, old=None, ref=None, beta=0.0, eps_low=0.2, eps_high=None, loss_type="dapo",
            temperature=1.0, softcap=None, selection="topk", ratio=0.2, step=0, extra_ok=None, **sel):
    z = as_f64(F.linear(x["h"], x["w"], x["b"]))
    t = x["t"].numpy()
    st = oracle.token_stats(z, t, temperature, softcap)
    elig = st["finite"] & (t != -100)
    if extra_ok is not None:
        elig = elig & extra_ok
    d = sel.pop("difficulty", None)
    d = out.entropy.numpy() if d is None else d
    sel.pop("scoring", None)
    if selection == "sampled":
        mask, weights, *_ = oracle.sample_tokens(d, elig, ratio, step, 0, 1.0, 0.1, 1e-6)
    else:
        mask, _ = oracle.select_tokens(d, elig, ratio, selection, **sel)
        weights = None
    adv = x["adv"].numpy()
    adv = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    old_v = st["logprob"] if old is None else old
    terms = oracle.policy_gradient_terms(np.where(elig, st["logprob"], 0.0), np.where(elig, old_v, 0.0),
                                         np.where(elig, adv, 0.0), None if ref is None else np.where(elig, ref, 0.0),
                                         beta, eps_low, eps_low if eps_high is None else eps_high)
    agg = oracle.policy_gradient_loss(terms["loss"], terms["grad"], mask, elig, weights, loss_type)
    G = oracle.token_stats_grad(z, t, agg["grad"], np.zeros((B, T)), temperature, softcap)
    h64 = as_f64(x["h"])
    h64 = np.where(np.isfinite(h64), h64, 0.0)       # non-finite rows have G = 0: no 0·NaN in the reference
    clip = float((mask & terms["clipped"]).sum()) / max(1, int(mask.sum()))
    return dict(loss=agg["loss"], mask=mask, gh=G @ as_f64(x["w"]), gw=np.einsum("btv,btd->vd", G, h64),
                gb=G.sum(axis=(0, 1)), clip=clip)


def _run(x, **kw):
    h, w, b = _leaf(x["h"]), _leaf(x["w"]), _leaf(x["b"])
    out = policy_gradient_loss(h, w, x["t"], x["adv"], kw.pop("old", None), kw.pop("ref", None), b, **CHUNKS, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, b.grad


def _check(out, grads, ref, rel=2e-5, loss_tol=1e-6):
    np.testing.assert_array_equal(out.mask.numpy(), ref["mask"])
    assert abs(float(out.loss.detach()) - ref["loss"]) <= loss_tol + 1e-5 * abs(ref["loss"])
    for g, key in zip(grads, ("gh", "gw", "gb")):
        e = ref[key]
        scale = max(1e-12, float(np.abs(e).max()))
        assert float(np.abs(g.double().numpy() - e).max()) <= rel * scale, key


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "token-mean", "sequence-mean", "bnpo"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_default_entropy_top20_against_the_oracle(loss_type, per_token_adv):
    x = _inputs(1, per_token_adv=per_token_adv)
    out, *grads = _run(x, loss_type=loss_type)
    ref = _oracle(x, out, loss_type=loss_type)
    _check(out, grads, ref)
    assert int(out.metrics["tokens_selected"]) == oracle.num_selected(int((x["t"] != -100).sum()), 0.2)
    # off-policy with an old log-prob: the clip is active for some tokens
    stats_lp = out.logprob.detach()
    old = stats_lp + 0.6 * torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    out, *grads = _run(x, loss_type=loss_type, old=old, epsilon_low=0.1, epsilon_high=0.28)
    ref = _oracle(x, out, old=old.numpy().astype(np.float64), loss_type=loss_type, eps_low=0.1, eps_high=0.28)
    _check(out, grads, ref)
    assert float(out.metrics["clip_fraction"]) == pytest.approx(ref["clip"], abs=1e-6)


@pytest.mark.parametrize("temperature, softcap", [(0.7, None), (1.0, 3.0), (1.3, 2.0)])
def test_kl_temperature_softcap(temperature, softcap):
    x = _inputs(4)
    ref_lp = x["lp0"]
    out, *grads = _run(x, ref=ref_lp, beta=0.04, temperature=temperature, softcap=softcap, loss_type="grpo")
    ref = _oracle(x, out, ref=ref_lp.numpy().astype(np.float64), beta=0.04, temperature=temperature,
                  softcap=softcap, loss_type="grpo")
    _check(out, grads, ref)
    assert float(out.metrics["kl"]) > 0


@pytest.mark.parametrize("selection, extra", [("stratified", dict(num_strata=3)), ("topk", {}),
                                              ("sequence_aware", dict(min_tokens_per_sequence=2)),
                                              ("fixed_quota", {})])
@pytest.mark.parametrize("scoring", ["entropy", "combined", "margin", "loss"])
def test_every_selection_and_scoring(selection, extra, scoring):
    x = _inputs(5)
    out, *grads = _run(x, selection=selection, scoring=scoring, min_tokens_ratio=0.4, **extra)
    from cggr_torch.scoring import difficulty_from_statistics
    from cggr_torch.token_stats import fused_linear_statistics
    stats = fused_linear_statistics(x["h"], x["w"], x["t"], x["b"], **CHUNKS)
    d = difficulty_from_statistics(stats, scoring).numpy()
    ref = _oracle(x, out, selection=selection, ratio=0.4, scoring=scoring, difficulty=d, **extra)
    _check(out, grads, ref)


def test_sampled_selection_weights_the_loss():
    x = _inputs(6)
    out, *grads = _run(x, selection="sampled", min_tokens_ratio=0.5, step=3, sample_seed=0)
    ref = _oracle(x, out, selection="sampled", ratio=0.5, step=3)
    _check(out, grads, ref)
    assert policy_gradient_capacity(B * T, B, 0.5, CGGRConfig(selection="sampled")) == B * T


def test_curriculum_and_dynamic_threshold():
    x = _inputs(7)
    out, *grads = _run(x, warmup_steps=10, min_tokens_ratio=0.2, step=5, dynamic_threshold=True)
    base = float(oracle.linear_warmup_ratio(0.2, 10)(5))
    conf = out.metrics["avg_confidence"]
    ratio = oracle.dynamic_ratio(base, float(conf), 0.5)
    assert abs(float(out.metrics["effective_ratio"]) - float(ratio)) <= 1e-6
    ref = _oracle(x, out, ratio=float(out.metrics["effective_ratio"]))
    _check(out, grads, ref)


def test_backward_touches_only_the_kept_rows():
    """Every matmul of the backward has at most ``capacity`` rows, and unselected tokens get zero ∂h."""
    x = _inputs(8)

    class Rows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a = args[0] if func is torch.ops.aten.mm.default else args[1]
                self.rows.append(a.shape[0])
            return func(*args, **(kwargs or {}))

    h, w, b = _leaf(x["h"]), _leaf(x["w"]), _leaf(x["b"])
    out = policy_gradient_loss(h, w, x["t"], x["adv"], None, None, b, row_chunk_size=64, vocab_chunk_size=64)
    n = int((x["t"] != -100).sum())
    cap = policy_gradient_capacity(B * T, B, PG_CONFIG.min_tokens_ratio, PG_CONFIG)
    assert cap == oracle.num_selected(B * T, 0.2) < n
    with Rows() as rec:
        out.loss.backward()
    # matmuls with the kept rows (cap) or their transpose (vocab chunk × cap), never all N rows
    assert rec.rows and all(r <= max(cap, 64) for r in rec.rows)
    assert all(r != B * T for r in rec.rows)
    unselected = ~out.mask
    assert (h.grad[unselected] == 0).all() and (h.grad[out.mask] != 0).any()


def test_non_finite_inputs_are_not_eligible():
    x = _inputs(9)
    adv = x["adv"].clone()
    adv[2] = math.nan
    old = x["lp0"].clone()
    old[0, 5] = math.inf
    h = x["h"].clone()
    h[1, 4] = math.nan
    x2 = dict(x, adv=adv, h=h)
    hl, wl, bl = _leaf(h), _leaf(x["w"]), _leaf(x["b"])
    out = policy_gradient_loss(hl, wl, x["t"], adv, old, None, bl, **CHUNKS)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hl.grad).all() and torch.isfinite(wl.grad).all()
    valid = int((x["t"] != -100).sum())
    seq2 = int((x["t"][2] != -100).sum())
    assert int(out.metrics["tokens_nonfinite"]) == seq2 + 1 + 1
    assert int(out.metrics["tokens_total"]) == valid - seq2 - 2
    assert not out.mask[2].any() and not out.mask[0, 5] and not out.mask[1, 4]
    extra = np.ones((B, T), bool)
    extra[2] = False
    extra[0, 5] = False
    ref = _oracle(x2, out, old=old.numpy().astype(np.float64), extra_ok=extra)
    _check(out, (hl.grad, wl.grad, bl.grad), ref)


def test_all_ignored_gives_zero():
    x = _inputs(10)
    t = torch.full((B, T), -100)
    h, w = _leaf(x["h"]), _leaf(x["w"])
    out = policy_gradient_loss(h, w, t, x["adv"])
    out.loss.backward()
    assert float(out.loss) == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
    assert int(out.metrics["tokens_total"]) == 0


@pytest.mark.parametrize("dtype, rel", [("bfloat16", 3e-2), ("float16", 4e-3)])
def test_half_precision(dtype, rel):
    x = _inputs(11, dtype=getattr(torch, dtype))
    out, *grads = _run(x)
    ref = _oracle(x, out)
    _check(out, grads, ref, rel=rel, loss_tol=1e-3)


def test_module_holds_the_step_and_metrics():
    x = _inputs(12)
    mod = PolicyGradientLoss(warmup_steps=4, min_tokens_ratio=0.25, loss_type="grpo", beta=0.0)
    assert set(mod.get_metrics()) >= set(METRIC_KEYS) | set(PG_METRIC_KEYS)
    h = _leaf(x["h"])
    loss = mod(h, x["w"], x["t"], x["adv"])
    loss.backward()
    m = mod.get_metrics()
    assert m["step"] == 0 and m["token_ratio"] == 1.0 and m["tokens_selected"] == m["tokens_total"]
    mod.step()
    mod.step()
    state = mod.state_dict()
    mod2 = PolicyGradientLoss(warmup_steps=4, min_tokens_ratio=0.25)
    mod2.load_state_dict(state)
    assert mod2.current_step == 2
    mod2(x["h"], x["w"], x["t"], x["adv"])
    assert mod2.get_metrics()["token_ratio"] == pytest.approx(0.625)
    fn = policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], step=2, warmup_steps=4, min_tokens_ratio=0.25)
    torch.testing.assert_close(mod2.last_output.loss, fn.loss)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="mean"), "loss_type"), (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(epsilon_high=math.nan), "epsilon_high"), (dict(beta=0.1), "ref_logprob"),
    (dict(beta=-1.0), "beta"), (dict(scoring="excess"), "scoring"), (dict(temperature=0), "temperature"),
    (dict(selection="nope"), "selection"), (dict(config=PG_CONFIG, min_tokens_ratio=0.5), "config"),
])
def test_bad_arguments(kwargs, match):
    x = _inputs(13)
    with pytest.raises(ValueError, match=match):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], **kwargs)


def test_bad_tensors():
    x = _inputs(14)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"][:2])
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"].long())
    with pytest.raises(ValueError, match="old_logprob"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], x["lp0"][:, :4])
    with pytest.raises(ValueError, match="ref_logprob"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], None, x["lp0"])         # beta = 0
    with pytest.raises(ValueError, match="targets"):
        policy_gradient_loss(x["h"], x["w"], x["t"] + 1000, x["adv"])


def test_oracle_policy_gradient_terms_by_finite_differences():
    rng = np.random.default_rng(30)
    lp = rng.uniform(-6, -1, 40)
    old = lp + rng.normal(0, 0.4, 40)
    adv = rng.normal(0, 1, 40)
    ref = lp + rng.normal(0, 0.3, 40)
    terms = oracle.policy_gradient_terms(lp, old, adv, ref, 0.1, 0.2, 0.28)
    eps = 1e-7
    fd = (oracle.policy_gradient_terms(lp + eps, old, adv, ref, 0.1, 0.2, 0.28)["loss"]
          - oracle.policy_gradient_terms(lp - eps, old, adv, ref, 0.1, 0.2, 0.28)["loss"]) / (2 * eps)
    np.testing.assert_allclose(terms["grad"], fd, atol=1e-6)
    assert terms["clipped"].any() and (~terms["clipped"]).any()
    kept = rng.random(40) > 0.5
    elig = kept | (rng.random(40) > 0.3)
    agg = oracle.policy_gradient_loss(terms["loss"].reshape(4, 10), terms["grad"].reshape(4, 10),
                                      kept.reshape(4, 10), elig.reshape(4, 10), loss_type="grpo")
    per_seq = [(terms["loss"].reshape(4, 10)[b] * kept.reshape(4, 10)[b]).sum() / max(1, elig.reshape(4, 10)[b].sum())
               for b in range(4)]
    assert agg["loss"] == pytest.approx(np.mean(per_seq))


def test_benchmark_script_runs_quick(tmp_path):
    """The PyTorch implementation of ``benchmarks/token_stats.py`` with ``--quick`` (the H200 script, tiny shapes on
    the CPU; the script itself goes through the shared front, tested in ``tests/test_benchmarks.py``)."""
    import json

    from benchmarks.ops.token_stats_torch import main

    out = tmp_path / "bench.json"
    assert main(["--quick", "--out", str(out), "--methods", "trl_materialised",
                 "cggr_policy_gradient", "--ratios", "0.2"]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"trl_materialised[0.2]", "cggr_policy_gradient[0.2]"}
    assert all("median_ms" in r for r in res.values())
