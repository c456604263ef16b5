#!/usr/bin/env python
"""Data-parallel CGGR in JAX on several GPUs of one host (SPEC §13): correctness, then throughput.

One process sees ``--devices`` GPUs; the batch axis is sharded over a mesh axis ``"data"`` with
``NamedSharding`` (``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are forced; XLA's GPU
collectives use NCCL).

Correctness (PASS/FAIL):

1. ``global_<strategy>_<dtype>``: ``cggr_jax.distributed.cggr_loss(scope="global")`` (``shard_map``; only
   difficulties are exchanged) on sharded ``(B, T, V)`` logits = the plain loss on one GPU on the
   concatenated batch: loss, ∂loss/∂logits, metrics, identical selected tokens (a different selection is only
   accepted when the float32 ratios differ, SPEC §11 level 3).
2. ``plain_jit_sharded``: the plain ``cggr_jax.cggr_loss`` under ``jit`` on the sharded arrays equals the
   one-GPU result (``jit`` semantics); the largest collective of each compiled variant is reported, to show
   whether XLA moves logits for the plain loss (the shard_map variant must move at most one value per token).
3. ``local_scope``: ``scope="local"`` = the mean of the shards' own CGGR losses.
4. ``param_grads``: a small ``cggr_jax.models.DecoderLM`` with replicated parameters and a sharded batch:
   parameter gradients with ``DistributedCGGRLoss`` (global) = one GPU on the whole batch.

Throughput (tokens/s of jitted AdamW training steps of a ``DecoderLM``, bf16 compute, per-device batch fixed):
one GPU with ``CGGRLoss``; ``W`` GPUs with ``DistributedCGGRLoss`` global and local, with the plain loss under
``jit`` (XLA's partitioning), and plain cross-entropy on 1 and ``W`` GPUs; plus the loss alone (forward and
backward on fixed logits). Scaling efficiency = tokens/s(W) / (W · tokens/s(1)).

    python benchmarks/verify_dp_jax.py            # 2 GPUs; writes $OUT/dp_check_jax.json if $OUT is set
    python benchmarks/verify_dp_jax.py --smoke    # CPU, 2 forced host devices, tiny shapes (checks the script)

Exit status: 0 when every check passes, 1 otherwise, 2 when there are fewer GPUs than ``--devices``.
"""
from __future__ import annotations

import os
import sys

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--smoke" in sys.argv:  # must precede the first JAX import
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import cggr_jax  # noqa: E402
from cggr_jax import distributed as D  # noqa: E402
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402

STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")


class Report:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception:
            ok, detail = False, traceback.format_exc()
        self.results[name] = {"ok": bool(ok), "detail": detail}
        print(f"  {'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def _rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if b.size else 0.0


def _max_collective(compiled_text: str) -> int:
    """The largest element count among the collectives of a compiled HLO module (0 if there is none)."""
    best = 0
    for line in compiled_text.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                      r"(-start)?\(", line)
        if m:
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1)):
                best = max(best, int(np.prod([int(s) for s in dims.split(",") if s])) if dims else 1)
    return best


def _logits_batch(args, W: int, seed: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    B, T, V = args.check_batch * W, args.check_seq, args.vocab
    temps = rng.uniform(0.3, 3.0, size=(B, T, 1)).astype(np.float32)
    x = (rng.standard_normal((B, T, V), dtype=np.float32) * 2.0 / temps)
    t = rng.integers(0, V, size=(B, T)).astype(np.int32)
    t[rng.random((B, T)) < 0.15] = -100
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32)), t


def check_global(args, mesh: Mesh, selection: str, dtype: Any) -> tuple[bool, str]:
    W = mesh.shape["data"]
    sh = NamedSharding(mesh, P("data"))
    x, t = _logits_batch(args, W, 3 + STRATEGIES.index(selection), dtype)
    cfg = dict(selection=selection, warmup_steps=100, num_strata=3, min_tokens_per_sequence=2)
    step = 60

    def dp(lg, tg):
        return D.cggr_loss(lg, tg, step, mesh=mesh, scope="global", **cfg)

    def single(lg, tg):
        return cggr_jax.cggr_loss(lg, tg, step, **cfg)

    (l_dp, m_dp), g_dp = jax.jit(jax.value_and_grad(dp, has_aux=True))(
        jax.device_put(jnp.asarray(x).astype(dtype), sh), jax.device_put(t, sh))
    dev0 = mesh.devices.flat[0]
    (l_1, m_1), g_1 = jax.jit(jax.value_and_grad(single, has_aux=True))(
        jax.device_put(jnp.asarray(x).astype(dtype), dev0), jax.device_put(t, dev0))
    g_dp, g_1 = np.asarray(g_dp.astype(jnp.float32)), np.asarray(g_1.astype(jnp.float32))
    sel_dp, sel_1 = np.abs(g_dp).sum(-1) > 0, np.abs(g_1).sum(-1) > 0
    same_ratio = float(m_dp["effective_ratio"]) == float(m_1["effective_ratio"])
    detail = (f"{jnp.dtype(dtype).name}: k={int(m_dp['tokens_selected'])}/{int(m_dp['tokens_total'])}, ratio "
              f"dp={float(m_dp['effective_ratio']):.9g} one={float(m_1['effective_ratio']):.9g}, loss err "
              f"{abs(float(l_dp) - float(l_1)):.2e}, grad rel err {_rel_err(g_dp, g_1):.2e}")
    if not np.array_equal(sel_dp, sel_1):
        if same_ratio:
            return False, "selection differs at an identical ratio; " + detail
        return True, "selection differs only through a ulp-different ratio (SPEC §11 level 3); " + detail
    tol = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    counts_ok = all(int(m_dp[k]) == int(m_1[k]) for k in ("tokens_selected", "tokens_total", "tokens_nonfinite"))
    ok = abs(float(l_dp) - float(l_1)) <= 1e-5 + 1e-4 * abs(float(l_1)) and _rel_err(g_dp, g_1) <= tol and counts_ok
    return ok, detail


def check_plain_jit(args, mesh: Mesh) -> tuple[bool, str]:
    W = mesh.shape["data"]
    sh = NamedSharding(mesh, P("data"))
    x, t = _logits_batch(args, W, 21, jnp.float32)
    cfg = dict(warmup_steps=100)

    def plain(lg, tg):
        return cggr_jax.cggr_loss(lg, tg, 50, **cfg)

    def dp(lg, tg):
        return D.cggr_loss(lg, tg, 50, mesh=mesh, **cfg)

    xs, ts = jax.device_put(x, sh), jax.device_put(t, sh)
    f_plain = jax.jit(jax.value_and_grad(plain, has_aux=True))
    f_dp = jax.jit(jax.value_and_grad(dp, has_aux=True))
    (l_sh, _), g_sh = f_plain(xs, ts)
    dev0 = mesh.devices.flat[0]
    (l_1, _), g_1 = f_plain(jax.device_put(x, dev0), jax.device_put(t, dev0))
    big_plain = _max_collective(f_plain.lower(xs, ts).compile().as_text())
    big_dp = _max_collective(f_dp.lower(xs, ts).compile().as_text())
    n_tokens = t.size
    ok = abs(float(l_sh) - float(l_1)) <= 1e-5 * abs(float(l_1)) + 1e-6 and _rel_err(g_sh, g_1) <= 1e-4 \
        and big_dp <= n_tokens
    return ok, (f"plain jit on sharded arrays: loss err {abs(float(l_sh) - float(l_1)):.2e}; largest collective: "
                f"plain {big_plain} elements, shard_map {big_dp} (tokens {n_tokens}, logits {x.size})")


def check_local(args, mesh: Mesh) -> tuple[bool, str]:
    W = mesh.shape["data"]
    sh = NamedSharding(mesh, P("data"))
    x, t = _logits_batch(args, W, 31, jnp.float32)
    cfg = dict(warmup_steps=20)
    loss, _ = jax.jit(lambda a, b: D.cggr_loss(a, b, 7, mesh=mesh, scope="local", **cfg))(
        jax.device_put(x, sh), jax.device_put(t, sh))
    ref = np.mean([float(cggr_jax.cggr_loss(a, b, 7, **cfg)[0]) for a, b in zip(np.split(x, W), np.split(t, W))])
    return abs(float(loss) - ref) <= 1e-5 * abs(ref) + 1e-6, f"local {float(loss):.6f} vs mean of shards {ref:.6f}"


def _model(args, seed: int = 0) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=args.vocab, d_model=args.width, num_layers=args.layers,
                        num_heads=max(1, args.width // 64), max_seq_len=args.seq,
                        dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def check_param_grads(args, mesh: Mesh) -> tuple[bool, str]:
    W = mesh.shape["data"]
    model = _model(argparse.Namespace(**{**vars(args), "bf16": False, "seq": args.check_seq}))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(41)
    ids = rng.integers(0, args.vocab, size=(args.check_batch * W, args.check_seq)).astype(np.int32)
    labels = ids.copy()
    labels[:, -2:] = -100
    dp_loss = D.DistributedCGGRLoss(mesh=mesh, warmup_steps=40)
    plain = cggr_jax.CGGRLoss(warmup_steps=40)

    def loss_of(fn):
        def f(p, i, lb):
            lg, tg = cggr_jax.shift_for_causal_lm(nnx.merge(graphdef, p)(i), lb)
            return fn(lg, tg, 20)
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    (l_dp, m_dp), g_dp = loss_of(dp_loss)(jax.device_put(params, rep), jax.device_put(ids, sh),
                                          jax.device_put(labels, sh))
    dev0 = mesh.devices.flat[0]
    (l_1, m_1), g_1 = loss_of(plain)(jax.device_put(params, dev0), jax.device_put(ids, dev0),
                                     jax.device_put(labels, dev0))
    errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(_rel_err, g_dp, g_1))
    worst = max(errs)
    same_k = int(m_dp["tokens_selected"]) == int(m_1["tokens_selected"])
    ok = same_k and worst <= 2e-3 and abs(float(l_dp) - float(l_1)) <= 1e-4
    return ok, (f"{len(errs)} parameter arrays, worst rel err {worst:.2e}, loss {float(l_dp):.6f} vs "
                f"{float(l_1):.6f}, k={int(m_dp['tokens_selected'])} vs {int(m_1['tokens_selected'])}")


# -------------------------------------------------------------------------------------------- throughput
def _train_tps(args, mesh: Mesh, kind: str) -> float:
    """Tokens/s of AdamW steps on a DecoderLM; the batch is ``args.batch`` sequences per device of ``mesh``."""
    W = mesh.shape["data"]
    model = _model(args)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)
    sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, rep)
    opt_state = jax.device_put(tx.init(params), rep)
    if kind in ("global", "local"):
        loss_fn: Any = D.DistributedCGGRLoss(mesh=mesh, scope=kind, warmup_steps=10)
    elif kind == "plain":
        loss_fn = cggr_jax.CGGRLoss(warmup_steps=10)
    else:
        loss_fn = None

    def compute(p, ids, step):
        lg, tg = cggr_jax.shift_for_causal_lm(nnx.merge(graphdef, p)(ids), ids)
        if loss_fn is None:
            return optax.softmax_cross_entropy_with_integer_labels(lg, tg).mean()
        return loss_fn(lg, tg, step)[0]

    @jax.jit
    def train_step(p, o, ids, step):
        loss, g = jax.value_and_grad(compute)(p, ids, step)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, args.vocab, size=(args.batch * W, args.seq)).astype(np.int32), sh)
    step = jnp.int32(0)
    for _ in range(args.warmup):
        params, opt_state, loss = train_step(params, opt_state, ids, step)
        step = step + 1
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, ids, step)
        step = step + 1
    jax.block_until_ready((params, loss))
    return args.batch * W * (args.seq - 1) * args.steps / (time.perf_counter() - t0)


def _loss_only_ms(args, mesh: Mesh, kind: str) -> float:
    W = mesh.shape["data"]
    sh = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(1)
    x = jax.device_put(jnp.asarray(rng.standard_normal((args.batch * W, args.seq, args.vocab), np.float32))
                       .astype(jnp.bfloat16), sh)
    t = jax.device_put(rng.integers(0, args.vocab, size=(args.batch * W, args.seq)).astype(np.int32), sh)
    if kind == "plain":
        f = jax.jit(jax.grad(lambda a, b: cggr_jax.cggr_loss(a, b, 5, warmup_steps=10)[0]))
    else:
        f = jax.jit(jax.grad(lambda a, b: D.cggr_loss(a, b, 5, mesh=mesh, scope=kind, warmup_steps=10)[0]))
    for _ in range(args.warmup):
        out = f(x, t)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = f(x, t)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / args.steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="sequences per device in the throughput runs")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--check-batch", type=int, default=4, dest="check_batch")
    p.add_argument("--check-seq", type=int, default=128, dest="check_seq")
    p.add_argument("--skip-perf", action="store_true", dest="skip_perf")
    p.add_argument("--smoke", action="store_true", help="CPU with 2 forced host devices, tiny shapes")
    p.add_argument("--out", default=None, help="JSON report (default: $OUT/dp_check_jax.json when $OUT is set)")
    args = p.parse_args(argv)
    args.bf16 = not args.smoke
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq, args.vocab = 2, 1, 2, 16, 64
        args.width, args.layers, args.check_batch, args.check_seq = 64, 2, 2, 12
        devices = jax.devices()[:args.devices]
    else:
        devices = [d for d in jax.devices() if d.platform == "gpu"][:args.devices]
        if len(devices) < args.devices:
            print(f"needs {args.devices} GPUs, found {len(devices)}")
            return 2
    print(f"jax {jax.__version__}, devices {devices}; NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}", flush=True)
    mesh = Mesh(np.array(devices), ("data",))
    one = Mesh(np.array(devices[:1]), ("data",))
    report = Report()
    for sel in STRATEGIES:
        for dtype in (jnp.float32, jnp.bfloat16):
            report.run(f"global_{sel}_{jnp.dtype(dtype).name}",
                       lambda sel=sel, dtype=dtype: check_global(args, mesh, sel, dtype))
    report.run("plain_jit_sharded", lambda: check_plain_jit(args, mesh))
    report.run("local_scope", lambda: check_local(args, mesh))
    report.run("param_grads", lambda: check_param_grads(args, mesh))

    perf: dict[str, float] = {}
    if not args.skip_perf:
        W = len(devices)
        for kind in ("plain", "ce"):
            perf[f"train_tokens_per_s_1gpu_{kind}"] = _train_tps(args, one, kind)
        for kind in ("global", "local", "plain", "ce"):
            perf[f"train_tokens_per_s_{W}gpu_{kind}"] = _train_tps(args, mesh, kind)
        perf["loss_ms_1gpu"] = _loss_only_ms(args, one, "plain")
        for kind in ("global", "local", "plain"):
            perf[f"loss_ms_{W}gpu_{kind}"] = _loss_only_ms(args, mesh, kind)
        base = perf["train_tokens_per_s_1gpu_plain"]
        for kind in ("global", "local", "plain"):
            perf[f"scaling_efficiency_{kind}"] = perf[f"train_tokens_per_s_{W}gpu_{kind}"] / (W * base)
        for k, v in perf.items():
            print(f"  {k:>40}: {v:,.3f}", flush=True)

    failed = sorted(name for name, res in report.results.items() if not res["ok"])
    summary = {"devices": [str(d) for d in devices], "jax": jax.__version__, "smoke": args.smoke,
               "failed": failed, "checks": report.results, "perf": perf, "args": vars(args)}
    out = args.out or (os.path.join(os.environ["OUT"], "dp_check_jax.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"report written to {out}")
    n = len(report.results)
    print(f"{'FAIL' if failed else 'PASS'}: {n - len(failed)}/{n} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
