#!/usr/bin/env python
"""Benchmark per-token log-probs + entropy + the policy-gradient backward of an LM head (SPEC §14), PyTorch.

Shape (default, issue 17): a Qwen-style head, ``N = 16384`` tokens, ``d = 4096``, ``V = 151936``, bf16 hidden
states and weight ``(V, d)``; per-sequence advantages over ``B = 16`` sequences of 1024 tokens. Each method runs
forward (log-probs and entropies of every token) + the policy-gradient loss on the kept tokens + backward to
``hidden`` and ``weight``, at ``ρ = 0.2`` (the top-20 % entropy tokens) and ``ρ = 1``:

* ``trl_materialised[ρ]``  - TRL's classic path: ``logits = h Wᵀ`` (bf16, ``N × V``), ``/ temperature``, float32
  ``log_softmax`` → gather, entropy ``−Σ p log p``, the top-ρ entropy mask, the token-mean loss, autograd;
* ``trl_chunked[ρ]``       - TRL's own chunked head (``trl.kernels.ChunkedLogProbFunction``, trl ≥ 1.16) when
  importable, with the same mask and loss (skipped with the reason otherwise);
* ``liger_grpo[ρ]``        - Liger-Kernel's fused linear GRPO loss (``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``)
  when its wheel is installed and offers it (its entropy mask is not applied: it has none; skipped otherwise);
* ``cggr_token_stats[ρ]``  - :func:`cggr_torch.fused_linear_token_stats` (every row's gradient recomputed), then
  the same mask and loss;
* ``cggr_policy_gradient[ρ]`` - :func:`cggr_torch.policy_gradient_loss` (``min_tokens_ratio = ρ``): the
  backward recomputes the LM head for the kept rows only;
* ``cggr_policy_gradient_<B>mib[1]`` - the same at ρ = 1 with ``memory_budget_bytes = B MiB`` (``--pg-budgets-mib``):
  the one pass's row blocks grow with the budget.

Columns: median / p10 / p90 (ms, CUDA events, ``grad`` reset outside the timed interval) and the peak memory
allocated beyond the inputs during one call (``torch.cuda.max_memory_allocated``), in GiB. ``check``: each
method's loss against ``trl_materialised`` at the same ρ (same selection up to entropy ties).

Run on the H200 from the repository root through the shared front (suite ``heads``; records with input and
trained tokens/s, peak memory and the issue-17 ratios, ``benchmarks/harness/convert.py``)::

    python benchmarks/token_stats.py --framework torch

``--quick`` runs tiny shapes on the CPU (checks the script; numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

GIB = 2**30


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens N")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (B = N / seq)")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 1.0])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-ms", type=float, default=2000.0)
    ap.add_argument("--pg-budgets-mib", type=int, nargs="*", default=[256, 512],
                    help="extra cggr_policy_gradient_<B>mib[1] rows: the ρ = 1 one pass with a memory budget of B MiB")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default="bench_token_stats_torch.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (script check only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seq, args.d, args.vocab, args.warmup, args.budget_ms = 256, 64, 32, 1003, 1, 20.0
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import torch.nn.functional as F

    from benchmarks.harness import measure
    from cggr_torch import fused_linear_token_stats, policy_gradient_loss

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    N, d, V, S = args.n, args.d, args.vocab, args.seq
    B = max(1, N // S)
    N = B * S
    g = torch.Generator(device="cpu").manual_seed(0)
    temps = torch.empty(N, 1).uniform_(0.3, 3.0, generator=g)
    hidden = (torch.randn(N, d, generator=g) * temps).to(dev, dtype).reshape(B, S, d).requires_grad_(True)
    weight = (torch.randn(V, d, generator=g) * (1.5 / d**0.5)).to(dev, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, S), generator=g).to(dev)
    targets[:, : S // 8] = -100                                    # the prompt
    adv = torch.randn(B, generator=g).to(dev)
    T = args.temperature
    valid = targets != -100
    n_valid = valid.sum().clamp(min=1).to(torch.float32)

    def top_entropy_mask(ent: torch.Tensor, rho: float) -> torch.Tensor:
        if rho >= 1.0:
            return valid
        k = max(1, int(round(rho * int(valid.sum()))))
        e = torch.where(valid, ent.detach(), torch.full_like(ent, -float("inf"))).reshape(-1)
        idx = torch.topk(e, k).indices
        return torch.zeros(N, dtype=torch.bool, device=dev).index_fill_(0, idx, True).reshape(B, S)

    def pg_loss(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # on-policy clipped objective = −A·exp(lp − lp.detach()), token-mean over the completion tokens
        ratio = torch.exp(lp - lp.detach())
        return -(torch.where(mask, ratio * adv[:, None], torch.zeros((), device=dev))).sum() / n_valid

    def materialised(rho: float) -> Callable[[], Any]:
        def run() -> Any:
            z = F.linear(hidden, weight).float() / T
            logp = torch.log_softmax(z, dim=-1)
            lp = torch.where(valid, logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0], torch.zeros((), device=dev))
            ent = -(logp.exp() * logp).sum(-1)
            loss = pg_loss(lp, top_entropy_mask(ent, rho))
            loss.backward()
            return loss
        return run

    notes: dict[str, str] = {}
    methods: dict[str, Callable[[], Any]] = {}
    for rho in args.ratios:
        methods[f"trl_materialised[{rho:g}]"] = materialised(rho)
    try:
        from trl.kernels import ChunkedLogProbFunction  # trl >= 1.16's own chunked head

        def trl_chunked(rho: float) -> Callable[[], Any]:
            def run() -> Any:
                h2 = hidden.reshape(N, d)
                out = ChunkedLogProbFunction.apply(h2, weight, None, targets.reshape(-1).clamp(min=0), T, 32768, None,
                                                   1.0, ("log_probs", "entropy"))
                lp = torch.where(valid, out[0].reshape(B, S), torch.zeros((), device=dev))
                loss = pg_loss(lp, top_entropy_mask(out[1].reshape(B, S), rho))
                loss.backward()
                return loss
            return run
        for rho in args.ratios:
            methods[f"trl_chunked[{rho:g}]"] = trl_chunked(rho)
    except Exception as err:  # noqa: BLE001 - any import/API mismatch is reported, not fatal
        notes["trl_chunked"] = f"skipped: trl.kernels.ChunkedLogProbFunction unavailable ({type(err).__name__}: {err})"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, temperature=T)

        def liger_run() -> Any:
            out = liger(hidden, weight, targets.clamp(min=0), valid.to(torch.int64), adv)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss
        methods["liger_grpo[1]"] = liger_run
        notes["liger_grpo"] = "Liger's fused linear GRPO loss: no entropy output or entropy mask, ρ = 1 only"
    except Exception as err:  # noqa: BLE001
        notes["liger_grpo"] = f"skipped: Liger-Kernel's fused linear GRPO loss unavailable ({type(err).__name__}: {err})"

    def ours_stats(rho: float) -> Callable[[], Any]:
        def run() -> Any:
            out = fused_linear_token_stats(hidden, weight, targets, need=("logprob",), temperature=T)
            loss = pg_loss(out.logprob, top_entropy_mask(out.entropy if out.entropy is not None
                                                         else out.statistics.entropy, rho))
            loss.backward()
            return loss
        return run

    def ours_pg(rho: float, budget: Optional[int] = None) -> Callable[[], Any]:
        kw = {} if budget is None else {"memory_budget_bytes": budget}

        def run() -> Any:
            out = policy_gradient_loss(hidden, weight, targets, adv, temperature=T, min_tokens_ratio=rho,
                                       loss_type="dapo", **kw)
            out.loss.backward()
            return out.loss
        return run

    for rho in args.ratios:
        methods[f"cggr_token_stats[{rho:g}]"] = ours_stats(rho)
        methods[f"cggr_policy_gradient[{rho:g}]"] = ours_pg(rho)
    if 1.0 in args.ratios:  # the one pass's blocks grow with the budget: fewer ∂W accumulations, longer GEMMs
        for mib in args.pg_budgets_mib:
            methods[f"cggr_policy_gradient_{mib}mib[1]"] = ours_pg(1.0, mib << 20)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods or k.split("[")[0] in args.methods}

    def reset() -> None:
        hidden.grad = None
        weight.grad = None

    results: dict[str, Any] = {}
    for name, fn in methods.items():
        try:
            reset()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            loss = fn()
            peak = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                grads = sum(x.grad.numel() * x.grad.element_size() for x in (hidden, weight) if x.grad is not None)
                peak = (torch.cuda.max_memory_allocated() - base - grads) / GIB
            timing = measure(fn, framework="torch" if dev.type == "cuda" else "host", warmup=args.warmup,
                             budget_ms=args.budget_ms, min_reps=3, max_reps=50, before_each=reset)
            results[name] = {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                             "reps": timing.reps, "peak_extra_gib": peak, "loss": float(loss.detach())}
        except Exception as err:  # noqa: BLE001 - an out-of-memory baseline is a result, not a crash
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        line = results[name]
        print(f"{name:32s} " + (f"{line['median_ms']:10.2f} ms  peak+{line['peak_extra_gib']}" if "median_ms" in line
                                 else line["error"]), flush=True)
    for name, line in results.items():
        ref = results.get(f"trl_materialised[{name.split('[')[-1]}")
        if "loss" in line and ref and "loss" in ref:
            line["check_loss_vs_trl_materialised"] = abs(line["loss"] - ref["loss"]) / max(1e-12, abs(ref["loss"]))
    out = {"op": "token_stats", "framework": "torch", "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shape": {"N": N, "B": B, "T": S, "d": d, "V": V, "dtype": args.dtype, "temperature": T,
                     "valid_tokens": int(valid.sum())},
           "results": results, "notes": notes, "quick": args.quick}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in notes.items():
        print(f"note {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
