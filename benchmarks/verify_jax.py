#!/usr/bin/env python
"""GPU correctness of the Pallas kernels (``cggr_jax.kernels``) at real sizes, including N·V > 2^31.

For every case (default: bf16 16384×128256, bf16 16384×131072, fp32 4096×50257, fp16 4096×32000 and bf16
16747×128256 = 2.15·10^9 elements > 2^31, N odd) the logits are made on the device with planted edge rows
(NaN, +∞, only −∞, masked entries, tied maxima in different blocks, the maximum in the ragged last block, a
target whose logit is −∞, ignored targets, logits ~3e38). Every case runs the default launches; the last one
also a multi-row launch (scoring: 4 rows per program, one warp each; backward: 2-row tiles), whose last row
block is ragged (N mod R ≠ 0). For each launch:

1. **scores**: a subset of rows (the planted ones, random ones, the rows around element offset 2^31 and the
   last rows) against the float64 oracle ``tests/oracle.py`` within SPEC §11 (``SCORE_TOL``), with the same
   row finiteness; all rows against the XLA reference ``cggr_jax.scoring.token_statistics_reference``
   within twice the bounds (SPEC §11 parity) and identical finiteness;
2. **selective CE**: loss vs an XLA float32 masked mean; gradient rows of a subset vs the float64 formula
   ``(softmax − onehot)/|S|``; every unselected row exactly zero; no NaN anywhere.

Prints every failed check, one PASS/FAIL line per case and launch (``--verbose``: every check), and exits 1
if any check fails (2 if there is no GPU).

    python benchmarks/verify_jax.py            # on the H200, from the repository root

``--launch R,BV,W`` / ``--backward-launch R,BV,W`` add a scoring / backward launch to check on every case.
``--smoke`` runs small shapes with the kernels interpreted on any backend (checks the script only).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from cggr_jax.kernels import (  # noqa: E402
    PALLAS_GPU_BACKEND,
    Launch,
    selective_cross_entropy_pallas,
    token_statistics_pallas,
)
from benchmarks.harness import compat  # noqa: E402
from tests import oracle  # noqa: E402

IGNORE = -100
FIELDS = ("lse", "entropy", "confidence", "runner_up", "nll")
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
DEFAULT_CASES = ["bf16:16384:128256", "bf16:16384:131072", "fp32:4096:50257", "fp16:4096:32000",
                 "bf16:16747:128256"]
SMOKE_CASES = ["bf16:40:300", "fp32:33:259", "fp16:17:1000"]
#: (scoring, backward) launches: the defaults everywhere; the multi-row pair on the last case.
DEFAULT_LAUNCH = (Launch(), Launch())
MULTI_ROW_LAUNCH = (Launch(block_rows=4, block_v=1024, num_warps=4), Launch(block_rows=2, block_v=4096, num_warps=8))
SMOKE_MULTI_ROW_LAUNCH = (Launch(block_rows=4, block_v=64, num_warps=4), Launch(block_rows=2, block_v=64, num_warps=2))


class Report:
    """Counts checks; prints every FAIL at once and PASS lines only with ``verbose`` (the GPU session shows
    only the last lines of the log), plus one summary line per launch (:meth:`summary`)."""

    def __init__(self, verbose: bool = False) -> None:
        self.failures = 0
        self.verbose = verbose
        self._passed = self._failed = 0
        self._notes: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if not ok or self.verbose:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)
        self.failures += 0 if ok else 1
        self._passed += int(ok)
        self._failed += int(not ok)

    def note(self, text: str) -> None:
        self._notes.append(text)

    def summary(self, label: str) -> None:
        total = self._passed + self._failed
        status = "PASS" if self._failed == 0 else "FAIL"
        print(f"  {status} {label}: {self._passed}/{total} checks" + (f"; {'; '.join(self._notes)}" if self._notes
                                                                       else ""), flush=True)
        self._passed = self._failed = 0
        self._notes = []


def version_notes() -> list[str]:
    """Explicit handling of the JAX versions the project supports (0.10.x CPU image, 0.11.x GPU image)."""
    from jax.experimental.pallas import triton as plt

    notes = [f"jax {jax.__version__}, backend {jax.default_backend()}, Pallas GPU lowering: {PALLAS_GPU_BACKEND}"]
    if getattr(plt, "CompilerParams", None) is None or getattr(plt, "load", None) is None:
        notes.append("ERROR: this jax has no Pallas Triton backend (plt.CompilerParams / plt.load); the kernels "
                     "cannot run here — set CGGR_DISABLE_KERNELS=1 to use the XLA reference")
    major_minor = tuple(int(p) for p in jax.__version__.split(".")[:2])
    if major_minor >= (0, 11):
        notes.append("jax >= 0.11 deprecates the Pallas Triton backend (still supported): its lowering warning "
                     "is expected and silenced here")
    return notes


def make_case(dtype: Any, n: int, v: int, seed: int) -> tuple[jax.Array, jax.Array, dict[str, int]]:
    """Device-made N(0, 3²) logits and targets with planted edge rows; returns the row index of each."""
    key = jax.random.PRNGKey(seed)
    chunks = []
    for i, start in enumerate(range(0, n, 4096)):
        rows = min(4096, n - start)
        chunks.append((3.0 * jax.random.normal(jax.random.fold_in(key, i), (rows, v), jnp.float32)).astype(dtype))
    x = jnp.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
    t = jax.random.randint(jax.random.fold_in(key, 10_000), (n,), 0, v, jnp.int32)
    planted = {"nan": 1, "posinf": 2, "all_neginf": 3, "masked": 4, "tie_across_blocks": 5,
               "max_in_last_block": 6, "target_neginf": 7, "ignored": 8, "ignored_nan": 9, "big_offset": 10,
               "huge": 11}
    p = planted
    x = x.at[p["nan"], v // 3].set(jnp.nan)
    x = x.at[p["posinf"], v // 2].set(jnp.inf)
    x = x.at[p["all_neginf"]].set(-jnp.inf)
    x = x.at[p["masked"], ::3].set(-jnp.inf)
    x = x.at[p["tie_across_blocks"], jnp.array([1, v - 2])].set(40.0)
    x = x.at[p["max_in_last_block"], v - 1].set(45.0)
    t = t.at[p["max_in_last_block"]].set(v - 1)
    x = x.at[p["target_neginf"], 11].set(-jnp.inf)
    t = t.at[p["target_neginf"]].set(11)
    t = t.at[p["ignored"]].set(IGNORE)
    x = x.at[p["ignored_nan"], 0].set(jnp.nan)
    t = t.at[p["ignored_nan"]].set(IGNORE)
    x = x.at[p["big_offset"]].add(jnp.asarray(300.0, dtype))
    big = 3.0e38 if dtype != jnp.float16 else 6.0e4  # near the largest finite value of the dtype
    x = x.at[p["huge"], v // 5].set(jnp.asarray(big, dtype))
    t = t.at[p["huge"]].set(v // 5)
    t = t.at[jnp.arange(20, n, 97)].set(IGNORE)  # scattered ignored tokens
    return x, t, planted


def subset_rows(n: int, v: int, planted: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    rows = set(planted.values()) | {0, n - 1, n - 2, n - 3}
    boundary = (2**31) // v  # the row whose elements cross element offset 2^31 (if N·V > 2^31)
    rows |= {r for r in (boundary - 1, boundary, boundary + 1, (2**32) // (2 * v)) if 0 <= r < n}
    rows |= set(rng.choice(n, size=min(n, 24), replace=False).tolist())
    return np.array(sorted(rows))


def check_case(spec: str, rep: Report, *, interpret: bool,
               launches: Sequence[tuple[Launch, Launch]]) -> None:
    name, n_s, v_s = spec.split(":")
    dtype, n, v = DTYPES[name], int(n_s), int(v_s)
    print(f"\n[{spec}] N={n} V={v} {name}: N·V = {n * v:,} elements"
          f"{' (> 2^31)' if n * v > 2**31 else ''}", flush=True)
    x, t, planted = make_case(dtype, n, v, seed=n + v)
    rng = np.random.default_rng(0)
    rows = subset_rows(n, v, planted, rng)
    xs = np.asarray(x[rows].astype(jnp.float32))
    ts = np.asarray(t[rows])
    ref = oracle.token_statistics(xs, ts, IGNORE)
    safe = jnp.where(t == IGNORE, 0, t)
    ref_x = jax.jit(lambda a, b, h: compat.jax_token_statistics_reference(a, b, h))(x, safe, t != IGNORE)
    for scoring_launch, backward_launch in launches:
        tag = (f"scoring {describe(scoring_launch)}, backward {describe(backward_launch)}"
               + ("" if scoring_launch.block_rows in (None, 1) or n % scoring_launch.block_rows == 0
                  else f"; N mod {scoring_launch.block_rows} = {n % scoring_launch.block_rows}"))
        check_launch(rep, x, t, planted, rows, xs, ts, ref, ref_x, name, n, scoring_launch, backward_launch,
                     interpret)
        rep.summary(tag)
    del x, t, ref_x


def describe(launch: Launch) -> str:
    kw = {k: val for k, val in launch.kwargs().items() if val is not None}
    return "default" if not kw else ",".join(f"{k}={val}" for k, val in kw.items())


def check_launch(rep: Report, x: jax.Array, t: jax.Array, planted: dict[str, int], rows: np.ndarray,
                 xs: np.ndarray, ts: np.ndarray, ref: dict[str, np.ndarray], ref_x: Any, name: str, n: int,
                 scoring_launch: Launch, backward_launch: Launch, interpret: bool) -> None:
    # ---------------------------------------------------------------------------------------- 1. scores
    stats = jax.jit(lambda a, b: token_statistics_pallas(a, b, interpret=interpret, **scoring_launch.kwargs()))(
        x, t)
    got = {f: np.asarray(getattr(stats, f)[rows], np.float64) for f in FIELDS}
    finite = np.ones(len(rows), bool)
    for f in FIELDS[:4]:
        finite &= np.isfinite(got[f])
    finite &= np.isfinite(got["nll"]) | (ts == IGNORE)
    rep.check(bool((finite == ref["row_finite"]).all()), "row finiteness == oracle on the subset",
              f"{len(rows)} rows, {int((~ref['row_finite']).sum())} not finite")
    ok = ref["row_finite"]
    for f in FIELDS:
        atol, rtol = oracle.SCORE_TOL[f]
        err = np.abs(got[f][ok] - ref[f][ok])
        bound = atol + rtol * np.abs(ref[f][ok])
        worst = float((err / bound).max()) if err.size else 0.0
        rep.check(bool((err <= bound).all()), f"{f} vs float64 oracle within SCORE_TOL",
                  f"max err/bound = {worst:.3f}, max abs err = {float(err.max()) if err.size else 0:.2e}")
    ties = planted["tie_across_blocks"]
    i = int(np.nonzero(rows == ties)[0][0])
    rep.check(got["runner_up"][i] == got["confidence"][i], "tied maxima in different blocks: p2 == p1")

    @jax.jit
    def compare(k_stats, r_stats, has_t):
        k_fin = jnp.ones(has_t.shape, bool)
        r_fin = jnp.ones(has_t.shape, bool)
        for a, b in zip(k_stats[:4], r_stats[:4]):
            k_fin &= jnp.isfinite(a)
            r_fin &= jnp.isfinite(b)
        k_fin &= jnp.isfinite(k_stats.nll) | ~has_t
        r_fin &= jnp.isfinite(r_stats.nll) | ~has_t
        both = k_fin & r_fin
        worst = []
        for f, a, b in zip(FIELDS, k_stats, r_stats):
            atol, rtol = oracle.SCORE_TOL[f]
            ratio = jnp.abs(a - b) / (2 * atol + 2 * rtol * jnp.abs(b))
            worst.append(jnp.max(jnp.where(both, ratio, 0.0)))
        return jnp.sum(k_fin != r_fin), jnp.stack(worst)

    n_diff, worst = compare(stats, ref_x, t != IGNORE)
    rep.check(int(n_diff) == 0, "all rows: finiteness == XLA reference", f"{int(n_diff)} rows differ")
    worst = np.asarray(worst)
    rep.check(bool((worst <= 1.0).all()), "all rows: kernel vs XLA reference within 2×SCORE_TOL",
              ", ".join(f"{f} {w:.3f}" for f, w in zip(FIELDS, worst)))
    rep.note(f"scores vs XLA ref: worst err/(2·bound) {float(worst.max()):.3f}")

    # ---------------------------------------------------------------------------------- 2. selective CE
    sel_key = jax.random.PRNGKey(n * 7 + x.shape[1])
    mask = jax.random.uniform(sel_key, (n,)) < 0.25
    has_t = (t != IGNORE)
    finite_all = jnp.isfinite(stats.lse) & jnp.isfinite(stats.entropy) & jnp.isfinite(stats.nll)
    mask = mask & has_t & finite_all
    mask = mask.at[planted["max_in_last_block"]].set(True).at[n - 1].set(bool(has_t[n - 1]))
    loss, grad = jax.jit(jax.value_and_grad(lambda a: selective_cross_entropy_pallas(
        a, t, mask, interpret=interpret, scoring_launch=scoring_launch, **backward_launch.kwargs())))(x)

    @jax.jit
    def xla_loss(a, b, m):
        z = jnp.where(m[:, None], a.astype(jnp.float32), 0.0)
        lse = jax.nn.logsumexp(z, axis=-1)
        zt = jnp.take_along_axis(z, jnp.where(m, b, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(m, lse - zt, 0.0)) / jnp.maximum(jnp.sum(m), 1)

    ref_loss = float(xla_loss(x, t, mask))
    rep.check(abs(float(loss) - ref_loss) <= 1e-5 + 1e-5 * abs(ref_loss), "loss vs XLA float32 masked mean",
              f"{float(loss):.7f} vs {ref_loss:.7f}")
    zero_ok, nan_free = jax.jit(lambda g, m: (
        jnp.all(jnp.where(m[:, None], True, g == 0)), jnp.all(~jnp.isnan(g))))(grad, mask)
    rep.check(bool(zero_ok), "unselected gradient rows exactly zero")
    rep.check(bool(nan_free), "no NaN in the gradient")
    count = int(jnp.sum(mask))
    msk = np.asarray(mask[rows])
    g_rows = np.asarray(grad[rows].astype(jnp.float32), np.float64)
    worst_g, max_err = 0.0, 0.0
    gtol = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 8e-3}[name]
    for j, _ in enumerate(rows):
        if not msk[j]:
            continue
        z = xs[j].astype(np.float64)
        m = z.max()
        lse = m + np.log(np.exp(z - m).sum())
        p = np.exp(z - lse)
        p[ts[j]] -= 1.0
        gr = p / count
        err = np.abs(g_rows[j] - gr)
        worst_g = max(worst_g, float((err / (1e-5 / count + 1e-6 + gtol * np.abs(gr))).max()))
        max_err = max(max_err, float(err.max()))
    rep.check(worst_g <= 1.0, "selected gradient rows vs float64 (softmax − onehot)/|S|",
              f"{int(msk.sum())} rows checked (incl. row N-1), |S| = {count}, max abs err {max_err:.2e}, "
              f"err/bound {worst_g:.3f}")
    rep.note(f"grad rows err/bound {worst_g:.3f}")
    del stats, grad


def parse_launch(text: Optional[str], name: str) -> Optional[Launch]:
    if text is None:
        return None
    try:
        r, bv, w = (int(p) for p in text.split(","))
    except ValueError as err:
        raise SystemExit(f"{name}: expected BLOCK_ROWS,BLOCK_V,NUM_WARPS (e.g. 4,1024,4), got {text!r}") from err
    return Launch(block_rows=r, block_v=bv, num_warps=w)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None, help="dtype:N:V entries (default: the real sizes)")
    ap.add_argument("--launch", default=None, help="extra scoring launch R,BV,W checked on every case")
    ap.add_argument("--backward-launch", default=None, help="extra backward launch R,BV,W (with --launch)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, kernels interpreted (script check)")
    ap.add_argument("--verbose", action="store_true", help="print every check, not only the failures")
    args = ap.parse_args(argv)
    for line in version_notes():
        print(line)
    if any(line.startswith("ERROR") for line in version_notes()):
        print("FAIL")
        return 1
    if not args.smoke and jax.default_backend() != "gpu":
        print(f"FAIL: needs a GPU backend, got {jax.default_backend()!r} (use --smoke for a CPU script check)")
        return 2
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")
    cases = args.cases or (SMOKE_CASES if args.smoke else DEFAULT_CASES)
    default = (Launch(block_v=64), Launch(block_v=64)) if args.smoke else DEFAULT_LAUNCH
    multi = SMOKE_MULTI_ROW_LAUNCH if args.smoke else MULTI_ROW_LAUNCH
    extra = parse_launch(args.launch, "--launch"), parse_launch(args.backward_launch, "--backward-launch")
    rep = Report(args.verbose)
    for i, spec in enumerate(cases):
        launches = [default]
        if i == len(cases) - 1 and args.cases is None:
            launches.append(multi)
        if extra[0] is not None or extra[1] is not None:
            launches.append((extra[0] or Launch(), extra[1] or Launch()))
        try:
            check_case(spec, rep, interpret=args.smoke, launches=launches)
        except Exception as err:  # a crash is a failed check of this case; keep checking the others
            rep.check(False, f"[{spec}] ran without error", f"{type(err).__name__}: {err}"[:500])
            rep.summary(f"[{spec}] crashed")
    print(f"\n{'PASS' if rep.failures == 0 else 'FAIL'}: {rep.failures} failed check(s)")
    return 0 if rep.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
