#!/usr/bin/env python
"""Benchmark token selection (``cggr_torch.selection.select_tokens``) and its building blocks on a GPU.

Shapes (default): ``N = 16384`` and ``N = 131072`` flat tokens and a ``(B, T) = (16, 1024)`` batch; float32
difficulties ~ N(8, 2²) with 10 % ineligible tokens and 5 % exact ties; a device ratio of 0.25 (as the
dynamic threshold produces it).

Rows:

* every strategy through the public ``select_tokens`` - the Triton path (CUDA default) and the PyTorch path
  (``CGGR_DISABLE_KERNELS=1``) - plus the Triton path with unique int64 keys (``SORT_KEY_BITS = 64``);
* SPEC §7.4's ``sample_tokens`` (``sampled``, step 1): the Triton sampler (``cggr_torch.kernels.sampling``:
  probabilities, sort, water-filling, draws; the default path for the size, and the other one of its
  one-program / multi-program paths, to tune ``SINGLE_PROGRAM_MAX_TOKENS``) and the PyTorch path; its
  ``exact`` column is SPEC §11's rule for ``sampled`` (same ``k``, masks identical except draws within
  ``PI_RTOL·π`` of ``π``), not bit-identity;
* building blocks: argument validation, ``num_selected`` (ratio → k on the device), the Triton key / plan /
  mask kernels, and the sort variants: ``torch.sort`` of the int32 key stable / unstable, of a float32 key
  stable / unstable, of the unique int64 key (``(ordered_bits << 32) | index``) stable / unstable, and the
  host-``k`` alternatives ``torch.topk`` / ``torch.kthvalue`` on the unique key (they need ``k`` on the host,
  i.e. a synchronisation, so they cannot be used in a training step: listed for their GPU time only).

Columns: ``gpu µs`` = the harness's CUDA-graph timing (the device time alone; ``-`` when the call
cannot be captured, e.g. because it synchronises), ``eager ms`` = the harness's CUDA-event timing (what a tight
loop sees, launch overhead included when the CPU is the bottleneck), ``cpu µs`` = host time to enqueue one
call (no synchronisation), ``sync`` = whether one call synchronises with the host
(``torch.cuda.set_sync_debug_mode('error')``), ``exact`` = bit-identical mask and ``k`` to the reference
(the PyTorch path, itself checked against the float64 oracle on a small case).

The last lines are a summary (the GPU session shows only the tail). Writes JSON to ``--out``;
``--include-json`` embeds the JSON of other benchmarks (the session runs the three torch kernel benchmarks
as one step: one log, one JSON) and prints their summaries before this one. Run on the H200 from the
repository root::

    python benchmarks/selection.py --framework torch

``--smoke`` runs tiny shapes on CPU with the kernels interpreted (checks the script only).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

STRATEGIES = ("topk", "fixed_quota", "stratified", "sequence_aware")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 131072], help="flat token counts")
    ap.add_argument("--batch", type=int, nargs=2, default=[16, 1024], metavar=("B", "T"), help="a 2-D shape")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--rep-ms", type=int, default=40, help="measurement time per row and timer (ms)")
    ap.add_argument("--out", default="bench_selection_torch.json")
    ap.add_argument("--include-json", nargs="*", default=[],
                    help="JSON files of other benchmarks to embed in --out; their summaries are printed last")
    ap.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes on CPU, kernels interpreted")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.sizes, args.batch = [300], [3, 50]
    return args


@contextlib.contextmanager
def env_var(name: str, value: Optional[str]) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import numpy as np
    import torch
    import triton

    from benchmarks.harness import compat
    from benchmarks.harness import measure as hmeasure
    from cggr_torch import num_selected, select_tokens
    from cggr_torch.selection import sample_tokens, sampling_probabilities, uniform_hash
    from tests import oracle

    from cggr import CGGRConfig

    power, mix, seed = CGGRConfig.sample_power, CGGRConfig.sample_uniform_mix, CGGRConfig.sample_seed  # defaults

    try:
        import cggr_torch.kernels.sampling as ksam
    except ModuleNotFoundError:        # a checkout whose sampler has no kernels
        ksam = None

    @contextlib.contextmanager
    def sampler_path(multi: bool) -> Iterator[None]:
        """The Triton sampler's one-program (``multi=False``) or multi-program kernels whatever ``N`` is."""
        if ksam is None:
            yield
            return
        saved = ksam.SINGLE_PROGRAM_MAX_TOKENS
        ksam.SINGLE_PROGRAM_MAX_TOKENS = 0 if multi else 2**31
        try:
            yield
        finally:
            ksam.SINGLE_PROGRAM_MAX_TOKENS = saved

    def sampled_same(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], pi_ref: torch.Tensor) -> bool:
        """SPEC §11 for ``sampled``: the same k; masks identical except draws within PI_RTOL·π of π."""
        u = uniform_hash(seed, 1, torch.arange(pi_ref.numel(), device=pi_ref.device)).reshape(pi_ref.shape)
        band = (u - pi_ref).abs() <= oracle.PI_RTOL * pi_ref
        return int(got[2]) == int(ref[2]) and not bool(((got[0] != ref[0]) & ~band).any())

    ksel = compat.torch_selection_kernels()

    def reference_path() -> Any:
        return compat.force("torch", "reference")

    if not args.smoke:
        if not torch.cuda.is_available():
            sys.exit("error: this benchmark needs a CUDA GPU; use --smoke to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    if not cuda:  # the smoke run exercises the Triton path on CPU tensors (interpreter), for the whole run
        compat.force("torch", "kernel").__enter__()
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# Selection benchmark - {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"ratio {args.ratio} (device tensor)")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def measure(fn: Callable[[], Any]) -> dict[str, Any]:
        """gpu µs (harness, CUDA graph replays), eager ms (harness, CUDA events), cpu µs per enqueue (harness,
        host clock), sync (bool)."""
        out: dict[str, Any] = {}
        fn()
        sync()
        if cuda:
            err = None
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            except RuntimeError as e:  # a synchronising call raises in this mode
                err = str(e)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            out["sync"] = err is not None
            sync()
            try:
                out["gpu_us"] = 1e3 * hmeasure(fn, framework="torch", cuda_graph=True,
                                               budget_ms=args.rep_ms).median_ms
            except Exception as e:  # noqa: BLE001 - capture fails for synchronising calls: report, go on
                out["gpu_us"] = None
                out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.synchronize()
            out["eager_ms"] = hmeasure(fn, framework="torch", warmup=5, budget_ms=args.rep_ms).median_ms
            sync()
            out["cpu_us"] = 1e3 * hmeasure(fn, framework="host", warmup=0, reps=50).median_ms  # enqueue only
            sync()
        else:
            out.update(sync=False, gpu_us=None, cpu_us=None,
                       eager_ms=hmeasure(fn, framework="torch", device="cpu", warmup=0, reps=1).median_ms)
        return out

    # ---------------------------------------------------------------------------------- oracle sanity
    rng = np.random.default_rng(0)
    d_small = rng.choice(np.array([0.0, -0.0, 1.0, 2.5, -np.inf, np.inf, np.nan, 0.3], np.float32), 997)
    d_small = d_small.reshape(997)
    e_small = rng.random(997) < 0.85
    oracle_ok = True
    for strategy in STRATEGIES:
        m_o, k_o = oracle.select_tokens(d_small, e_small, np.float32(args.ratio), strategy, 4, 2)
        for bits in (32, 64):
            with compat.torch_sort_key_bits(bits):
                m, k = select_tokens(torch.from_numpy(d_small).to(device), torch.from_numpy(e_small).to(device),
                                     torch.tensor(args.ratio, device=device), selection=strategy,
                                     min_tokens_per_sequence=2)
            oracle_ok &= int(k) == k_o and np.array_equal(m.cpu().numpy(), m_o)
        with reference_path():
            m, k = select_tokens(torch.from_numpy(d_small).to(device), torch.from_numpy(e_small).to(device),
                                         torch.tensor(args.ratio, device=device), selection=strategy,
                                         min_tokens_per_sequence=2)
        oracle_ok &= int(k) == k_o and np.array_equal(m.cpu().numpy(), m_o)
    print(f"oracle check (997 tokens, ties, ±0, ±inf, NaN; triton int32/int64 keys and torch path): "
          f"{'PASS' if oracle_ok else 'FAIL'}")

    # ------------------------------------------------------------------------------------ the shapes
    shapes: list[tuple[int, ...]] = [(n,) for n in args.sizes] + [tuple(args.batch)]
    results: list[dict[str, Any]] = []
    summary: list[str] = []
    gen = torch.Generator(device=device).manual_seed(1)
    ratio_t = torch.tensor(args.ratio, dtype=torch.float32, device=device)
    for shape in shapes:
        n_tok = int(np.prod(shape))
        d = 8.0 + 2.0 * torch.randn(shape, generator=gen, device=device)
        tie_src = torch.randint(0, n_tok, (n_tok // 20,), generator=gen, device=device)
        tie_dst = torch.randint(0, n_tok, (n_tok // 20,), generator=gen, device=device)
        d.view(-1)[tie_dst] = d.view(-1)[tie_src]                          # exact ties
        e = torch.rand(shape, generator=gen, device=device) > 0.1
        label = "x".join(map(str, shape))
        rows: list[dict[str, Any]] = []

        def record(name: str, fn: Callable[[], Any], exact: Optional[bool] = None, **extra: Any) -> dict[str, Any]:
            r = measure(fn)
            r.update(name=name, shape=label, exact=exact, **extra)
            rows.append(r)
            return r

        # references: the PyTorch path
        ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with reference_path():
            for strategy in STRATEGIES:
                ref[strategy] = select_tokens(d, e, ratio_t, selection=strategy)

        def same(strategy: str, got: tuple[torch.Tensor, torch.Tensor]) -> bool:
            m_r, k_r = ref[strategy]
            return bool(torch.equal(got[0], m_r)) and int(got[1]) == int(k_r)

        for strategy in STRATEGIES:
            fn = (lambda s=strategy: select_tokens(d, e, ratio_t, selection=s))
            record(f"select_tokens {strategy} (triton, int32 key)", fn, same(strategy, fn()), strategy=strategy,
                   path="triton32")
        with compat.torch_sort_key_bits(64):
            for strategy in ("topk", "stratified"):
                fn = (lambda s=strategy: select_tokens(d, e, ratio_t, selection=s))
                record(f"select_tokens {strategy} (triton, int64 key)", fn, same(strategy, fn()), strategy=strategy,
                       path="triton64")
        with reference_path():
            for strategy in STRATEGIES:
                record(f"select_tokens {strategy} (pytorch path)",
                       lambda s=strategy: select_tokens(d, e, ratio_t, selection=s), True,
                       strategy=strategy, path="torch")
        # SPEC §7.4: the sampled selection, Triton sampler (CUDA default) and PyTorch path
        with reference_path():
            sampled_ref = sample_tokens(d, e, ratio_t, step=1)
            pi_ref = sampling_probabilities(d, e, sampled_ref[2], power=power, uniform_mix=mix)
        fn_s = (lambda: sample_tokens(d, e, ratio_t, step=1))
        multi_default = ksam is not None and ksam.multi_program(n_tok)
        record("sample_tokens sampled (triton)", fn_s, sampled_same(fn_s(), sampled_ref, pi_ref),
               strategy="sampled", path="triton32")
        with sampler_path(multi=not multi_default):   # the other Triton path, to tune the switch between them
            record(f"sample_tokens sampled (triton, {'one-program' if multi_default else 'multi-program'})", fn_s,
                   sampled_same(fn_s(), sampled_ref, pi_ref), strategy="sampled", path="triton-other")
        with reference_path():
            record("sample_tokens sampled (pytorch path)", fn_s, True, strategy="sampled", path="torch")

        # building blocks
        flat_d, flat_e = d.reshape(-1), e.reshape(-1)
        record("  validation (select_tokens' argument checks)", lambda: compat.torch_selection_check(d, e))
        n_dev = flat_e.sum()
        record("  ratio -> k (num_selected, device)", lambda: num_selected(n_dev, ratio_t))
        key32 = torch.empty((n_tok,), dtype=torch.int32, device=device)
        key64 = torch.empty((n_tok,), dtype=torch.int64, device=device)
        record("  triton keys kernel (int32)", lambda: ksel.launch_keys(flat_d, flat_e, key32))
        ksel.launch_keys(flat_d, flat_e, key64)
        ints = torch.empty((8,), dtype=torch.int64, device=device)
        floats = torch.empty((8,), dtype=torch.float32, device=device)
        record("  triton plan kernel (n, k)", lambda: ksel.launch_plan(ints, floats, None, n_tok, key=key32,
                                                                      ratio=ratio_t.reshape(1)))
        order = ksel.sort_order(key32)
        mask = torch.empty((n_tok,), dtype=torch.bool, device=device)
        record("  triton mask kernel (topk)", lambda: ksel.launch_mask(order, ints, None, mask))
        fkey = torch.where(flat_e, flat_d, torch.full_like(flat_d, float("-inf")))
        o32 = torch.sort(key32, stable=True).indices
        sorts = [
            ("sort int32 key, stable", "i32 stable", lambda: torch.sort(key32, stable=True), True),
            ("sort int32 key, unstable", "i32 unstable", lambda: torch.sort(key32, stable=False),
             bool(torch.equal(torch.sort(key32, stable=False).indices[: int(n_dev)], o32[: int(n_dev)]))),
            ("sort float32 key desc, stable", "f32 stable",
             lambda: torch.sort(fkey, descending=True, stable=True), None),
            ("sort float32 key desc, unstable", "f32 unstable",
             lambda: torch.sort(fkey, descending=True, stable=False), None),
            ("sort int64 unique key, unstable", "i64 unstable", lambda: torch.sort(key64, stable=False),
             bool(torch.equal(torch.sort(key64, stable=False).indices, o32))),
            ("sort int64 unique key, stable", "i64 stable", lambda: torch.sort(key64, stable=True), True),
        ]
        for name, short, fn, exact in sorts:
            record(f"  {name}", fn, exact, kind="sort", short=short)
        k_host = int(ref["topk"][1])
        topk_ref = ref["topk"][0].reshape(-1)
        if k_host > 0:
            def topk_mask() -> torch.Tensor:
                idx = torch.topk(key64, k_host, largest=False, sorted=False).indices
                return torch.zeros(n_tok, dtype=torch.bool, device=device).index_fill_(0, idx, True)

            def kth_mask() -> torch.Tensor:
                thr = torch.kthvalue(key64, k_host).values
                return key64 <= thr

            record("  torch.topk on int64 key (host k)", topk_mask, bool(torch.equal(topk_mask(), topk_ref)),
                   kind="hostk")
            record("  torch.kthvalue on int64 key (host k)", kth_mask, bool(torch.equal(kth_mask(), topk_ref)),
                   kind="hostk")
        results += rows

        def fmt(v: Any, f: str) -> str:
            return "-" if v is None else format(v, f)

        print(f"\n## shape {label} ({n_tok} tokens)\n")
        print("| row | gpu µs | eager ms | cpu µs | sync | exact |")
        print("|---|---:|---:|---:|---|---|")
        for r in rows:
            print(f"| {r['name']} | {fmt(r['gpu_us'], '.1f')} | {fmt(r['eager_ms'], '.3f')} | "
                  f"{fmt(r['cpu_us'], '.0f')} | {'YES' if r['sync'] else 'no'} | "
                  f"{'-' if r['exact'] is None else ('yes' if r['exact'] else 'NO')} |")

        by = {r["name"]: r for r in rows}
        t = by["select_tokens topk (triton, int32 key)"]
        p = by["select_tokens topk (pytorch path)"]
        t64 = by.get("select_tokens topk (triton, int64 key)")
        summary.append(f"{label:>9} topk: triton {fmt(t['gpu_us'], '.1f')} µs gpu / {fmt(t['eager_ms'], '.3f')} ms "
                       f"eager / {fmt(t['cpu_us'], '.0f')} µs cpu | torch path {fmt(p['gpu_us'], '.1f')} / "
                       f"{fmt(p['eager_ms'], '.3f')} / {fmt(p['cpu_us'], '.0f')} | int64 keys "
                       f"{fmt(None if t64 is None else t64['gpu_us'], '.1f')} µs gpu")
        summary.append(f"{label:>9} gpu µs triton/torch: " + ", ".join(
            f"{st} {fmt(by[f'select_tokens {st} (triton, int32 key)']['gpu_us'], '.0f')}/"
            f"{fmt(by[f'select_tokens {st} (pytorch path)']['gpu_us'], '.0f')}" for st in STRATEGIES[1:]))
        ts, ps = by["sample_tokens sampled (triton)"], by["sample_tokens sampled (pytorch path)"]
        other = next(r for r in rows if r.get("path") == "triton-other")
        summary.append(f"{label:>9} sampled: triton {fmt(ts['gpu_us'], '.1f')} µs gpu / {fmt(ts['eager_ms'], '.3f')} "
                       f"ms eager / {fmt(ts['cpu_us'], '.0f')} µs cpu | {other['name'].split(', ')[-1][:-1]} "
                       f"{fmt(other['gpu_us'], '.1f')} / {fmt(other['eager_ms'], '.3f')} / "
                       f"{fmt(other['cpu_us'], '.0f')} | torch path {fmt(ps['gpu_us'], '.1f')} / "
                       f"{fmt(ps['eager_ms'], '.3f')} / {fmt(ps['cpu_us'], '.0f')} | SPEC §11 "
                       f"{'yes' if ts['exact'] and other['exact'] else 'NO'}")
        summary.append(f"{label:>9} sorts gpu µs: " + ", ".join(
            f"{r['short']} {fmt(r['gpu_us'], '.0f')}" for r in rows if r.get("kind") == "sort") + "; host-k "
            + ", ".join(f"{r['name'].split()[0].strip()} {fmt(r['gpu_us'], '.0f')}" for r in rows
                        if r.get("kind") == "hostk"))
    bad = [r["name"] for r in results if r.get("exact") is False and "unstable" not in r["name"]]
    synced = [f"{r['shape']} {r['name'].strip()}" for r in results if r.get("sync") and r.get("kind") != "hostk"]
    summary.append(f"oracle check {'PASS' if oracle_ok else 'FAIL'} | not exact: {bad or 'none'} | "
                   f"synchronising: {synced or 'none'}")
    included = {}
    for path in args.include_json:  # the other torch benchmarks of the session: one JSON, one summary
        if not os.path.exists(path):
            included[os.path.basename(path)] = {"summary": [f"MISSING: {path} was not written - that benchmark "
                                                            f"failed, see its traceback earlier in this log"]}
            continue
        with open(path) as f:
            included[os.path.basename(path)] = json.load(f)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "selection_torch", "env": env, "args": vars(args), "oracle_ok": oracle_ok,
                   "results": results, "summary": summary, "included": included}, f, indent=2)
    print(f"\nwrote {args.out}")
    print()
    for name, data in included.items():  # no blank lines: the session shows the last 25 lines of this log
        print(f"SUMMARY {data.get('benchmark', name)}")
        for line in data.get("summary", []):
            print(line)
    print("SUMMARY selection (gpu = CUDA-graph device µs; eager = CUDA-event ms; cpu = enqueue µs/call)")
    for line in summary:
        print(line)
    return 0 if oracle_ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
