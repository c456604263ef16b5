#!/usr/bin/env python
"""GPU correctness check of the ``cggr_torch`` Triton kernels at real sizes (run on the H200).

Prints one ``PASS``/``FAIL`` line per check and exits non-zero when any check fails. Checks:

1. scoring (``token_statistics_triton`` / ``score_tokens_triton``) at N = 16384, V = 128256 bf16 (and fp16,
   fp32 at fewer rows, and V = 131072) against the float64 oracle ``tests/oracle.py`` on a sample of rows
   that includes crafted edge rows (equal maxima 128k columns apart, a max in the ragged last block, ``−∞``
   blocks, NaN / ``+∞`` / all ``−∞`` rows, a ``−∞`` target logit, ignored targets, large offsets), within
   SPEC §11 (``SCORE_TOL``); outputs are written into NaN / sentinel-poisoned buffers;
2. the in-kernel difficulty is bit-identical to ``difficulty_from_statistics`` of the kernel's statistics and
   eligibility equals the oracle's; ``cggr_torch.scoring.token_statistics`` (the dispatcher) agrees;
3. selective cross-entropy at N = 16384, V = 128256 bf16, ratio 0.25 (``select_tokens`` on kernel scores):
   loss within 1e-5 + 1e-4·|loss| of a float64 reference, gradient rows (selected and not) against the float64
   gradient, unselected rows exactly 0, with and without ``lse``, with and without ``inplace_backward``,
   the backward into a NaN-poisoned buffer;
4. no host synchronisation in scoring → selection → selective CE forward and backward
   (``torch.cuda.set_sync_debug_mode('error')``);
5. N·V > 2^31: N = 17000, V = 128256 bf16 - scoring and the selective CE gradient on rows around the 2^31
   element boundary and the last rows;
6. an out-of-range target trips the device-side assertion (in a subprocess: it poisons the CUDA context).

Run from the repository root on a GPU machine (``TRITON_INTERPRET`` unset)::

    python benchmarks/gpu_check_torch.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOKE = "--smoke" in sys.argv[1:]
if SMOKE:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if SMOKE else "cuda"

import numpy as np  # noqa: E402
import torch  # noqa: E402

FAILURES: list[str] = []
STAT_KEYS = ("lse", "entropy", "confidence", "runner_up", "nll")
IGN = -100


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV == "cuda":
        empty_cache()


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""), flush=True)
    if not ok:
        FAILURES.append(name)


def within(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[bool, float]:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    worst = float(np.max(excess)) if excess.size else -1.0
    return bool(np.all(excess <= 0)), worst


def make_logits(n: int, v: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, 3²) logits built in row chunks on the GPU, plus crafted edge rows 0-11 and random targets."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.empty((n, v), dtype=dtype, device=DEV)
    for s in range(0, n, 2048):
        x[s:s + 2048] = (3.0 * torch.randn((min(2048, n - s), v), generator=g, device=DEV)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device=DEV)
    inf = float("inf")
    x[0, 5] = x[0, v - 7] = 30.0                      # equal maxima far apart → p2 = p1
    x[1, v - 1] = 25.0                                # max in the ragged last block
    x[2, : v // 2] = -inf                             # −∞ half row, max in the second half
    t[2] = v - 3
    x[3].fill_(-inf)                                  # only −∞: not finite
    x[4, v // 3] = float("nan")                       # NaN: not finite
    x[5, 17] = inf                                    # +∞: not finite
    t[6] = 9
    x[6, 9] = -inf                                    # target logit −∞: nll = +∞
    t[7] = IGN                                        # ignored
    x[8] += 200.0                                     # large offsets (bf16 spacing 1 at 200: exact values)
    x[9] -= 200.0
    x[10].fill_(-inf)
    x[10, v - 2] = 1.0                                # one finite entry in the last block: p2 = 0, H = 0
    t[10] = v - 2
    x[11, 100] = x[11, 200] = 12.0                    # runner-up tie below a unique max
    x[11, v - 5] = 14.0
    return x, t


def sample_rows(n: int, extra: Sequence[int] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    rnd = torch.randint(12, n, (40,), generator=g).tolist()
    rows = sorted(set(list(range(12)) + rnd + [n - 3, n - 2, n - 1] + [r for r in extra if 0 <= r < n]))
    return torch.tensor(rows, dtype=torch.long)


def check_scoring(label: str, n: int, v: int, dtype: torch.dtype, extra_rows: Sequence[int] = ()) -> None:
    from tests import oracle
    from cggr_torch.kernels import scoring as ks
    from cggr_torch.scoring import difficulty_from_statistics

    x, t = make_logits(n, v, dtype, seed=n + v)
    rows = sample_rows(n, extra_rows)
    rows_d = rows.to(DEV)
    xs = x[rows_d].to(torch.float64).cpu().numpy()
    ts = t[rows_d].cpu().numpy()
    ref = oracle.score_tokens(xs, ts, "combined", IGN)
    rf = ref["stats"]["row_finite"]

    # poisoned buffers, launched directly
    geom = ks.row_geometry(x)
    out = torch.full((6, n), float("nan"), dtype=torch.float32, device=DEV)
    fin = torch.full((n,), 7, dtype=torch.int8, device=DEV)
    ks.launch_scoring(geom, ks.flat_targets(t), IGN, ks._MODE_CODE["combined"], out, fin)
    sync()
    fin_all = fin.cpu()
    report(f"{label}: finite flags written for every row (no sentinel left)",
           bool(((fin_all == 0) | (fin_all == 1)).all()))
    report(f"{label}: crafted non-finite rows flagged", fin_all[[3, 4, 5, 6]].tolist() == [0, 0, 0, 0]
           and int(fin_all.sum()) == n - 4, f"{int(fin_all.sum())} finite of {n}")
    outs = out[:, rows_d].cpu().numpy()
    report(f"{label}: finite flags = oracle row_finite on sampled rows",
           np.array_equal(fin_all[rows].numpy().astype(bool), rf))
    report(f"{label}: no NaN left in finite rows", not bool(torch.isnan(out[:, fin.bool()]).any()))
    for j, k in enumerate(STAT_KEYS):
        ok, worst = within(outs[j][rf], ref["stats"][k][rf], *oracle.SCORE_TOL[k])
        report(f"{label}: {k} within SCORE_TOL", ok, f"worst excess {worst:.2e}")
    ok, worst = within(outs[5][ref["eligible"]], ref["difficulty"][ref["eligible"]], *oracle.SCORE_TOL["difficulty"])
    report(f"{label}: combined difficulty within SCORE_TOL", ok, f"worst excess {worst:.2e}")
    report(f"{label}: ties: runner_up == confidence on equal maxima", bool(out[3, 0] == out[2, 0]))

    st = ks.token_statistics_triton(x, t, IGN)
    same = all(torch.equal(torch.nan_to_num(getattr(st, k), nan=7.0), torch.nan_to_num(out[j], nan=7.0))
               for j, k in enumerate(STAT_KEYS))
    report(f"{label}: token_statistics_triton == launch_scoring (deterministic)", same)
    sc = ks.score_tokens_triton(x, t, scoring="combined", ignore_index=IGN)
    d_ref = difficulty_from_statistics(sc.stats, "combined", has_targets=True)
    report(f"{label}: in-kernel difficulty bit-identical to difficulty_from_statistics",
           bool(torch.equal(torch.nan_to_num(sc.difficulty, nan=7.0), torch.nan_to_num(d_ref, nan=7.0))))
    report(f"{label}: eligibility = oracle on sampled rows",
           np.array_equal(sc.eligible[rows_d].cpu().numpy(), ref["eligible"]))
    del x, t, out, fin, st, sc
    empty_cache()


def check_dispatch() -> None:
    from tests import oracle
    from cggr_torch.kernels.scoring import token_statistics_triton
    from cggr_torch.scoring import token_statistics, token_statistics_reference

    x, t = make_logits(2048, 128256, torch.bfloat16, seed=3)
    a = token_statistics(x, t, ignore_index=IGN)
    k = token_statistics_triton(x, t, IGN)
    r = token_statistics_reference(x, t, ignore_index=IGN)
    uses_kernel = all(torch.equal(torch.nan_to_num(getattr(a, f), nan=7.0), torch.nan_to_num(getattr(k, f), nan=7.0))
                      for f in STAT_KEYS)
    print(f"INFO  cggr_torch.scoring.token_statistics on CUDA {'uses' if uses_kernel else 'does NOT use'} the kernel")
    fin = torch.ones(2048, dtype=torch.bool, device=DEV)
    for f in STAT_KEYS:
        fin &= torch.isfinite(getattr(k, f)) & torch.isfinite(getattr(r, f))
    for f in STAT_KEYS:
        atol, rtol = oracle.SCORE_TOL[f]
        ok, worst = within(getattr(k, f)[fin].cpu().numpy(), getattr(r, f)[fin].cpu().numpy(), 2 * atol, 2 * rtol)
        report(f"kernel vs torch reference (2× SCORE_TOL): {f}", ok, f"worst excess {worst:.2e}")
    del x, t
    empty_cache()


def reference_ce(x: torch.Tensor, t: torch.Tensor, sel: torch.Tensor, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """float64 loss over the selected rows (chunked) and the float64 gradient·|S| of ``rows``."""
    idx = torch.nonzero(sel).flatten()
    total = torch.zeros((), dtype=torch.float64, device=DEV)
    for s in range(0, idx.numel(), 512):
        r = idx[s:s + 512]
        z = x[r].to(torch.float64)
        total += (torch.logsumexp(z, -1) - z.gather(1, t[r, None])[:, 0]).sum()
    count = max(1, int(idx.numel()))
    z = x[rows].to(torch.float64)
    g = torch.softmax(z, -1)
    t_safe = torch.where(t[rows] >= 0, t[rows], torch.zeros_like(t[rows]))   # ignored rows are zeroed below
    g[torch.arange(rows.numel(), device=DEV), t_safe] -= 1.0
    g = torch.where(sel[rows, None], g, torch.zeros_like(g))
    return float(total) / count, g


def check_selective_ce(label: str, n: int, v: int, dtype: torch.dtype, ratio: float,
                       extra_rows: Sequence[int] = ()) -> None:
    from cggr_torch.kernels import cross_entropy as kce
    from cggr_torch.kernels import scoring as ks
    from cggr_torch.selection import select_tokens

    x, t = make_logits(n, v, dtype, seed=7 * n + v)
    t[torch.arange(0, n, 97, device=DEV)] = IGN
    with torch.no_grad():
        sc = ks.score_tokens_triton(x, t, ignore_index=IGN)
        mask, k = select_tokens(sc.difficulty, sc.eligible, torch.tensor(ratio, device=DEV))
    mask[torch.tensor([r for r in extra_rows if 0 <= r < n], dtype=torch.long, device=DEV)] = True
    mask &= sc.eligible
    sel = mask & (t != IGN)
    count = int(sel.sum())
    rows = sample_rows(n, extra_rows).to(DEV)
    want_loss, want_g = reference_ce(x, t, sel, rows)
    rtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-4}[dtype]
    report(f"{label}: selection size", count > 0 and int(k) > 0, f"k={int(k)}, |S|={count}")
    for lse_name, lse in (("lse=None", None), ("lse=scores", sc.stats.lse)):
        for inplace in (False, True):
            name = f"{label}: {lse_name}, inplace_backward={inplace}"
            leaf = x.clone().requires_grad_(True)
            loss = kce.selective_cross_entropy_triton(leaf, t, mask, ignore_index=IGN, lse=lse,
                                                      inplace_backward=inplace)
            loss.backward()
            got = float(loss.detach())
            report(f"{name}: loss", abs(got - want_loss) <= 1e-5 + 1e-4 * abs(want_loss),
                   f"{got:.7f} vs {want_loss:.7f}")
            g = leaf.grad[rows].to(torch.float64) * count
            ok, worst = within(g.cpu().numpy(), want_g.cpu().numpy(), 1e-5, rtol)
            report(f"{name}: gradient rows (×|S|) vs float64", ok, f"worst excess {worst:.2e}")
            zero_ok = bool((leaf.grad[~sel] == 0).all())
            report(f"{name}: unselected gradient rows exactly 0", zero_ok)
            if inplace:
                report(f"{name}: logits buffer holds the gradient", bool(torch.equal(leaf.detach(), leaf.grad)))
            del leaf, loss
            empty_cache()
    # backward into a poisoned buffer
    geom = ks.row_geometry(x)
    grad = torch.full_like(x, float("nan"))
    scale = torch.full((1,), 1.0 / max(1, count), device=DEV)
    kce.launch_selective_backward(geom, ks.flat_targets(t), sel.to(torch.uint8), sc.stats.lse, scale, grad)
    report(f"{label}: backward writes every element of a NaN-poisoned buffer", not bool(torch.isnan(grad).any()))
    del grad, x, t, sc
    empty_cache()


def check_no_sync() -> None:
    from cggr_torch.kernels.cross_entropy import selective_cross_entropy_triton
    from cggr_torch.kernels.scoring import score_tokens_triton
    from cggr_torch.selection import select_tokens

    x, t = make_logits(4096, 32000, torch.bfloat16, seed=11)
    leaf = x.requires_grad_(True)
    ratio = torch.tensor(0.25, device=DEV)

    def step(inplace: bool) -> None:
        with torch.no_grad():
            sc = score_tokens_triton(leaf.detach(), t, ignore_index=IGN)
            mask, _k = select_tokens(sc.difficulty, sc.eligible, ratio)
        loss = selective_cross_entropy_triton(leaf, t, mask, ignore_index=IGN, lse=sc.stats.lse,
                                              inplace_backward=inplace)
        loss.backward()

    for inplace in (False, True):
        step(inplace)                                   # compile the kernels outside the checked region
        leaf.grad = None
        torch.cuda.synchronize()
        err: Optional[str] = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(inplace)
        except RuntimeError as e:
            err = str(e)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        report(f"no host sync in scoring → selection → selective CE fwd+bwd (inplace={inplace})", err is None,
               (err or "")[:200])
        leaf.grad = None
    del x, leaf
    empty_cache()


def check_device_assert() -> None:
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from cggr_torch.kernels.scoring import token_statistics_triton
        x = torch.randn(8, 1000, device='cuda')
        t = torch.zeros(8, dtype=torch.long, device='cuda'); t[3] = 1000
        st = token_statistics_triton(x, t)          # must not synchronise, must not read t[3]
        torch.cuda.synchronize()                    # the device assertion surfaces here
        print('NO ASSERT')
    """)
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    text = proc.stdout + proc.stderr
    ok = proc.returncode != 0 and "NO ASSERT" not in text and "assert" in text.lower()
    report("out-of-range target trips the device-side assertion (subprocess)", ok,
           text.strip().splitlines()[-1][:200] if text.strip() else f"rc={proc.returncode}")


def smoke() -> int:
    """The same checks on tiny CPU shapes under the interpreter (no sync / device-assert checks)."""
    check_scoring("smoke scoring bf16 40x300", 40, 300, torch.bfloat16)
    check_scoring("smoke scoring fp32 30x301", 30, 301, torch.float32)
    check_selective_ce("smoke selective CE bf16 40x300", 40, 300, torch.bfloat16, 0.25, extra_rows=[38, 39])
    print(f"\n{'ALL PASS' if not FAILURES else f'{len(FAILURES)} FAILED'} (smoke)")
    return 1 if FAILURES else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-big", action="store_true", help="skip the N·V > 2^31 case")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU with the kernels interpreted (checks this script only)")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("FAIL  a CUDA GPU is required")
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("FAIL  unset TRITON_INTERPRET for the GPU check")
        return 2
    import triton
    print(f"# cggr_torch kernels GPU check - {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    check_scoring("scoring bf16 16384x128256", 16384, 128256, torch.bfloat16)
    check_scoring("scoring bf16 4096x131072", 4096, 131072, torch.bfloat16)
    check_scoring("scoring fp16 2048x128256", 2048, 128256, torch.float16)
    check_scoring("scoring fp32 2048x128257 (odd V)", 2048, 128257, torch.float32)
    check_dispatch()
    check_selective_ce("selective CE bf16 16384x128256", 16384, 128256, torch.bfloat16, 0.25)
    check_selective_ce("selective CE fp32 2048x50257", 2048, 50257, torch.float32, 0.25)
    check_no_sync()
    if not args.skip_big:
        n, v = 17000, 128256
        boundary = (2 ** 31) // v                      # first row whose offset exceeds 2^31 elements
        print(f"INFO  N·V = {n * v} > 2^31 = {2 ** 31}; rows from {boundary} start past 2^31 elements")
        check_scoring(f"scoring bf16 {n}x{v} (N·V > 2^31)", n, v, torch.bfloat16,
                      extra_rows=range(boundary - 2, boundary + 3))
        check_selective_ce(f"selective CE bf16 {n}x{v} (N·V > 2^31)", n, v, torch.bfloat16, 0.25,
                           extra_rows=[boundary - 1, boundary, boundary + 1, n - 2, n - 1])
    check_device_assert()
    print(f"\n{'ALL PASS' if not FAILURES else f'{len(FAILURES)} FAILED'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
