"""Data-parallel CGGR in JAX (SPEC §13) on 4 host CPU devices.

``--xla_force_host_platform_device_count`` must be set before JAX initialises its backend, and other test
modules of the same pytest process import JAX first, so every check runs in **one subprocess** started with
``XLA_FLAGS`` set (this file is also its ``__main__``). The subprocess reports ``"ok"`` or a traceback per
case as JSON; the pytest tests below assert on that report.

References, on the concatenated (global) batch:

* the float64 oracle fed with the package's own float32 difficulties of every shard (so selections compare
  exactly, SPEC §11 level 1) for masks, loss, ∂loss/∂logits and metrics;
* the plain ``cggr_jax.cggr_loss`` on one device (unsharded arrays) for the ``jit``-over-sharded-arrays
  semantics, for parameter gradients, and for the local scope (mean of the per-shard losses).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable

import numpy as np

DEVICES = 4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAD_TOL = {"float32": (1e-5, 1e-4), "float16": (1e-5, 2e-3), "bfloat16": (1e-5, 1.6e-2)}
STRATEGY_CONFIGS = (
    dict(selection="topk", scoring="combined"),
    dict(selection="stratified", scoring="entropy", num_strata=3),
    dict(selection="sequence_aware", scoring="margin", min_tokens_per_sequence=2),
    dict(selection="fixed_quota", scoring="loss", min_tokens_ratio=0.3),
)


# ================================================================================= the subprocess's cases
def _batch(seed: int, shape: tuple[int, ...], V: int, dtype: str = "float32", p_ignore: float = 0.2):
    """Global NumPy batch: logits exactly representable in ``dtype`` (as float32) and int32 targets."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    temps = rng.uniform(0.3, 3.0, size=shape + (1,))
    x = (rng.standard_normal(shape + (V,)) * 2.0 / temps).astype(np.float32)
    if dtype != "float32":
        x = x.astype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16).astype(np.float32)
    t = rng.integers(0, V, size=shape).astype(np.int32)
    t[rng.random(shape) < p_ignore] = -100
    return x, t


class Ctx:
    """The mesh and helpers shared by the cases (built once in the subprocess)."""

    def __init__(self) -> None:
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        assert len(jax.devices()) == DEVICES, jax.devices()
        self.jax = jax
        self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.sharded = NamedSharding(self.mesh, P("data"))
        self.W = DEVICES

    def put(self, x: np.ndarray, dtype=None):
        import jax.numpy as jnp

        arr = jnp.asarray(x) if dtype is None else jnp.asarray(x).astype(dtype)
        return self.jax.device_put(arr, self.sharded)

    def shard_difficulties(self, logits: np.ndarray, targets: np.ndarray, scoring: str, dtype: str):
        """The package's own float32 difficulties/eligibility, computed shard by shard, concatenated."""
        import jax.numpy as jnp

        from cggr_jax.scoring import score_tokens

        parts = [score_tokens(jnp.asarray(lg).astype(dtype), jnp.asarray(tg), scoring=scoring)
                 for lg, tg in zip(np.split(logits, self.W), np.split(targets, self.W))]
        d = np.concatenate([np.asarray(p.difficulty) for p in parts])
        e = np.concatenate([np.asarray(p.eligible) for p in parts])
        return d, e


def _dp_value_and_grad(ctx: Ctx, scope: str, cfg: dict):
    import jax

    from cggr_jax import distributed as D

    def f(logits, labels, step):
        return D.cggr_loss(logits, labels, step, mesh=ctx.mesh, axis_name="data", scope=scope, **cfg)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def _compare_with_oracle(ctx: Ctx, logits: np.ndarray, targets: np.ndarray, step: int, dtype: str,
                         loss, metrics, grad, cfg: dict) -> None:
    from tests import oracle

    scoring = cfg.get("scoring", "combined")
    d, e = ctx.shard_difficulties(logits, targets, scoring, dtype)
    ratio = np.float32(metrics["effective_ratio"])
    mask_ref, k_ref = oracle.select_tokens(d, e, ratio, selection=cfg.get("selection", "stratified"),
                                           num_strata=cfg.get("num_strata", 4),
                                           min_tokens_per_sequence=cfg.get("min_tokens_per_sequence", 1))
    ref = oracle.cggr_loss(logits.astype(np.float64), targets, step, difficulty_override=d, **cfg)
    assert abs(float(ratio) - float(ref["ratio"])) <= 1e-6, (ratio, ref["ratio"])
    np.testing.assert_array_equal(ref["mask"], mask_ref)
    g = np.asarray(grad, dtype=np.float64)
    assert g.shape == logits.shape and np.isfinite(g).all()
    sel = np.abs(g).sum(-1) > 0
    np.testing.assert_array_equal(sel, mask_ref & (np.abs(ref["grad"]).sum(-1) > 0))
    assert (g[~mask_ref] == 0).all()
    atol, rtol = GRAD_TOL[dtype]
    np.testing.assert_allclose(g, ref["grad"], atol=atol, rtol=rtol)
    np.testing.assert_allclose(float(loss), ref["loss"], atol=1e-5, rtol=1e-4)
    om = ref["metrics"]
    for key in ("step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(metrics[key]) == om[key], (key, int(metrics[key]), om[key])
    for key, tol in (("token_ratio", 0.0), ("avg_confidence", 1e-5), ("avg_entropy", 1e-4),
                     ("avg_difficulty", 3e-4)):
        assert abs(float(metrics[key]) - om[key]) <= tol + 1e-5 * abs(om[key]), (key, float(metrics[key]), om[key])


def case_global_strategies(ctx: Ctx) -> None:
    """shard_map global scope = the single-device loss on the concatenated batch, every strategy/scoring."""
    for i, cfg in enumerate(STRATEGY_CONFIGS):
        cfg = {"warmup_steps": 20, **cfg}
        logits, targets = _batch(10 + i, (ctx.W * 2, 7), V=11)
        vg = _dp_value_and_grad(ctx, "global", cfg)
        (loss, metrics), grad = vg(ctx.put(logits), ctx.put(targets), 7 + 3 * i)
        _compare_with_oracle(ctx, logits, targets, 7 + 3 * i, "float32", loss, metrics, grad, cfg)


def case_global_flat_2d(ctx: Ctx) -> None:
    """(N, V) input: the global batch is one sequence of W·N tokens, so sequence_aware tops up that one
    sequence (a per-shard reading would top up every shard: with k ≈ 3 of 36 some shard would gain tokens)."""
    cfg = dict(selection="sequence_aware", min_tokens_per_sequence=3, dynamic_threshold=False, warmup_steps=0,
               min_tokens_ratio=0.1)
    logits, targets = _batch(30, (ctx.W * 9,), V=5)
    (loss, metrics), grad = _dp_value_and_grad(ctx, "global", cfg)(ctx.put(logits), ctx.put(targets), 30)
    _compare_with_oracle(ctx, logits, targets, 30, "float32", loss, metrics, grad, cfg)
    from tests import oracle

    k = oracle.num_selected(int(metrics["tokens_total"]), np.float32(0.1))
    assert int(metrics["tokens_selected"]) == max(k, 3), (int(metrics["tokens_selected"]), k)


def case_global_half_precision(ctx: Ctx) -> None:
    import jax.numpy as jnp

    for i, dtype in enumerate(("bfloat16", "float16")):
        logits, targets = _batch(40 + i, (ctx.W * 3, 5), V=13, dtype=dtype)
        cfg = dict(warmup_steps=16)
        vg = _dp_value_and_grad(ctx, "global", cfg)
        (loss, metrics), grad = vg(ctx.put(logits, getattr(jnp, dtype)), ctx.put(targets), 11)
        assert grad.dtype == getattr(jnp, dtype)
        _compare_with_oracle(ctx, logits, targets, 11, dtype, loss, metrics, grad.astype(jnp.float32), cfg)


def case_global_nonfinite_and_ignored(ctx: Ctx) -> None:
    """NaN / +inf / all-−inf rows, a −inf target logit, masked entries, and one shard with no valid token."""
    logits, targets = _batch(50, (ctx.W * 2, 6), V=7)
    logits[0, 1, 3] = np.nan
    logits[0, 2, :] = -np.inf
    logits[1, 0, 2] = np.inf
    logits[1, 4, :3] = -np.inf
    logits[-1, 3, 5] = -np.inf
    targets[0, 1], targets[0, 2], targets[1, 0], targets[1, 4], targets[-1, 3] = 1, 2, 2, 4, 5
    targets[2:4] = -100                                   # shard 1: nothing valid
    cfg = dict(warmup_steps=10)
    (loss, metrics), grad = _dp_value_and_grad(ctx, "global", cfg)(ctx.put(logits), ctx.put(targets), 9)
    _compare_with_oracle(ctx, logits, targets, 9, "float32", loss, metrics, grad, cfg)
    assert int(metrics["tokens_nonfinite"]) == 4
    assert (np.asarray(grad)[2:4] == 0).all()


def case_all_ignored(ctx: Ctx) -> None:
    """Nothing selectable on any shard: loss 0.0, an all-zero gradient, zero metrics, no NaN."""
    logits, targets = _batch(60, (ctx.W, 4), V=6)
    targets[:] = -100
    for scope in ("global", "local"):
        (loss, metrics), grad = _dp_value_and_grad(ctx, scope, {})(ctx.put(logits), ctx.put(targets), 3)
        assert float(loss) == 0.0 and (np.asarray(grad) == 0).all(), scope
        assert int(metrics["tokens_total"]) == 0 and int(metrics["tokens_selected"]) == 0
        assert float(metrics["avg_confidence"]) == 0.0 and float(metrics["avg_difficulty"]) == 0.0


def case_plain_jit_is_global(ctx: Ctx) -> None:
    """The plain cggr_jax.cggr_loss under jit on NamedSharding-sharded arrays = the single-device result
    (jit is a single-device program; XLA inserts the collectives), and our shard_map global scope agrees."""
    import jax

    import cggr_jax

    for i, cfg in enumerate(STRATEGY_CONFIGS[:1]):
        cfg = {"warmup_steps": 20, **cfg}
        logits, targets = _batch(70 + i, (ctx.W * 2, 5), V=9)
        plain = jax.jit(jax.value_and_grad(lambda lg, tg, st: cggr_jax.cggr_loss(lg, tg, st, **cfg), has_aux=True))
        (l_sh, m_sh), g_sh = plain(ctx.put(logits), ctx.put(targets), 12)
        single = jax.devices()[0]
        (l_1, m_1), g_1 = plain(jax.device_put(logits, single), jax.device_put(targets, single), 12)
        assert len(g_sh.sharding.device_set) == ctx.W          # the computation really ran sharded
        np.testing.assert_allclose(float(l_sh), float(l_1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g_sh), np.asarray(g_1), rtol=1e-5, atol=1e-8)
        for key in m_1:
            np.testing.assert_allclose(np.asarray(m_sh[key]), np.asarray(m_1[key]), rtol=1e-6, err_msg=key)
        _compare_with_oracle(ctx, logits, targets, 12, "float32", l_sh, m_sh, g_sh, cfg)
        (l_dp, m_dp), g_dp = _dp_value_and_grad(ctx, "global", cfg)(ctx.put(logits), ctx.put(targets), 12)
        np.testing.assert_allclose(float(l_dp), float(l_1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g_dp), np.asarray(g_1), rtol=1e-4, atol=1e-6)
        for key in ("tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range", "step"):
            assert int(m_dp[key]) == int(m_1[key]), key


def case_local_scope(ctx: Ctx) -> None:
    """scope='local' = the mean of the shards' own CGGR losses (and its gradient); combined metrics."""
    import jax
    import jax.numpy as jnp

    import cggr_jax

    cfg = dict(warmup_steps=5, selection="stratified", num_strata=2)
    logits, targets = _batch(80, (ctx.W * 3, 4), V=8)
    (loss, metrics), grad = _dp_value_and_grad(ctx, "local", cfg)(ctx.put(logits), ctx.put(targets), 3)

    def mean_of_shards(lg):
        outs = [cggr_jax.cggr_loss(a, b, 3, **cfg) for a, b in zip(jnp.split(lg, ctx.W), np.split(targets, ctx.W))]
        return sum(o[0] for o in outs) / ctx.W, [o[1] for o in outs]

    (ref_loss, shard_metrics), ref_grad = jax.jit(jax.value_and_grad(mean_of_shards, has_aux=True))(
        jnp.asarray(logits))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-8)
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(metrics[key]) == sum(int(m[key]) for m in shard_metrics), key
    n = np.array([float(m["tokens_total"]) for m in shard_metrics])
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty"):
        expect = sum(float(m[key]) * w for m, w in zip(shard_metrics, n)) / max(1.0, n.sum())
        np.testing.assert_allclose(float(metrics[key]), expect, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(metrics["effective_ratio"]),
                               np.mean([float(m["effective_ratio"]) for m in shard_metrics]), rtol=1e-6)
    assert int(metrics["step"]) == 3


def case_user_shard_map(ctx: Ctx) -> None:
    """shard_cggr_loss inside a hand-written shard_map: psum of the shares = the global loss; the DDP idiom
    (per-shard gradient of share·W, then pmean) gives the same parameter gradient."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import cggr_jax
    from cggr_jax import distributed as D

    V, step, cfg = 10, 4, dict(warmup_steps=8, selection="sequence_aware", min_tokens_per_sequence=1)
    rng = np.random.default_rng(90)
    x = rng.standard_normal((ctx.W * 2, 6, 5)).astype(np.float32)
    w = (rng.standard_normal((5, V)) * 2).astype(np.float32)
    _, targets = _batch(91, (ctx.W * 2, 6), V=V)

    def model_loss(w, x, t):
        return cggr_jax.cggr_loss(x @ w, t, step, **cfg)[0]

    ref_loss, ref_gw = jax.value_and_grad(model_loss)(jnp.asarray(w), jnp.asarray(x), jnp.asarray(targets))

    def psum_body(w, x, t):
        share, metrics = D.shard_cggr_loss(x @ w, t, step, axis_name="data", **cfg)
        return jax.lax.psum(share, "data"), metrics

    def psum_loss(w, x, t):
        return jax.shard_map(psum_body, mesh=ctx.mesh, in_specs=(P(), P("data"), P("data")),
                             out_specs=(P(), P()))(w, x, t)

    (loss, metrics), gw = jax.jit(jax.value_and_grad(psum_loss, has_aux=True))(
        jnp.asarray(w), ctx.put(x), ctx.put(targets))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ref_gw), rtol=1e-4, atol=1e-6)

    def ddp_body(w, x, t):
        def share_times_w(w):
            share, _ = D.shard_cggr_loss(x @ w, t, step, axis_name="data", **cfg)
            return share * jax.lax.axis_size("data")
        g = jax.grad(share_times_w)(w)
        return jax.lax.pmean(g, "data")

    ddp = jax.shard_map(ddp_body, mesh=ctx.mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(),
                        check_vma=False)
    gw_ddp = jax.jit(ddp)(jnp.asarray(w), ctx.put(x), ctx.put(targets))
    np.testing.assert_allclose(np.asarray(gw_ddp), np.asarray(ref_gw), rtol=1e-4, atol=1e-6)


def case_only_difficulties_move(ctx: Ctx) -> None:
    """The compiled global-scope loss + gradient exchanges O(N) values, never the (N, V) logits."""
    import re

    B, T, V = ctx.W * 2, 8, 257
    logits, targets = _batch(95, (B, T), V=V)
    vg = _dp_value_and_grad(ctx, "global", dict(warmup_steps=4, selection="stratified"))
    hlo = vg.lower(ctx.put(logits), ctx.put(targets), 2).compile().as_text()
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                      r"(-start)?\(", line)
        if m:
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1)):
                sizes.append(int(np.prod([int(s) for s in dims.split(",") if s])) if dims else 1)
    assert sizes, "no collective found in the compiled global-scope loss"
    assert max(sizes) <= B * T, f"a collective moves {max(sizes)} elements (> {B * T} tokens): {sorted(sizes)}"


def case_parameter_gradients(ctx: Ctx) -> None:
    """A replicated weight under jit with a sharded batch: DistributedCGGRLoss (global) gives the
    single-device parameter gradient on the whole batch; errors are ValueErrors."""
    import jax
    import jax.numpy as jnp

    import cggr_jax
    from cggr_jax import distributed as D

    V, step = 12, 6
    rng = np.random.default_rng(100)
    x = rng.standard_normal((ctx.W * 3, 5, 4)).astype(np.float32)
    w = (rng.standard_normal((4, V)) * 2).astype(np.float32)
    _, targets = _batch(101, (ctx.W * 3, 5), V=V)
    loss_fn = D.DistributedCGGRLoss(mesh=ctx.mesh, axis_name="data", warmup_steps=10, selection="topk")
    assert hash(loss_fn) == hash(D.DistributedCGGRLoss(mesh=ctx.mesh, axis_name="data", warmup_steps=10,
                                                        selection="topk"))
    plain = cggr_jax.CGGRLoss(warmup_steps=10, selection="topk")

    def dp(w, x, t):
        return loss_fn(x @ w, t, step)

    def single(w, x, t):
        return plain(x @ w, t, step)

    (l_dp, m_dp), g_dp = jax.jit(jax.value_and_grad(dp, has_aux=True))(jnp.asarray(w), ctx.put(x), ctx.put(targets))
    (l_1, m_1), g_1 = jax.value_and_grad(single, has_aux=True)(jnp.asarray(w), jnp.asarray(x), jnp.asarray(targets))
    np.testing.assert_allclose(float(l_dp), float(l_1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_dp), np.asarray(g_1), rtol=1e-4, atol=1e-6)
    assert int(m_dp["tokens_selected"]) == int(m_1["tokens_selected"])

    def raises(fn: Callable[[], object], match: str) -> None:
        try:
            fn()
        except ValueError as exc:
            assert match in str(exc), (match, str(exc))
        else:
            raise AssertionError(f"no ValueError ({match})")

    lg, tg = jnp.zeros((6, 3, 5)), jnp.zeros((6, 3), jnp.int32)
    raises(lambda: D.cggr_loss(lg, tg, 0, mesh=ctx.mesh), "divisible")
    raises(lambda: D.cggr_loss(lg[:4], tg[:4], 0, mesh=ctx.mesh, scope="world"), "scope")
    raises(lambda: D.cggr_loss(lg[:4], tg[:4], 0, mesh=ctx.mesh, axis_name="batch"), "axis_name")
    raises(lambda: D.cggr_loss(lg[:4], tg[:4, :2], 0, mesh=ctx.mesh), "targets")
    raises(lambda: D.cggr_loss(lg[:4], tg[:4] + 9, 0, mesh=ctx.mesh), "targets")
    raises(lambda: D.DistributedCGGRLoss(mesh=None), "mesh")
    raises(lambda: D.DistributedCGGRLoss(mesh=ctx.mesh, scope="both"), "scope")
    raises(lambda: D.cggr_loss(lg[:4], tg[:4], 0, mesh=ctx.mesh, loss_fn=plain, warmup_steps=3), "loss_fn")


CASES: dict[str, Callable[[Ctx], None]] = {
    "global_strategies": case_global_strategies,
    "global_flat_2d": case_global_flat_2d,
    "global_half_precision": case_global_half_precision,
    "global_nonfinite_and_ignored": case_global_nonfinite_and_ignored,
    "all_ignored": case_all_ignored,
    "plain_jit_is_global": case_plain_jit_is_global,
    "local_scope": case_local_scope,
    "user_shard_map": case_user_shard_map,
    "only_difficulties_move": case_only_difficulties_move,
    "parameter_gradients": case_parameter_gradients,
}


def _subprocess_main() -> None:
    sys.path.insert(0, REPO_ROOT)
    ctx = Ctx()
    report = {}
    for name, case in CASES.items():
        start = time.perf_counter()
        try:
            case(ctx)
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print("CGGR-DP-REPORT " + json.dumps(report), flush=True)


# ============================================================================================ pytest side
_REPORT: dict[str, str] = {}


def _report() -> dict[str, str]:
    if not _REPORT:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CGGR-DP-REPORT ")]
        if proc.returncode != 0 or not lines:
            raise AssertionError(f"the JAX data-parallel subprocess failed (rc {proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        _REPORT.update(json.loads(lines[-1][len("CGGR-DP-REPORT "):]))
    return _REPORT


if __name__ != "__main__":
    import pytest

    pytest.importorskip("jax")

    @pytest.mark.parametrize("case", list(CASES))
    def test_data_parallel_case(case: str) -> None:
        result = _report().get(case, "did not run")
        assert result == "ok", result

if __name__ == "__main__":
    _subprocess_main()
