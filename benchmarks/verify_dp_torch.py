#!/usr/bin/env python
"""Data-parallel CGGR in PyTorch on several GPUs with NCCL (SPEC §13): correctness, then throughput.

Spawns ``--world`` processes (one GPU each, NCCL; ``NCCL_NVLS_ENABLE=0`` and
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are forced). Every rank generates the same full batch from a seed and
takes its slice, so each rank can compute the single-GPU reference on the concatenated batch itself.

Correctness (PASS/FAIL per check and rank):

1. ``logits_<strategy>``: ``scope="global"`` on ``(B, T, V)`` shards for every selection strategy: the loss
   value equals the single-GPU loss on the concatenated batch, the rank's gradient equals ``W`` times its slice
   of the single-GPU gradient, the selected tokens are identical (a differing selection is only accepted when
   the float32 ratios differ, SPEC §11 level 3), and the metrics are the global ones.
2. ``local_scope``: ``scope="local"`` equals ``cggr_torch.cggr_loss`` on the shard (bit-identical).
3. ``ddp_grads`` / ``fsdp_grads``: a small GPT-2 (built from a config, no download) under DDP and under FSDP2
   ``fully_shard``: the averaged parameter gradients equal the single-GPU gradients of the plain loss on the
   concatenated logits. The reference's logits are computed shard by shard with the same shapes as the ranks,
   so that the selection compares exactly; TF32 is off.
4. ``no_host_sync``: ``torch.cuda.set_sync_debug_mode("error")`` around the global loss's forward and backward.

Throughput (training steps of the GPT-2 with AdamW and bf16 autocast, tokens/s over ``--steps`` timed steps):
one GPU with ``CGGRLoss``; ``W`` GPUs with DDP and ``DistributedCGGRLoss`` in the global and the local scope;
plain cross-entropy on 1 and ``W`` GPUs for comparison; and the loss alone (forward + backward on fixed logits)
in both scopes. The per-GPU batch is the same in every run (weak scaling): the scaling efficiency is
``tokens/s(W GPUs) / (W · tokens/s(1 GPU))``.

    python benchmarks/verify_dp_torch.py                 # 2 GPUs; writes $OUT/dp_check_torch.json if $OUT is set
    python benchmarks/verify_dp_torch.py --smoke         # CPU + gloo, tiny shapes: checks the script only

Exit status: 0 when every check passes, 1 otherwise, 2 when there are fewer GPUs than ``--world``.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"                  # no NVLink SHARP / multicast on the lent machines
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(max |b|, tiny), in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def _tiny_gpt2(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                     n_head=max(1, args.width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1234)
    return GPT2LMHeadModel(cfg).to(device)


class Checks:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception:
            ok, detail = False, traceback.format_exc()
        self.results[name] = {"ok": bool(ok), "detail": detail}
        if self.rank == 0 or not ok:
            print(f"  [rank {self.rank}] {'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


# ------------------------------------------------------------------------------------------- correctness
def check_logits(args, world, rank, device, selection: str, dtype: torch.dtype) -> tuple[bool, str]:
    from cggr_torch import cggr_loss
    from cggr_torch import distributed as D

    gen = torch.Generator(device="cpu").manual_seed(7 + STRATEGIES.index(selection))
    B, T, V = args.check_batch, args.check_seq, args.vocab
    temps = torch.empty(B * world, T, 1).uniform_(0.3, 3.0, generator=gen)
    logits = (torch.randn(B * world, T, V, generator=gen) * 2.0 / temps).to(dtype).to(device)
    targets = torch.randint(0, V, (B * world, T), generator=gen)
    targets[torch.rand(B * world, T, generator=gen) < 0.15] = -100
    targets = targets.to(device)
    cfg = dict(selection=selection, warmup_steps=100, num_strata=3, min_tokens_per_sequence=2)
    step = 60

    x_ref = logits.clone().requires_grad_(True)
    loss_ref, m_ref = cggr_loss(x_ref, targets, step, **cfg)
    loss_ref.backward()
    x = _slice(logits, world, rank).clone().requires_grad_(True)
    loss, met = D.cggr_loss(x, _slice(targets, world, rank), step, scope="global", **cfg)
    loss.backward()

    g_ref = _slice(x_ref.grad, world, rank).float()
    sel_ref = (g_ref != 0).any(-1)
    sel = (x.grad != 0).any(-1)
    same_ratio = float(met["effective_ratio"]) == float(m_ref["effective_ratio"])
    same_sel = bool(torch.equal(sel, sel_ref)) and int(met["tokens_selected"]) == int(m_ref["tokens_selected"])
    loss_err = abs(float(loss.detach()) - float(loss_ref.detach()))
    grad_err = _rel_err(x.grad.float() / world, g_ref)
    grad_tol = 1e-4 if dtype == torch.float32 else 2e-2
    met_ok = all(int(met[k]) == int(m_ref[k]) for k in ("tokens_total", "tokens_nonfinite")) and \
        abs(float(met["avg_confidence"]) - float(m_ref["avg_confidence"])) <= 1e-5
    detail = (f"dtype={dtype}, k={int(met['tokens_selected'])}/{int(met['tokens_total'])}, "
              f"ratio dp={float(met['effective_ratio']):.9g} ref={float(m_ref['effective_ratio']):.9g}, "
              f"loss err={loss_err:.2e}, grad rel err={grad_err:.2e}")
    if not same_sel:
        if same_ratio:
            return False, "selection differs at an identical ratio; " + detail
        return True, "selection differs only through a ulp-different ratio (SPEC §11 level 3); " + detail
    ok = loss_err <= 1e-5 + 1e-4 * abs(float(loss_ref.detach())) and grad_err <= grad_tol and met_ok
    return ok, detail


def check_local(args, world, rank, device) -> tuple[bool, str]:
    from cggr_torch import cggr_loss
    from cggr_torch import distributed as D

    gen = torch.Generator(device="cpu").manual_seed(99 + rank)
    logits = torch.randn(args.check_batch, args.check_seq, args.vocab, generator=gen).to(device)
    targets = torch.randint(0, args.vocab, (args.check_batch, args.check_seq), generator=gen).to(device)
    a, ma = D.cggr_loss(logits, targets, 10, scope="local", warmup_steps=20)
    b, mb = cggr_loss(logits, targets, 10, warmup_steps=20)
    ok = float(a) == float(b) and all(float(ma[k]) == float(mb[k]) for k in mb)
    return ok, f"loss {float(a):.6f} vs {float(b):.6f}"


def _model_grad_check(args, world, rank, device, wrap: str) -> tuple[bool, str]:
    from cggr_torch import cggr_loss, shift_for_causal_lm
    from cggr_torch import distributed as D

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = _tiny_gpt2(args, device)
    ref_model = copy.deepcopy(base)
    gen = torch.Generator(device="cpu").manual_seed(5)
    B, T = args.check_batch, args.check_seq
    ids = torch.randint(0, args.vocab, (B * world, T), generator=gen).to(device)
    labels = ids.clone()
    labels[:, -3:] = -100
    cfg = dict(warmup_steps=50, selection="topk")
    step = 30
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(base, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in base.transformer.h:
            fully_shard(block)
        model = fully_shard(base)
    logits = model(_slice(ids, world, rank)).logits
    lg, tg = shift_for_causal_lm(logits, _slice(labels, world, rank))
    loss, met = D.cggr_loss(lg, tg, step, scope="global", **cfg)
    loss.backward()
    if wrap == "ddp":
        got = {n.removeprefix("module."): p.grad.detach().float() for n, p in model.named_parameters()}
    else:
        got = {n: p.grad.full_tensor().detach().float() for n, p in model.named_parameters()}
    # Reference: one GPU, the plain loss on the concatenated batch. Its logits are computed shard by shard
    # with the ranks' shapes (bit-identical logits, so the selection compares exactly).
    ref_logits = torch.cat([ref_model(_slice(ids, world, r)).logits for r in range(world)])
    rl, rt = shift_for_causal_lm(ref_logits, labels)
    ref_loss, ref_met = cggr_loss(rl, rt, step, **cfg)
    ref_loss.backward()
    ref = {n: p.grad.detach().float() for n, p in ref_model.named_parameters()}
    errs = {n: _rel_err(got[n], ref[n]) for n in ref if n in got}
    worst = max(errs, key=errs.get)
    same_k = int(met["tokens_selected"]) == int(ref_met["tokens_selected"])
    loss_err = abs(float(loss.detach()) - float(ref_loss.detach()))
    ok = same_k and errs[worst] <= 1e-3 and loss_err <= 1e-4 and len(errs) == len(ref)
    return ok, (f"{wrap}: {len(errs)} parameters, worst rel err {errs[worst]:.2e} ({worst}), "
                f"loss err {loss_err:.2e}, k={int(met['tokens_selected'])} vs {int(ref_met['tokens_selected'])}")


def check_no_sync(args, world, rank, device) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, "skipped (not CUDA)"
    from cggr_torch.distributed import DistributedCGGRLoss

    crit = DistributedCGGRLoss(warmup_steps=10, selection="stratified")
    logits = torch.randn(args.check_batch, args.check_seq, args.vocab, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.check_batch, args.check_seq), device=device)
    crit(logits.detach(), targets)                     # warm-up (kernel compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = crit(logits, targets)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True, f"forward + backward without a host synchronisation (loss {float(loss.detach()):.4f})"


# -------------------------------------------------------------------------------------------- throughput
def _train_tps(args, world, rank, device, *, ddp: bool, loss_kind: str) -> float:
    """Tokens per second (all ranks) of GPT-2 training steps; ``loss_kind`` in global/local/plain/ce."""
    import torch.nn.functional as F

    from cggr_torch import CGGRLoss, shift_for_causal_lm
    from cggr_torch.distributed import DistributedCGGRLoss

    torch.backends.cuda.matmul.allow_tf32 = True
    model = _tiny_gpt2(args, device)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if loss_kind in ("global", "local"):
        crit = DistributedCGGRLoss(scope=loss_kind, warmup_steps=10)
    elif loss_kind == "plain":
        crit = CGGRLoss(warmup_steps=10)
    else:
        crit = None
    gen = torch.Generator(device="cpu").manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            logits = model(ids).logits
        lg, tg = shift_for_causal_lm(logits, ids)
        if crit is None:
            loss = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), tg.reshape(-1))
        else:
            loss = crit(lg, tg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if crit is not None:
            crit.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    return (world if ddp else 1) * args.batch * (args.seq - 1) * args.steps / dt


def _loss_only_ms(args, world, rank, device, scope: str) -> float:
    """Milliseconds of one loss forward + backward on fixed (B, T, V) logits."""
    from cggr_torch import CGGRLoss
    from cggr_torch.distributed import DistributedCGGRLoss

    crit = CGGRLoss(warmup_steps=10) if scope == "single" else DistributedCGGRLoss(scope=scope, warmup_steps=10)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(args.batch, args.seq, args.vocab, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    for _ in range(args.warmup):
        crit(logits, targets).backward()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        crit(logits, targets).backward()
    _sync(device)
    return (time.perf_counter() - t0) / args.steps * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ worker
def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    cuda = not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    init_kw: dict[str, Any] = dict(backend="nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                   rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    if cuda:
        init_kw["device_id"] = device
    dist.init_process_group(**init_kw)
    checks = Checks(rank)
    perf: dict[str, float] = {}
    try:
        for sel in STRATEGIES:
            for dtype in (torch.float32, torch.bfloat16):
                checks.run(f"logits_{sel}_{str(dtype).split('.')[-1]}",
                           lambda sel=sel, dtype=dtype: check_logits(args, world, rank, device, sel, dtype))
        checks.run("local_scope", lambda: check_local(args, world, rank, device))
        checks.run("ddp_grads", lambda: _model_grad_check(args, world, rank, device, "ddp"))
        checks.run("fsdp_grads", lambda: _model_grad_check(args, world, rank, device, "fsdp"))
        checks.run("no_host_sync", lambda: check_no_sync(args, world, rank, device))
        dist.barrier()

        if not args.skip_perf:
            for kind in ("plain", "ce"):
                if rank == 0:
                    perf[f"train_tokens_per_s_1gpu_{kind}"] = _train_tps(args, world, rank, device, ddp=False,
                                                                         loss_kind=kind)
                dist.barrier()
            for kind in ("global", "local", "ce"):
                perf[f"train_tokens_per_s_{world}gpu_{kind}"] = _train_tps(args, world, rank, device, ddp=True,
                                                                          loss_kind=kind)
                dist.barrier()
            if rank == 0:
                perf["loss_ms_1gpu"] = _loss_only_ms(args, world, rank, device, "single")
            dist.barrier()
            for scope in ("global", "local"):
                perf[f"loss_ms_{world}gpu_{scope}"] = _loss_only_ms(args, world, rank, device, scope)
                dist.barrier()
            one = perf.get("train_tokens_per_s_1gpu_plain")
            if one:
                for kind in ("global", "local"):
                    perf[f"scaling_efficiency_{kind}"] = perf[f"train_tokens_per_s_{world}gpu_{kind}"] / (world * one)
            if rank == 0:
                for k, v in perf.items():
                    print(f"  {k:>40}: {v:,.3f}", flush=True)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"checks": checks.results, "perf": perf}, f, indent=1)
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per throughput run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="sequences per GPU in the throughput runs")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--check-batch", type=int, default=4, dest="check_batch")
    p.add_argument("--check-seq", type=int, default=128, dest="check_seq")
    p.add_argument("--skip-perf", action="store_true", dest="skip_perf")
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny shapes (checks the script only)")
    p.add_argument("--out", default=None, help="JSON report (default: $OUT/dp_check_torch.json when $OUT is set)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq, args.vocab = 2, 1, 2, 16, 64
        args.width, args.layers, args.check_batch, args.check_seq = 64, 2, 2, 12
    elif torch.cuda.device_count() < args.world:
        print(f"needs {args.world} CUDA GPUs, found {torch.cuda.device_count()}")
        return 2
    print(f"torch {torch.__version__}, world {args.world}, {'CPU/gloo smoke' if args.smoke else 'CUDA/NCCL'}; "
          f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}, "
          f"TORCH_SYMM_MEM_DISABLE_MULTICAST={os.environ['TORCH_SYMM_MEM_DISABLE_MULTICAST']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.world, _free_port(), args, tmp), nprocs=args.world,
                           start_method="spawn", join=True)
        reports = []
        for r in range(args.world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                reports.append(json.load(f))
    failed = sorted({name for rep in reports for name, res in rep["checks"].items() if not res["ok"]})
    summary = {"world": args.world, "smoke": args.smoke, "failed": failed, "ranks": reports,
               "args": vars(args), "torch": torch.__version__}
    out = args.out or (os.path.join(os.environ["OUT"], "dp_check_torch.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"report written to {out}")
    n_checks = len(reports[0]["checks"])
    print(f"{'FAIL' if failed else 'PASS'}: {n_checks - len(failed)}/{n_checks} checks passed on every rank"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
