#!/usr/bin/env python
"""GPU correctness check of the ``cggr_torch`` Triton kernels at real sizes (run on the H200).

Prints **one line per group** - ``PASS  <group> (<n> checks)`` or ``FAIL  <group>: <failed checks>`` - then
``ALL PASS`` / ``<n> FAILED``, and exits non-zero when a check fails (the GPU session shows only the tail).
``--verbose`` prints every check. Groups:

1. scoring at N = 16384, V = 128256 bf16 (and V = 131072, fp16, fp32 odd V) against the float64 oracle
   ``tests/oracle.py`` on sampled rows that include crafted edge rows (equal maxima 128k columns apart, a max
   in the ragged last block, ``−∞`` blocks, NaN / ``+∞`` / all ``−∞`` rows, a ``−∞`` target logit, ignored
   targets, large offsets) within SPEC §11 (``SCORE_TOL``), into NaN / sentinel-poisoned buffers; the
   in-kernel difficulty is **bit-identical** to ``difficulty_from_statistics`` of the kernel's statistics
   (the epilogue divides instead of multiplying, so nothing can be contracted into an FMA) and within
   ``SCORE_TOL`` of the oracle; the sort key / status outputs agree with the PyTorch key;
2. every launch variant of the scoring sweep (``benchmarks/bench_scoring_torch.py``: ``ftz``, persistent
   grids, eviction hints, rows/warps) against the oracle, so the benchmark's winner can be adopted at once;
3. selection: ``select_tokens`` (Triton path, int32 and int64 keys) bit-identical to the PyTorch path at
   N = 16384, 131072 and (16, 1024) for every strategy, and to the oracle with ties / ±0 / ±∞ / NaN;
4. selective cross-entropy (composable path) at 16384 × 128256 bf16: loss and gradient rows against float64,
   unselected rows exactly 0, with / without ``lse`` and ``inplace_backward``, backward into a NaN buffer;
5. ``CGGRLoss`` (fused path) for every strategy at 16384 × 128256 bf16: the mask equals ``select_tokens`` on
   the kernel's own scores, the ratio equals ``dynamic_ratio`` of its own mean confidence bit for bit, the
   metrics equal PyTorch reductions of the same scores, loss and gradient rows against float64;
6. no host synchronisation (``torch.cuda.set_sync_debug_mode('error')``) in the composable pipeline and in
   ``CGGRLoss`` forward + backward for every strategy;
7. N·V > 2^31 (N = 17000, V = 128256 bf16): scoring and the fused loss's gradient on rows around the 2^31
   element boundary and the last rows;
8. an out-of-range target trips the device-side assertion, in ``token_statistics_triton`` and in
   ``CGGRLoss`` (subprocesses: it poisons the CUDA context);
9. the ρ = 1 policy gradient's one pass (4 × 1024 tokens, d = 2048, V = 151936 bf16) against the float32
   materialised loss and gradients and against the two-pass path, and without host synchronisation.

Run from the repository root on a GPU machine (``TRITON_INTERPRET`` unset)::

    python benchmarks/verify_torch.py
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import textwrap
from typing import Any, Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
SMOKE = "--smoke" in sys.argv[1:]
if SMOKE:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if SMOKE else "cuda"

import numpy as np  # noqa: E402

from benchmarks.harness import compat  # noqa: E402
import torch  # noqa: E402

STAT_KEYS = ("lse", "entropy", "confidence", "runner_up", "nll")
STRATEGIES = ("topk", "fixed_quota", "stratified", "sequence_aware")
IGN = -100
VERBOSE = "--verbose" in sys.argv[1:]
FAILED_GROUPS: list[str] = []
_group: dict[str, Any] = {"name": None, "passed": 0, "failed": []}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Return cached blocks to the device between groups (no-op on CPU)."""
    if DEV == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def group(name: str) -> Iterator[None]:
    """Collect the checks of one group and print one PASS/FAIL line for it (an exception fails the group)."""
    _group.update(name=name, passed=0, failed=[])
    try:
        yield
    except Exception as err:  # noqa: BLE001 - a crash is a failed group, the next group still runs
        _group["failed"].append(f"crashed: {type(err).__name__}: {err}"[:300])
    finally:
        failed = _group["failed"]
        if failed:
            FAILED_GROUPS.append(name)
            print(f"FAIL  {name}: " + "; ".join(failed)[:900], flush=True)
        else:
            print(f"PASS  {name} ({_group['passed']} checks)", flush=True)
        free_memory()


def report(name: str, ok: bool, detail: str = "") -> None:
    if VERBOSE:
        print(f"  {'ok ' if ok else 'BAD'} {name}" + (f"  ({detail})" if detail else ""), flush=True)
    if ok:
        _group["passed"] += 1
    else:
        _group["failed"].append(name + (f" ({detail})" if detail else ""))


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


def torch_key32(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The PyTorch form of the SPEC §6 sort key (the selection's int32 key, via ``benchmarks.harness.compat``)."""
    return compat.torch_order_key32(d.to(torch.float32), e)


# ================================================================================================ groups
def check_scoring(label: str, n: int, v: int, dtype: torch.dtype, extra_rows: Sequence[int] = ()) -> None:
    ks = compat.torch_scoring_kernels()
    from cggr_torch.scoring import difficulty_from_statistics
    from tests import oracle

    x, t = make_logits(n, v, dtype, seed=n + v)
    rows = sample_rows(n, extra_rows)
    rows_d = rows.to(DEV)
    ref = oracle.score_tokens(x[rows_d].to(torch.float64).cpu().numpy(), t[rows_d].cpu().numpy(), "combined", IGN)
    rf = ref["stats"]["row_finite"]

    geom = ks.row_geometry(x)
    tf = ks.flat_targets(t)
    out = torch.full((6, n), float("nan"), dtype=torch.float32, device=DEV)
    fin = torch.full((n,), 7, dtype=torch.int8, device=DEV)
    key = torch.full((n,), 12345, dtype=torch.int32, device=DEV)
    status = torch.full((n,), 99, dtype=torch.int8, device=DEV)
    ks.launch_scoring(geom, tf, IGN, compat.torch_mode_code("combined"), out, fin, key=key, status=status)
    sync()
    fin_all = fin.cpu()
    report("finite flags written for every row", bool(((fin_all == 0) | (fin_all == 1)).all()))
    report("crafted non-finite rows flagged", fin_all[[3, 4, 5, 6]].tolist() == [0, 0, 0, 0]
           and int(fin_all.sum()) == n - 4, f"{int(fin_all.sum())} finite of {n}")
    report("finite flags = oracle row_finite", np.array_equal(fin_all[rows].numpy().astype(bool), rf))
    report("no NaN left in finite rows", not bool(torch.isnan(out[:, fin.bool()]).any()))
    outs = out[:, rows_d].cpu().numpy()
    for j, k in enumerate(STAT_KEYS):
        ok, worst = within(outs[j][rf], ref["stats"][k][rf], *oracle.SCORE_TOL[k])
        report(f"{k} within SCORE_TOL", ok, f"worst excess {worst:.2e}")
    ok, worst = within(outs[5][ref["eligible"]], ref["difficulty"][ref["eligible"]], *oracle.SCORE_TOL["difficulty"])
    report("combined difficulty within SCORE_TOL", ok, f"worst excess {worst:.2e}")
    report("ties: runner_up == confidence on equal maxima", bool(out[3, 0] == out[2, 0]))

    st = ks.token_statistics_triton(x, t, IGN)
    same = all(torch.equal(torch.nan_to_num(getattr(st, k), nan=7.0), torch.nan_to_num(out[j], nan=7.0))
               for j, k in enumerate(STAT_KEYS))
    report("token_statistics_triton == launch_scoring with key/status (deterministic)", same)
    sc = ks.score_tokens_triton(x, t, scoring="combined", ignore_index=IGN)
    d_ref = difficulty_from_statistics(sc.stats, "combined", has_targets=True)
    diff_bits = torch.nan_to_num(sc.difficulty, nan=7.0) != torch.nan_to_num(d_ref, nan=7.0)
    report("in-kernel difficulty bit-identical to difficulty_from_statistics", not bool(diff_bits.any()),
           f"{int(diff_bits.sum())} rows differ")
    report("eligibility = oracle", np.array_equal(sc.eligible[rows_d].cpu().numpy(), ref["eligible"]))
    valid = t != IGN
    want_status = valid.to(torch.int8) | (sc.eligible.to(torch.int8) << 1)
    report("status bits = (valid, eligible, no out-of-range)", bool(torch.equal(status, want_status)))
    report("sort key = PyTorch key of the kernel difficulty",
           bool(torch.equal(key, torch_key32(sc.difficulty, sc.eligible))))


def check_variants(n: int, v: int, dtype: torch.dtype) -> None:
    from benchmarks.ops.scoring_torch import sweep_configs
    ks = compat.torch_scoring_kernels()
    from tests import oracle

    x, t = make_logits(n, v, dtype, seed=5)
    rows = sample_rows(n)
    rows_d = rows.to(DEV)
    ref = oracle.score_tokens(x[rows_d].to(torch.float64).cpu().numpy(), t[rows_d].cpu().numpy(), "combined", IGN)
    rf, el = ref["stats"]["row_finite"], ref["eligible"]
    geom = ks.row_geometry(x)
    tf = ks.flat_targets(t)
    for c in sweep_configs(v, torch.finfo(dtype).bits // 8, DEV == "cuda"):
        out = torch.full((6, n), float("nan"), dtype=torch.float32, device=DEV)
        fin = torch.full((n,), 7, dtype=torch.int8, device=DEV)
        try:
            ks.launch_scoring(geom, tf, IGN, compat.torch_mode_code("combined"), out, fin, c)
            sync()
        except Exception as err:  # noqa: BLE001 - a variant that does not compile fails its check only
            report(f"{c.describe()} runs", False, f"{type(err).__name__}: {err}"[:160])
            continue
        outs = out[:, rows_d].cpu().numpy()
        fin_all = fin.cpu()
        ok = bool(((fin_all == 0) | (fin_all == 1)).all()) and np.array_equal(fin_all[rows].numpy().astype(bool), rf)
        worst = -1.0
        for j, k in enumerate(STAT_KEYS):
            ok_k, w = within(outs[j][rf], ref["stats"][k][rf], *oracle.SCORE_TOL[k])
            ok &= ok_k
            worst = max(worst, w)
        ok_d, w = within(outs[5][el], ref["difficulty"][el], *oracle.SCORE_TOL["difficulty"])
        report(f"{c.describe()} within SCORE_TOL", ok and ok_d, f"worst excess {max(worst, w):.2e}")


def check_selection() -> None:
    from cggr_torch import selection as sel_mod
    ksel = compat.torch_selection_kernels()
    from tests import oracle

    g = torch.Generator(device=DEV).manual_seed(3)
    shapes = [(16384,), (131072,), (16, 1024)] if DEV == "cuda" else [(300,), (3, 50)]
    ratio = torch.tensor(0.3375, device=DEV)
    for shape in shapes:
        d = 8.0 + 2.0 * torch.randn(shape, generator=g, device=DEV)
        idx = torch.randint(0, d.numel(), (d.numel() // 10,), generator=g, device=DEV)
        d.view(-1)[idx] = d.view(-1)[idx.flip(0)]                         # exact ties
        d.view(-1)[idx[:50]] = 0.0
        d.view(-1)[idx[50:100]] = -0.0
        e = torch.rand(shape, generator=g, device=DEV) > 0.1
        for strategy in STRATEGIES:
            with compat.force("torch", "reference"):
                m_ref, k_ref = sel_mod.select_tokens(d, e, ratio, selection=strategy, min_tokens_per_sequence=2)
            for bits in (32, 64):
                with compat.torch_sort_key_bits(bits):
                    m, k = sel_mod.select_tokens(d, e, ratio, selection=strategy, min_tokens_per_sequence=2)
                report(f"{shape} {strategy} int{bits} key = PyTorch path",
                       bool(torch.equal(m, m_ref)) and int(k) == int(k_ref))
        r = sel_mod.rank_tokens(d, e)
        with compat.force("torch", "reference"):
            r_ref = sel_mod.rank_tokens(d, e)
        report(f"{shape} rank_tokens = PyTorch path", bool(torch.equal(r, r_ref)))
    rng = np.random.default_rng(16)
    pool = np.array([0.0, -0.0, 1.0, 1.0, 2.5, -np.inf, np.inf, np.nan], dtype=np.float32)
    for shape in [(5000,), (16, 700)]:
        d = rng.choice(pool, size=shape).astype(np.float32)
        e = rng.random(shape) < 0.8
        for strategy in STRATEGIES:
            for ratio_np in (np.float32(0.3), np.float32(0.77)):
                m_o, k_o = oracle.select_tokens(d, e, ratio_np, strategy, 4, 2)
                m, k = sel_mod.select_tokens(torch.from_numpy(d).to(DEV), torch.from_numpy(e).to(DEV),
                                             torch.tensor(ratio_np).to(DEV), selection=strategy, num_strata=4,
                                             min_tokens_per_sequence=2)
                report(f"oracle {shape} {strategy} {ratio_np}", int(k) == k_o and np.array_equal(m.cpu().numpy(), m_o))


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


def check_selective_ce(n: int, v: int, dtype: torch.dtype, ratio: float, extra_rows: Sequence[int] = ()) -> None:
    kce = compat.torch_cross_entropy_kernels()
    ks = compat.torch_scoring_kernels()
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
    report("selection size", count > 0 and int(k) > 0, f"k={int(k)}, |S|={count}")
    for lse_name, lse in (("lse=None", None), ("lse=scores", sc.stats.lse)):
        for inplace in (False, True):
            name = f"{lse_name}, inplace={inplace}"
            leaf = x.clone().requires_grad_(True)
            loss = kce.selective_cross_entropy_triton(leaf, t, mask, ignore_index=IGN, lse=lse,
                                                      inplace_backward=inplace)
            loss.backward()
            got = float(loss.detach())
            report(f"{name}: loss", abs(got - want_loss) <= 1e-5 + 1e-4 * abs(want_loss),
                   f"{got:.7f} vs {want_loss:.7f}")
            g = leaf.grad[rows].to(torch.float64) * count
            ok, worst = within(g.cpu().numpy(), want_g.cpu().numpy(), 1e-5, rtol)
            report(f"{name}: gradient rows vs float64", ok, f"worst excess {worst:.2e}")
            report(f"{name}: unselected rows exactly 0", bool((leaf.grad[~sel] == 0).all()))
            if inplace:
                report(f"{name}: logits buffer holds the gradient", bool(torch.equal(leaf.detach(), leaf.grad)))
            del leaf, loss
            free_memory()
    geom = ks.row_geometry(x)
    grad = torch.full_like(x, float("nan"))
    scale = torch.full((1,), 1.0 / max(1, count), device=DEV)
    kce.launch_selective_backward(geom, ks.flat_targets(t), sel.to(torch.uint8), sc.stats.lse, scale, grad)
    report("backward writes every element of a NaN-poisoned buffer", not bool(torch.isnan(grad).any()))


def check_fused_loss(n: int, v: int, dtype: torch.dtype, extra_rows: Sequence[int] = (),
                     strategies: Sequence[str] = STRATEGIES + ("topk+dynamic",)) -> None:
    from cggr_torch import CGGRLoss
    from cggr_torch import selection as sel_mod
    from cggr_torch.curriculum import dynamic_ratio
    ks = compat.torch_scoring_kernels()

    x, t = make_logits(n, v, dtype, seed=11 * n + v)
    t[torch.arange(0, n, 97, device=DEV)] = IGN
    with torch.no_grad():
        sc = ks.score_tokens_triton(x, t, ignore_index=IGN)
    rows = sample_rows(n, extra_rows).to(DEV)
    valid = t != IGN
    n_elig = int(sc.eligible.sum())
    seq = (16, n // 16) if n % 16 == 0 else (1, n)
    for strategy in strategies:
        name = strategy
        dynamic = strategy == "topk+dynamic"
        sel_name = "topk" if dynamic else strategy
        crit = CGGRLoss(selection=sel_name, dynamic_threshold=dynamic, min_tokens_ratio=0.25, warmup_steps=0,
                        num_strata=4, min_tokens_per_sequence=2, ignore_index=IGN)
        leaf = x.clone().requires_grad_(True)
        shaped = sel_name == "sequence_aware"
        xin = leaf.view(seq + (v,)) if shaped else leaf
        tin = t.view(seq) if shaped else t
        loss = crit(xin, tin)
        loss.backward()
        met = compat.torch_loss_metric_tensors(crit)
        ratio = met["effective_ratio"]
        if dynamic:
            want_ratio = dynamic_ratio(met["token_ratio"], met["avg_confidence"], 0.5)
            report(f"{name}: ratio == dynamic_ratio(own mean confidence) bit for bit",
                   bool(torch.equal(ratio, want_ratio)), f"{float(ratio)!r} vs {float(want_ratio)!r}")
        d_in = sc.difficulty.view(seq) if shaped else sc.difficulty
        e_in = sc.eligible.view(seq) if shaped else sc.eligible
        with compat.force("torch", "reference"):
            m_ref, k_ref = sel_mod.select_tokens(d_in, e_in, ratio, selection=sel_name, num_strata=4,
                                                 min_tokens_per_sequence=2)
        m_ref = m_ref.reshape(-1)
        count = int(m_ref.sum())
        report(f"{name}: tokens_selected = PyTorch selection on the kernel scores",
               int(met["tokens_selected"]) == count, f"{int(met['tokens_selected'])} vs {count}")
        nonzero = (leaf.grad != 0).any(-1)
        report(f"{name}: gradient rows = that selection", bool(torch.equal(nonzero, m_ref)),
               f"{int((nonzero != m_ref).sum())} rows differ")
        report(f"{name}: tokens_total / tokens_nonfinite",
               int(met["tokens_total"]) == n_elig and int(met["tokens_nonfinite"]) == int((valid & ~sc.eligible).sum()))
        denom = max(1, n_elig)
        for key, src in (("avg_confidence", sc.stats.confidence), ("avg_entropy", sc.stats.entropy),
                         ("avg_difficulty", sc.difficulty)):
            want = float(torch.where(sc.eligible, src, torch.zeros_like(src)).double().sum()) / denom
            report(f"{name}: {key}", abs(float(met[key]) - want) <= 1e-5 * max(1.0, abs(want)),
                   f"{float(met[key])} vs {want}")
        want_loss, want_g = reference_ce(x, t, m_ref, rows)
        got = float(loss.detach())
        report(f"{name}: loss vs float64", abs(got - want_loss) <= 1e-5 + 1e-4 * abs(want_loss),
               f"{got:.7f} vs {want_loss:.7f}")
        g = leaf.grad[rows].to(torch.float64) * count
        ok, worst = within(g.cpu().numpy(), want_g.cpu().numpy(), 1e-5, 8e-3 if dtype == torch.bfloat16 else 1e-3)
        report(f"{name}: gradient rows vs float64", ok, f"worst excess {worst:.2e}")
        del leaf, loss, xin
        free_memory()


def sync_error(fn: Any) -> Optional[str]:
    """Run ``fn()`` with CUDA's sync debug mode set to "error": None, or the error a host synchronisation raised."""
    torch.cuda.synchronize()
    err: Optional[str] = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        err = str(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return err


def check_no_sync() -> None:
    from cggr_torch import CGGRLoss
    from cggr_torch.kernels.cross_entropy import selective_cross_entropy_triton
    from cggr_torch.kernels.scoring import score_tokens_triton
    from cggr_torch.selection import select_tokens

    x, t = make_logits(4096, 32000, torch.bfloat16, seed=11)
    leaf = x.requires_grad_(True)
    ratio = torch.tensor(0.25, device=DEV)

    def raw(inplace: bool) -> None:
        with torch.no_grad():
            sc = score_tokens_triton(leaf.detach(), t, ignore_index=IGN)
            mask, _k = select_tokens(sc.difficulty, sc.eligible, ratio)
        loss = selective_cross_entropy_triton(leaf, t, mask, ignore_index=IGN, lse=sc.stats.lse,
                                              inplace_backward=inplace)
        loss.backward()

    cases: list[tuple[str, Any]] = [(f"composable pipeline (inplace={b})", (lambda b=b: raw(b))) for b in (False, True)]
    for strategy in STRATEGIES:
        crit = CGGRLoss(selection=strategy, warmup_steps=10, min_tokens_per_sequence=2)
        xin = leaf.view(16, 256, -1) if strategy == "sequence_aware" else leaf
        tin = t.view(16, 256) if strategy == "sequence_aware" else t
        cases.append((f"CGGRLoss {strategy} fwd+bwd", (lambda c=crit, a=xin, b=tin: c(a, b).backward())))
    for name, fn in cases:
        fn()                                            # compile the kernels outside the checked region
        leaf.grad = None
        err = sync_error(fn)
        report(name, err is None, (err or "")[:160])
        leaf.grad = None


def check_device_assert() -> None:
    snippets = {
        "token_statistics_triton": "from cggr_torch.kernels.scoring import token_statistics_triton as f\n"
                                   "out = f(x, t)",
        "CGGRLoss (fused)": "from cggr_torch import CGGRLoss\nout = CGGRLoss()(x.requires_grad_(True), t)",
    }
    for name, body in snippets.items():
        code = textwrap.dedent(f"""
            import sys, torch
            sys.path.insert(0, {ROOT!r})
            x = torch.randn(8, 1000, device='cuda')
            t = torch.zeros(8, dtype=torch.long, device='cuda'); t[3] = 1000
        """) + body + "\ntorch.cuda.synchronize()\nprint('NO ASSERT')\n"
        env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        text = proc.stdout + proc.stderr
        ok = proc.returncode != 0 and "NO ASSERT" not in text and "assert" in text.lower()
        report(f"{name}: out-of-range target trips the device assertion", ok,
               text.strip().splitlines()[-1][:160] if text.strip() else f"rc={proc.returncode}")


def check_policy_gradient_one_pass(n_seq: int, T: int, d: int, v: int, dtype: torch.dtype) -> None:
    """The ρ = 1 policy gradient's one pass (``policy_gradient_loss(min_tokens_ratio=1)``, token-mean, on-policy)
    against the float32 materialised loss of the same formula (``ℓ_i = −A_i·e^{lp_i − sg(lp_i)}``, mean over the
    tokens with a target) and against the two-pass path (``selection="sequence_aware"`` at ratio 1 keeps the same
    tokens); on CUDA also with the sync debug mode set to "error" (no host synchronisation)."""
    from cggr_torch.policy_gradient import policy_gradient_loss

    g = torch.Generator(device="cpu").manual_seed(5)
    h = (torch.randn(n_seq, T, d, generator=g) * 0.5).to(DEV, dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(DEV, dtype)
    t = torch.randint(0, v, (n_seq, T), generator=g).to(DEV)
    t[:, :T // 8] = IGN                                     # prompt positions
    adv = torch.randn(n_seq, generator=g).to(DEV)

    def ours(**kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hl, wl = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        loss = policy_gradient_loss(hl, wl, t, adv, min_tokens_ratio=1.0, loss_type="dapo", **kw).loss
        loss.backward()
        return loss.detach(), hl.grad, wl.grad

    got = ours()
    hf = h.detach().clone().float().requires_grad_(True)   # a copy: .float() of float32 is the tensor itself
    wf = w.detach().clone().float().requires_grad_(True)
    logp = torch.log_softmax(hf @ wf.t(), dim=-1)
    has = t != IGN
    lp = logp.gather(-1, t.clamp(min=0)[..., None])[..., 0]
    a = adv[:, None].expand_as(lp)
    ref = torch.where(has, -a * torch.exp(lp - lp.detach()), torch.zeros_like(lp)).sum() / has.sum()
    ref.backward()
    ref = ref.detach()
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    report("loss = float32 materialised", abs(float(got[0]) - float(ref)) <= tol * max(1e-6, abs(float(ref))),
           f"{float(got[0]):.6g} vs {float(ref):.6g}")
    for name, a_, e_ in (("dh", got[1], hf.grad), ("dW", got[2], wf.grad)):
        err = float((a_.float() - e_).abs().max()) / max(1e-30, float(e_.abs().max()))
        report(f"{name} = float32 materialised (max rel {err:.2e})", err <= 4 * tol)
    two = ours(selection="sequence_aware", min_tokens_per_sequence=0)
    report("loss = the two-pass path", abs(float(got[0]) - float(two[0])) <= 1e-5 * max(1e-6, abs(float(two[0]))))
    for name, a_, e_ in (("dh", got[1], two[1]), ("dW", got[2], two[2])):
        err = float((a_.float() - e_.float()).abs().max()) / max(1e-30, float(e_.float().abs().max()))
        report(f"{name} = the two-pass path (max rel {err:.2e})", err <= 2 * tol)
    if DEV == "cuda":
        err_text = sync_error(ours)
        report("one pass: no host synchronisation", err_text is None, (err_text or "")[:160])


def smoke() -> int:
    """The same checks on tiny CPU shapes under the interpreter (no sync / device-assert checks)."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)   # interpreter: log2(0), inf − inf on bad rows
    compat.force("torch", "kernel").__enter__()  # kernels on CPU tensors (interpreter) for the whole smoke run
    with group("smoke scoring bf16 40x300"):
        check_scoring("", 40, 300, torch.bfloat16)
    with group("smoke variants fp32 30x301"):
        check_variants(30, 301, torch.float32)
    with group("smoke selection"):
        check_selection()
    with group("smoke selective CE bf16 40x300"):
        check_selective_ce(40, 300, torch.bfloat16, 0.25, extra_rows=[38, 39])
    with group("smoke CGGRLoss fused bf16 48x300"):
        check_fused_loss(48, 300, torch.bfloat16)
    with group("smoke policy gradient one pass fp32 3x16x24x301"):
        check_policy_gradient_one_pass(3, 16, 24, 301, torch.float32)
    print(f"\n{'ALL PASS' if not FAILED_GROUPS else f'{len(FAILED_GROUPS)} FAILED'} (smoke)")
    return 1 if FAILED_GROUPS else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-big", action="store_true", help="skip the N·V > 2^31 case")
    ap.add_argument("--verbose", action="store_true", help="print every check, not only one line per group")
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
    with group("1 scoring bf16 16384x128256"):
        check_scoring("", 16384, 128256, torch.bfloat16)
    with group("1 scoring bf16 4096x131072"):
        check_scoring("", 4096, 131072, torch.bfloat16)
    with group("1 scoring fp16 2048x128256"):
        check_scoring("", 2048, 128256, torch.float16)
    with group("1 scoring fp32 2048x128257 (odd V)"):
        check_scoring("", 2048, 128257, torch.float32)
    with group("2 scoring sweep variants bf16 1024x128256"):
        check_variants(1024, 128256, torch.bfloat16)
    with group("3 selection (triton = pytorch path = oracle)"):
        check_selection()
    with group("4 selective CE bf16 16384x128256"):
        check_selective_ce(16384, 128256, torch.bfloat16, 0.25)
    with group("4 selective CE fp32 2048x50257"):
        check_selective_ce(2048, 50257, torch.float32, 0.25)
    with group("5 CGGRLoss fused bf16 16384x128256 (all strategies)"):
        check_fused_loss(16384, 128256, torch.bfloat16)
    with group("5 CGGRLoss fused fp32 2048x50257 (topk, stratified)"):
        check_fused_loss(2048, 50257, torch.float32, strategies=("topk+dynamic", "stratified"))
    with group("6 no host sync (composable pipeline, CGGRLoss x4)"):
        check_no_sync()
    if not args.skip_big:
        n, v = 17000, 128256
        boundary = (2 ** 31) // v                      # first row whose offset exceeds 2^31 elements
        big = [boundary - 2, boundary - 1, boundary, boundary + 1, boundary + 2, n - 2, n - 1]
        with group(f"7 N*V > 2^31: scoring bf16 {n}x{v}"):
            check_scoring("", n, v, torch.bfloat16, extra_rows=big)
        with group(f"7 N*V > 2^31: CGGRLoss fused bf16 {n}x{v}"):
            check_fused_loss(n, v, torch.bfloat16, extra_rows=big, strategies=("topk+dynamic",))
    with group("8 device-side assertion on out-of-range targets"):
        check_device_assert()
    with group("9 policy gradient one pass (rho = 1) bf16 4x1024, d 2048, V 151936"):
        check_policy_gradient_one_pass(4, 1024, 2048, 151936, torch.bfloat16)
    print(f"\n{'ALL PASS' if not FAILED_GROUPS else f'{len(FAILED_GROUPS)} FAILED: {FAILED_GROUPS}'}")
    return 1 if FAILED_GROUPS else 0


if __name__ == "__main__":
    sys.exit(main())
