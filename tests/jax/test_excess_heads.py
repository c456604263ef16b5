"""SPEC §3.1 ``scoring='excess'`` in the fused LM head and the distributed loss (SPEC §13) of ``cggr_jax``.

References:

* ``CGGRLoss(scoring='excess')`` on the materialised logits ``hidden · Wᵀ + b`` (computed as the fused head
  computes its blocks) with ``jax.grad``: loss, metrics, mask and gradients w.r.t. hidden, W and b;
* the float64 oracle (``reference_nll=``, fed the fused path's own float32 difficulties) for chunked blocks;
* the Pallas statistics kernel (``interpret=True`` off the GPU) against the XLA reference path;
* the distributed loss on 4 host CPU devices (one subprocess, as tests/jax/test_distributed.py) against the
  single-device selection and loss on the concatenated batch.

Odd sizes (N = 37 or 3 × 13, d = 23, V = 301), fp32/bf16 (fp16 against the oracle), NaN/±inf references (not
eligible, counted in ``tokens_nonfinite``), ignore_index, all-ignored batches and the argument errors.

``cggr_jax.integrations`` has no entry point that takes labels; the labels-taking fused helper,
``cggr_jax.causal_lm.decoder_lm_cggr_loss``, shifts a labels-aligned reference like the labels (tested last).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = 4
V, D_HID = 301, 23


def _inputs(seed, shape, dtype, *, ignore_index=-100, ref_dtype=np.float32):
    """NumPy hidden, weight, bias (exact in ``dtype``), targets and a reference with NaN / +inf / −inf at
    valid tokens and NaN at an ignored one (3 non-finite valid references)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    cast = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    h = (rng.standard_normal(shape + (D_HID,)) * rng.uniform(0.2, 3.0, size=shape + (1,))).astype(cast)
    w = (rng.standard_normal((V, D_HID)) * (1.5 / np.sqrt(D_HID))).astype(cast)
    b = (rng.standard_normal(V) * 0.5).astype(cast)
    t = rng.integers(0, V, size=shape).astype(np.int32)
    t[rng.random(shape) < 0.15] = ignore_index
    ref = rng.uniform(-1.0, 6.0, size=shape)
    flat_t, flat_r = t.reshape(-1), ref.reshape(-1)
    flat_t[[1, 4, 9]] = [3, 5, 7]
    flat_r[[1, 4, 9]] = [np.nan, np.inf, -np.inf]
    flat_t[6], flat_r[6] = ignore_index, np.nan          # ignored: its reference is never read, never counted
    return h, w, b, t, ref.astype(ref_dtype)


# ============================================================================== distributed subprocess
def _dp_cases() -> dict[str, str]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import cggr_jax
    from cggr_jax import distributed as Dj
    from cggr_jax import scoring, selection

    assert len(jax.devices()) == DEVICES
    mesh = Mesh(np.array(jax.devices()), ("data",))
    put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731

    def batch(seed, shape, Vd=11):
        rng = np.random.default_rng(seed)
        z = (rng.standard_normal(shape + (Vd,)) * 2.0 / rng.uniform(0.3, 3.0, shape + (1,))).astype(np.float32)
        t = rng.integers(0, Vd, shape).astype(np.int32)
        t[rng.random(shape) < 0.2] = -100
        ref = rng.uniform(-1.0, 5.0, shape).astype(np.float32)
        t.reshape(-1)[[0, 5]] = 1
        ref.reshape(-1)[[0]], ref.reshape(-1)[[5]] = np.nan, np.inf
        return z, t, ref

    def global_scope():
        for i, (shape, cfg) in enumerate([((DEVICES * 2, 7), dict(selection="sequence_aware",
                                                                   min_tokens_per_sequence=2)),
                                          ((DEVICES * 9,), dict(selection="topk")),
                                          ((DEVICES * 3, 5), dict(selection="stratified"))]):
            cfg = dict(scoring="excess", warmup_steps=20, **cfg)
            z, t, ref = batch(10 + i, shape)

            def f(lg, lb, rf):
                return Dj.cggr_loss(lg, lb, 9, mesh=mesh, reference_nll=rf, **cfg)

            (loss, met), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(put(z), put(t), put(ref))
            sc = scoring.score_tokens(jnp.asarray(z), jnp.asarray(t), scoring="excess", reference_nll=ref)
            mask, _ = selection.select_tokens(sc.difficulty, sc.eligible, met["effective_ratio"],
                                              selection=cfg["selection"],
                                              min_tokens_per_sequence=cfg.get("min_tokens_per_sequence", 1))
            (want, wmet), wgrad = jax.value_and_grad(
                lambda lg: cggr_jax.cggr_loss(lg, jnp.asarray(t), 9, reference_nll=ref, **cfg), has_aux=True)(
                jnp.asarray(z))
            mask = np.asarray(mask)
            g = np.asarray(grad)
            assert int(met["tokens_selected"]) == int(mask.sum()) == int(wmet["tokens_selected"]) > 0
            np.testing.assert_array_equal(np.abs(g).sum(-1) > 0, mask & (np.abs(np.asarray(wgrad)).sum(-1) > 0))
            assert int(met["tokens_nonfinite"]) == int(wmet["tokens_nonfinite"]) == 2
            np.testing.assert_allclose(float(loss), float(want), atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(g, np.asarray(wgrad), atol=1e-5, rtol=1e-4)

    def local_scope_and_module():
        z, t, ref = batch(20, (DEVICES * 2, 5))
        cfg = dict(scoring="excess", warmup_steps=0)
        loss, met = jax.jit(lambda lg, lb, rf: Dj.cggr_loss(lg, lb, 0, mesh=mesh, scope="local", reference_nll=rf,
                                                            **cfg))(put(z), put(t), put(ref))
        parts = [cggr_jax.cggr_loss(jnp.asarray(zs), jnp.asarray(ts), 0, reference_nll=rs, **cfg)
                 for zs, ts, rs in zip(np.split(z, DEVICES), np.split(t, DEVICES), np.split(ref, DEVICES))]
        np.testing.assert_allclose(float(loss), np.mean([float(p[0]) for p in parts]), atol=1e-6, rtol=1e-5)
        assert int(met["tokens_nonfinite"]) == sum(int(p[1]["tokens_nonfinite"]) for p in parts) == 2
        crit = Dj.DistributedCGGRLoss(mesh=mesh, **cfg)
        g_loss, _ = jax.jit(crit.__call__)(put(z), put(t), 0, put(ref))
        want, _ = cggr_jax.cggr_loss(jnp.asarray(z), jnp.asarray(t), 0, reference_nll=ref, **cfg)
        np.testing.assert_allclose(float(g_loss), float(want), atol=1e-5, rtol=1e-4)

    report = {}
    for name, case in (("global_scope", global_scope), ("local_scope_and_module", local_scope_and_module)):
        try:
            case()
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc()
    return report


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    print("CGGR-EXCESS-DP " + json.dumps(_dp_cases()), flush=True)
    sys.exit(0)

# ============================================================================================ pytest side
import pytest  # noqa: E402

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from cggr_jax import CGGRLoss, dispatch  # noqa: E402
from cggr_jax import distributed as Dj  # noqa: E402
from cggr_jax import fused_linear as fl  # noqa: E402
from cggr_jax import scoring as sc  # noqa: E402
from cggr_jax import selection as sel  # noqa: E402
from tests import oracle  # noqa: E402

DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
WHOLE = dict(row_chunk_size=1000)
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _logits(h, w, b):
    """The materialised logits exactly as the fused head forms each block (float32 accumulation, bias added
    in float32, cast to the inputs' dtype)."""
    z = jax.lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (z + b.astype(jnp.float32)).astype(h.dtype)


def _fused(h, w, b, t, ref, step, **kw):
    def f(h, w, b):
        out = fl.fused_linear_cggr(h, w, t, step, bias=b, scoring="excess", reference_nll=ref, **kw)
        return out.loss, out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(h, w, b)
    return out, grads


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)


def _close(actual, expected, rel, name):
    a, e = _f64(actual), np.asarray(expected, np.float64)
    scale = max(1e-30, float(np.abs(e).max())) if e.size else 1.0
    err = float(np.abs(a - e).max()) if a.size else 0.0
    assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3g} > {rel:g} × max|ref| {scale:.3g}"


def _arrays(h, w, b, t, ref):
    return jnp.asarray(h), jnp.asarray(w), jnp.asarray(b), jnp.asarray(t), ref


# ------------------------------------------------------------------------ fused head == CGGRLoss(excess)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,selection", [((37,), "topk"), ((3, 13), "sequence_aware"),
                                             ((37,), "stratified")])
def test_fused_excess_equals_cggr_loss_on_materialised_logits(dtype, shape, selection):
    h, w, b, t, ref = _arrays(*_inputs(1, shape, dtype))
    cfg = dict(selection=selection, min_tokens_ratio=0.3, warmup_steps=10, min_tokens_per_sequence=2)
    out, grads = _fused(h, w, b, t, ref, 7, **cfg, **WHOLE)
    crit = CGGRLoss(scoring="excess", **cfg)
    (loss, met), want = jax.value_and_grad(lambda h, w, b: crit(_logits(h, w, b), t, 7, ref), argnums=(0, 1, 2),
                                           has_aux=True)(h, w, b)
    s = sc.score_tokens(_logits(h, w, b), t, scoring="excess", reference_nll=ref)
    mask, _ = sel.select_tokens(s.difficulty, s.eligible, met["effective_ratio"], selection=selection,
                                min_tokens_per_sequence=2)
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(mask))
    assert int(met["tokens_selected"]) == int(np.asarray(mask).sum()) > 0
    for key in met:
        np.testing.assert_allclose(float(out.metrics[key]), float(met[key]), atol=1e-6, rtol=1e-6, err_msg=key)
    assert int(out.metrics["tokens_nonfinite"]) == 3
    np.testing.assert_allclose(float(out.loss), float(loss), atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want):
        _close(a, _f64(e), GRAD_TOL[dtype], name)
    flat = np.asarray(out.mask).reshape(-1)
    assert not flat[[1, 4, 6, 9]].any()
    assert not np.asarray(grads[0]).reshape(-1, D_HID)[~flat].any()


@pytest.mark.parametrize("dtype,ref_dtype", [("float32", np.float64), ("bfloat16", "bfloat16"),
                                             ("float16", np.float16)])
def test_chunked_fused_excess_matches_oracle(dtype, ref_dtype):
    import ml_dtypes

    ref_dtype = ml_dtypes.bfloat16 if ref_dtype == "bfloat16" else ref_dtype
    h, w, b, t, ref = _arrays(*_inputs(2, (3, 13), dtype, ref_dtype=ref_dtype))
    cfg = dict(selection="sequence_aware", min_tokens_ratio=0.3, warmup_steps=100, min_tokens_per_sequence=1)
    out, (gh, gw, gb) = _fused(h, w, b, t, ref, 60, **cfg, **CHUNKS)
    r64 = np.asarray(ref, np.float64)
    z = _f64(_logits(h, w, b))
    exp = oracle.cggr_loss(z, np.asarray(t), 60, scoring="excess", reference_nll=r64,
                           difficulty_override=np.asarray(out.scores.difficulty), **cfg)
    np.testing.assert_array_equal(np.asarray(out.mask), exp["mask"])
    so = oracle.score_tokens(z, np.asarray(t), "excess", reference_nll=r64)
    e = so["eligible"]
    np.testing.assert_array_equal(np.asarray(out.scores.eligible), e)
    err = np.abs(np.asarray(out.scores.difficulty, np.float64) - so["difficulty"])[e]
    bound = 3e-4 + 1e-5 * np.abs(so["difficulty"]) + 1e-5 * np.abs(so["stats"]["nll"]) + 2.0 ** -24 * np.abs(r64)
    assert (err <= bound[e]).all()
    d32 = np.asarray(out.scores.stats.nll) - np.asarray(ref).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out.scores.difficulty)[e], d32[e])
    np.testing.assert_allclose(float(out.loss), exp["loss"], atol=1e-4, rtol=1e-5)
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite"):
        assert int(out.metrics[key]) == exp["metrics"][key], key
    G = exp["grad"].reshape(-1, V)
    _close(gh, (G @ _f64(w)).reshape(h.shape), GRAD_TOL[dtype], "hidden")
    _close(gw, G.T @ _f64(h).reshape(-1, D_HID), GRAD_TOL[dtype], "weight")
    _close(gb, G.sum(0), GRAD_TOL[dtype], "bias")


def test_pallas_kernel_path_reads_the_reference():
    """The Pallas statistics kernel in vocabulary blocks (interpreted off the GPU): the XLA path's result."""
    h, w, b, t, ref = _arrays(*_inputs(3, (37,), "float32"))
    cfg = dict(warmup_steps=0, min_tokens_ratio=0.4, **CHUNKS)
    with dispatch.force("reference"):
        want, g_r = _fused(h, w, b, t, ref, 0, **cfg)
    jax.clear_caches()
    with dispatch.force("kernel"):
        assert dispatch.use_kernels(h)
        got, g_k = _fused(h, w, b, t, ref, 0, **cfg)
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    assert int(got.metrics["tokens_nonfinite"]) == int(want.metrics["tokens_nonfinite"]) == 3
    np.testing.assert_allclose(float(got.loss), float(want.loss), atol=1e-6, rtol=1e-5)
    for name, a, e in zip(("hidden", "weight", "bias"), g_k, g_r):
        _close(a, _f64(e), 1e-5, name)
    scores = fl.fused_linear_scores(h, w, t, b, scoring="excess", reference_nll=ref, vocab_chunk_size=64)
    with dispatch.force("reference"):
        s_ref = fl.fused_linear_scores(h, w, t, b, scoring="excess", reference_nll=ref)
    np.testing.assert_array_equal(np.asarray(scores.eligible), np.asarray(s_ref.eligible))


def test_ignore_index_all_ignored_and_jit():
    h, w, b, t, ref = _arrays(*_inputs(4, (37,), "float32", ignore_index=-1))
    out, _ = _fused(h, w, b, t, ref, 0, ignore_index=-1, warmup_steps=0, **CHUNKS)
    assert not np.asarray(out.mask)[np.asarray(t) == -1].any() and int(out.metrics["tokens_nonfinite"]) == 3
    assert int(out.metrics["tokens_total"]) == int(((np.asarray(t) != -1) & np.isfinite(ref)).sum())
    t_none = jnp.full_like(t, -1)
    out, (gh, gw, gb) = _fused(h, w, b, t_none, np.full_like(ref, np.nan), 0, ignore_index=-1, warmup_steps=0,
                               **CHUNKS)
    assert float(out.loss) == 0.0 and int(out.metrics["tokens_nonfinite"]) == 0
    assert not np.asarray(gh).any() and not np.asarray(gw).any() and not np.asarray(gb).any()
    # under jit the reference is an array argument: a new reference reuses the compilation
    f = jax.jit(lambda r: fl.fused_linear_cggr_loss(h, w, t, 0, bias=b, scoring="excess", reference_nll=r,
                                                   ignore_index=-1, warmup_steps=0)[0])
    a, c = f(jnp.asarray(ref)), f(jnp.asarray(ref) + 1.0)
    assert np.isfinite(float(a)) and np.isfinite(float(c)) and f._cache_size() == 1


def test_fused_scores_equal_score_tokens():
    h, w, b, t, ref = _arrays(*_inputs(5, (3, 13), "float32"))
    got = fl.fused_linear_scores(h, w, t, b, scoring="excess", reference_nll=ref, **WHOLE)
    exp = sc.score_tokens(_logits(h, w, b), t, scoring="excess", reference_nll=ref)
    np.testing.assert_array_equal(np.asarray(got.eligible), np.asarray(exp.eligible))
    np.testing.assert_array_equal(np.asarray(got.difficulty), np.asarray(exp.difficulty))


# ------------------------------------------------------------------------------------------ bad input
def _bad_calls():
    h, w, b, t, _ = _arrays(*_inputs(6, (2, 5), "float32"))
    z = _logits(h, w, b)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return {
        "fused_linear_cggr": lambda s, r: fl.fused_linear_cggr(h, w, t, 0, bias=b, scoring=s, reference_nll=r),
        "fused_linear_scores": lambda s, r: fl.fused_linear_scores(h, w, t, b, scoring=s, reference_nll=r),
        "distributed.cggr_loss": lambda s, r: Dj.cggr_loss(z, t, 0, mesh=mesh, scoring=s, reference_nll=r),
        "distributed local": lambda s, r: Dj.cggr_loss(z, t, 0, mesh=mesh, scope="local", scoring=s,
                                                       reference_nll=r),
        "DistributedCGGRLoss": lambda s, r: Dj.DistributedCGGRLoss(mesh=mesh, scoring=s)(z, t, 0, r),
    }


@pytest.mark.parametrize("entry", ["fused_linear_cggr", "fused_linear_scores", "distributed.cggr_loss",
                                   "distributed local", "DistributedCGGRLoss"])
def test_bad_reference_is_a_value_error_naming_it(entry):
    call = _bad_calls()[entry]
    with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs"):
        call("excess", None)
    with pytest.raises(ValueError, match=r"reference_nll: only scoring='excess'.*scoring='combined'"):
        call("combined", jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 5\).*got \(10,\)"):
        call("excess", jnp.zeros(10))
    with pytest.raises(ValueError, match="reference_nll: expected a floating dtype"):
        call("excess", jnp.zeros((2, 5), jnp.int32))


# ------------------------------------------------------------------------- 4 host devices, SPEC §13
_REPORT: dict[str, str] = {}


@pytest.mark.parametrize("case", ["global_scope", "local_scope_and_module"])
def test_distributed_excess_equals_the_concatenated_batch(case):
    if not _REPORT:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CGGR-EXCESS-DP ")]
        assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        _REPORT.update(json.loads(lines[-1][len("CGGR-EXCESS-DP "):]))
    assert _REPORT.get(case) == "ok", _REPORT.get(case, "did not run")


def test_decoder_lm_helper_shifts_the_reference_like_the_labels():
    """SPEC §3.1: decoder_lm_cggr_loss's reference is aligned like the unshifted labels and shifted with them:
    the same loss as the fused head on hand-shifted targets and reference, and a different one unshifted."""
    import jax.numpy as jnp
    from flax import nnx

    from cggr_jax import fused_linear as fl
    from cggr_jax import causal_lm
    from cggr_jax.models import DecoderConfig, DecoderLM

    model = DecoderLM(DecoderConfig(vocab_size=301, d_model=24, num_layers=1, num_heads=2, max_seq_len=16),
                      rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 301, (3, 9)), jnp.int32)
    ref = rng.uniform(0.0, 8.0, (3, 9)).astype(np.float32)
    ref[:, 0] = np.nan                       # never read: position 0 predicts nothing
    cfg = dict(scoring="excess", selection="topk", min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=False)
    loss, metrics = causal_lm.decoder_lm_cggr_loss(model, ids, ids, 0, reference_nll=jnp.asarray(ref), **cfg)
    hidden = causal_lm.decoder_lm_hidden_states(model, ids, None)
    tgt = jnp.concatenate([ids[:, 1:], jnp.full((3, 1), -100, jnp.int32)], axis=1)
    ref_s = jnp.asarray(np.concatenate([ref[:, 1:], np.zeros((3, 1), np.float32)], axis=1))
    want, want_m = fl.fused_linear_cggr_loss(hidden.astype(model.config.dtype), model.lm_head.kernel[...], tgt, 0,
                                             weight_layout="dv", logits_dtype=jnp.float32, reference_nll=ref_s, **cfg)
    assert int(metrics["tokens_nonfinite"]) == 0 and int(metrics["tokens_total"]) == 3 * 8
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-6)
    # A caller who passes the targets-aligned (already shifted) reference gets it shifted once more: wrong tokens.
    other, _ = causal_lm.decoder_lm_cggr_loss(model, ids, ids, 0, reference_nll=ref_s, **cfg)
    assert abs(float(other) - float(loss)) > 1e-4
    with pytest.raises(ValueError, match="reference_nll: expected shape"):
        causal_lm.decoder_lm_cggr_loss(model, ids, ids, 0, reference_nll=jnp.zeros((3, 8)), **cfg)
