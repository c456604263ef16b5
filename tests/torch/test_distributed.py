"""Data-parallel CGGR (SPEC §13) with torch.distributed on CPU (gloo), 2 and 3 processes.

Every worker process generates the same full batch from a seed and takes its rank's slice. The references are
computed on the *concatenated* batch in the same process:

* the float64 oracle fed with the package's own float32 difficulties of every slice (so the selection is
  compared exactly, SPEC §11 level 1) for the global selection, loss, ∂loss/∂logits and metrics;
* the single-process ``cggr_torch.cggr_loss`` on the concatenated batch for parameter gradients under DDP and
  FSDP (the DDP/FSDP gradient average must equal it).

One ``spawn`` per world size runs all cases; each case reports ``"ok"`` or its failure per rank, and the
pytest tests below assert on those reports (a failure on any rank fails the test).
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback
from typing import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cggr_torch import CGGRLoss
from cggr_torch import cggr_loss as plain_cggr_loss
from cggr_torch import distributed as D
from cggr_torch.scoring import score_tokens
from tests import oracle
from tests.torch import as_f64, random_logits, random_targets

GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}


# ------------------------------------------------------------------------------------------- worker helpers
def _slice(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _batch(seed: int, world: int, shape_r: tuple[int, ...], V: int, dtype: torch.dtype = torch.float32,
           p_ignore: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The full (concatenated) batch: ``shape_r``'s leading dim times ``world``."""
    rng = np.random.default_rng(seed)
    full = (shape_r[0] * world,) + tuple(shape_r[1:])
    return random_logits(rng, full + (V,), dtype), random_targets(rng, full, V, p_ignore=p_ignore)


def _gather(values: list, world: int) -> list:
    everyone: list = [None] * world
    dist.all_gather_object(everyone, values)
    return everyone


class _Soft:
    """Collects the failures of the sub-checks of a case, so that every rank runs every sub-check (and
    every collective in it) whatever fails; raises once at the end."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def run(self, label: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            self.errors.append(f"[{label}]\n{traceback.format_exc()}")

    def done(self) -> None:
        if self.errors:
            raise AssertionError("\n".join(self.errors))


def _check_global(logits: torch.Tensor, targets: torch.Tensor, step: int, world: int, rank: int,
                  **cfg) -> dict:
    """Run the global-scope loss on this rank's slice and compare with the oracle on the full batch."""
    x = _slice(logits, world, rank).detach().clone().requires_grad_(True)
    t = _slice(targets, world, rank)
    loss, met = D.cggr_loss(x, t, step, scope="global", **cfg)
    loss.backward()
    # The only other collective of a check, before any assertion (a failing rank must not desynchronise).
    everyone: list = [None] * world
    dist.all_gather_object(everyone, [float(loss.detach())] + [float(met[k]) for k in met
                                                               if k != "tokens_selected_local"])
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert x.grad is not None and x.grad.dtype == logits.dtype and torch.isfinite(x.grad).all()

    scoring = cfg.get("scoring", "combined")
    selection = cfg.get("selection", "stratified")
    parts = [score_tokens(_slice(logits, world, r), _slice(targets, world, r), scoring=scoring) for r in range(world)]
    d_cat = torch.cat([p.difficulty for p in parts]).numpy()
    e_cat = torch.cat([p.eligible for p in parts]).numpy()
    ratio_dp = np.float32(met["effective_ratio"])
    mask_ref, k_ref = oracle.select_tokens(d_cat, e_cat, ratio_dp, selection=selection,
                                           num_strata=cfg.get("num_strata", 4),
                                           min_tokens_per_sequence=cfg.get("min_tokens_per_sequence", 1))
    ref = oracle.cggr_loss(as_f64(logits), targets.numpy(), step, difficulty_override=d_cat, **cfg)
    assert abs(float(ratio_dp) - float(ref["ratio"])) <= 1e-6, (ratio_dp, ref["ratio"])
    np.testing.assert_array_equal(ref["mask"], mask_ref)

    mask_r = _slice(torch.from_numpy(mask_ref), world, rank).numpy()
    assert int(met["tokens_selected"]) == int(mask_ref.sum())
    assert int(met["tokens_selected_local"]) == int(mask_r.sum())
    assert int(met["world_size"]) == world
    # The rank's gradient is W times its slice of the single-device gradient (DDP divides by W).
    atol, rtol = GRAD_TOL[logits.dtype]
    g_ref = world * _slice(torch.from_numpy(ref["grad"]), world, rank).numpy()
    np.testing.assert_allclose(as_f64(x.grad), g_ref, atol=world * atol, rtol=rtol)
    assert (x.grad[~torch.from_numpy(mask_r)] == 0).all()
    np.testing.assert_allclose(float(loss.detach()), ref["loss"], atol=1e-5, rtol=1e-4)

    om = ref["metrics"]
    for key in ("step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(met[key]) == om[key], (key, int(met[key]), om[key])
    for key, tol in (("token_ratio", 0.0), ("avg_confidence", 1e-5), ("avg_entropy", 1e-4),
                     ("avg_difficulty", 3e-4)):
        assert abs(float(met[key]) - om[key]) <= tol + 1e-5 * abs(om[key]), (key, float(met[key]), om[key])
    for r, v in enumerate(everyone):
        assert v == everyone[0], f"rank {r} reports {v}, rank 0 reports {everyone[0]}"
    return {"loss": loss, "metrics": met, "grad": x.grad, "ref": ref, "mask_r": mask_r}


# ---------------------------------------------------------------------------------------------------- cases
def case_strategies_3d(rank: int, world: int) -> None:
    """Every strategy and scoring mode on (B, T, V) shards with odd sizes and ignored targets."""
    configs = [
        dict(selection="topk", scoring="combined"),
        dict(selection="stratified", scoring="entropy", num_strata=3),
        dict(selection="sequence_aware", scoring="margin", min_tokens_per_sequence=2),
        dict(selection="fixed_quota", scoring="loss", min_tokens_ratio=0.3),
        dict(selection="topk", scoring="combined", dynamic_threshold=False, warmup_steps=0),
    ]
    soft = _Soft()
    for i, cfg in enumerate(configs):
        logits, targets = _batch(100 + i, world, (2, 7), V=11)
        soft.run(str(cfg), lambda: _check_global(logits, targets, step=7 + 3 * i, world=world, rank=rank,
                                                 **{"warmup_steps": 20, **cfg}))
    soft.done()


def case_flat_2d(rank: int, world: int) -> None:
    """(N, V) shards: the concatenation is one sequence of W·N tokens (matters for sequence_aware)."""
    soft = _Soft()
    for i, cfg in enumerate([dict(selection="sequence_aware", min_tokens_per_sequence=3),
                             dict(selection="topk"), dict(selection="stratified", num_strata=2)]):
        logits, targets = _batch(200 + i, world, (9,), V=5)
        soft.run(str(cfg), lambda: _check_global(logits, targets, step=30, world=world, rank=rank,
                                                 warmup_steps=40, **cfg))
    soft.done()


def case_half_precision(rank: int, world: int) -> None:
    soft = _Soft()
    for i, dtype in enumerate((torch.bfloat16, torch.float16)):
        logits, targets = _batch(300 + i, world, (3, 5), V=13, dtype=dtype)
        soft.run(str(dtype), lambda: _check_global(logits, targets, step=11, world=world, rank=rank,
                                                   warmup_steps=16))
    soft.done()


def case_nonfinite_and_ignored(rank: int, world: int) -> None:
    """NaN / +inf / all-−inf rows, a −inf target logit, masked −inf entries, and one fully ignored rank."""
    logits, targets = _batch(400, world, (2, 6), V=7)
    logits[0, 1, 3] = float("nan")
    logits[0, 2, :] = float("-inf")
    logits[1, 0, 2] = float("inf")
    logits[1, 4, :3] = float("-inf")            # masked entries: still a finite row
    logits[-1, 3, 5] = float("-inf")
    targets[0, 1], targets[0, 2], targets[1, 0] = 1, 2, 2
    targets[1, 4], targets[-1, 3] = 4, 5          # valid target on a −inf logit: nll = +inf, not finite
    B = logits.shape[0] // world
    targets[B:2 * B] = -100                       # rank 1 has no valid token at all
    res = _check_global(logits, targets, step=9, world=world, rank=rank, warmup_steps=10)
    # rows 0-1 (rank 0) hold three non-finite valid tokens; the last row's belongs to rank 1 (ignored) at W = 2
    assert int(res["metrics"]["tokens_nonfinite"]) == (3 if world == 2 else 4)
    if rank == 1:
        assert int(res["metrics"]["tokens_selected_local"]) == 0
        assert (res["grad"] == 0).all()


def case_all_ignored(rank: int, world: int) -> None:
    """Nothing selectable anywhere: loss 0.0, all-zero gradient, zero counts, never NaN."""
    logits, targets = _batch(500, world, (2, 4), V=6)
    targets[:] = -100
    x = _slice(logits, world, rank).clone().requires_grad_(True)
    loss, met = D.cggr_loss(x, _slice(targets, world, rank), 3, scope="global")
    loss.backward()
    assert float(loss.detach()) == 0.0 and (x.grad == 0).all()
    assert int(met["tokens_total"]) == 0 and int(met["tokens_selected"]) == 0
    assert float(met["avg_confidence"]) == 0.0 and float(met["avg_difficulty"]) == 0.0
    # Empty shards (T = 0) on every rank are legal too.
    e = torch.zeros(2, 0, 6, requires_grad=True)
    loss, met = D.cggr_loss(e, torch.zeros(2, 0, dtype=torch.int64), 3, scope="global")
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(met["tokens_total"]) == 0


class _TinyLM(nn.Module):
    def __init__(self, V: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _ids_and_targets(seed: int, world: int, B: int, T: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, V, size=(B * world, T)))
    return ids, random_targets(rng, (B * world, T), V, p_ignore=0.2)


def _reference_grads(model: nn.Module, fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    fn(model).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for n in ref:
        np.testing.assert_allclose(got[n].double().numpy(), ref[n].double().numpy(), atol=1e-6, rtol=1e-4,
                                   err_msg=n)


def case_ddp(rank: int, world: int) -> None:
    """DDP's averaged parameter gradients equal the single-process gradient on the concatenated batch
    (global scope), or the mean of the per-shard CGGR losses' gradients (local scope)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    V, B, T, step = 17, 2, 6, 5
    ids, targets = _ids_and_targets(600, world, B, T, V)
    cfg = dict(warmup_steps=8, selection="stratified", num_strata=2)
    torch.manual_seed(0)
    ref_model = _TinyLM(V)
    soft = _Soft()
    for scope in ("global", "local"):
        model = _TinyLM(V)
        model.load_state_dict(ref_model.state_dict())
        ddp = DDP(model)
        loss, _ = D.cggr_loss(ddp(_slice(ids, world, rank)), _slice(targets, world, rank), step, scope=scope, **cfg)
        loss.backward()
        got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

        def compare(scope: str = scope, loss: torch.Tensor = loss, got: dict = got) -> None:
            if scope == "global":
                ref = _reference_grads(ref_model, lambda m: plain_cggr_loss(m(ids), targets, step, **cfg)[0])
                full_loss = plain_cggr_loss(ref_model(ids), targets, step, **cfg)[0]
                np.testing.assert_allclose(float(loss.detach()), float(full_loss.detach()), atol=1e-6, rtol=1e-5)
            else:
                def mean_of_shards(m: nn.Module) -> torch.Tensor:
                    losses = [plain_cggr_loss(m(_slice(ids, world, r)), _slice(targets, world, r), step, **cfg)[0]
                              for r in range(world)]
                    return torch.stack(losses).mean()
                ref = _reference_grads(ref_model, mean_of_shards)
                own = plain_cggr_loss(ref_model(_slice(ids, world, rank)), _slice(targets, world, rank), step,
                                      **cfg)[0]
                assert float(loss.detach()) == float(own.detach())  # local: this shard's own loss
            _assert_grads(got, ref)

        soft.run(scope, compare)
    soft.done()


def case_fsdp(rank: int, world: int) -> None:
    """FSDP2 (``fully_shard``): the averaged, sharded gradients equal the single-process gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    V, B, T, step = 13, 2, 5, 3
    ids, targets = _ids_and_targets(700, world, B, T, V)
    torch.manual_seed(1)
    ref_model = _TinyLM(V)
    model = _TinyLM(V)
    model.load_state_dict(ref_model.state_dict())
    # A CPU mesh: on a CUDA machine fully_shard would otherwise move the model to the GPU, while this world
    # talks over gloo with CPU inputs (the GPU data-parallel checks are benchmarks/verify_dp_torch.py).
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    loss, _ = D.cggr_loss(model(_slice(ids, world, rank)), _slice(targets, world, rank), step, warmup_steps=6)
    loss.backward()
    got = {n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}
    ref = _reference_grads(ref_model, lambda m: plain_cggr_loss(m(ids), targets, step, warmup_steps=6)[0])
    _assert_grads(got, ref)


def case_module(rank: int, world: int) -> None:
    """DistributedCGGRLoss: forward / step() / get_metrics() / state_dict over a few steps."""
    crit = D.DistributedCGGRLoss(warmup_steps=4, selection="sequence_aware", min_tokens_per_sequence=1)
    assert crit.scope == "global" and "scope='global'" in repr(crit)
    before = crit.get_metrics()
    assert before["tokens_selected"] == 0 and before["scope"] == "global" and before["world_size"] == world
    soft = _Soft()
    for step in range(3):
        logits, targets = _batch(800 + step, world, (2, 5), V=9)
        x = _slice(logits, world, rank).clone().requires_grad_(True)
        loss = crit(x, _slice(targets, world, rank))
        loss.backward()
        m = crit.get_metrics()
        func, fmet = D.cggr_loss(x.detach(), _slice(targets, world, rank), step, warmup_steps=4,
                                 selection="sequence_aware", min_tokens_per_sequence=1)
        everyone = _gather([v for k, v in m.items() if k != "tokens_selected_local"], world)

        def compare(step: int = step, loss: torch.Tensor = loss, m: dict = m, func: torch.Tensor = func,
                    fmet: dict = fmet, everyone: list = everyone) -> None:
            assert m["step"] == step and m["selection"] == "sequence_aware" and m["scope"] == "global"
            assert float(loss.detach()) == float(func)
            assert m["tokens_selected"] == int(fmet["tokens_selected"])
            assert m["tokens_selected_local"] == int(fmet["tokens_selected_local"])
            assert all(v == everyone[0] for v in everyone), everyone

        soft.run(f"step {step}", compare)
        crit.step()
    soft.done()
    state = crit.state_dict()
    fresh = D.DistributedCGGRLoss(warmup_steps=4)
    fresh.load_state_dict(state)
    assert fresh.current_step == 3


def case_local_scope(rank: int, world: int) -> None:
    """scope='local' is exactly CGGRLoss on the shard: same loss, gradient and metrics, no communication."""
    logits, targets = _batch(900, world, (3, 4), V=8)
    xs = [_slice(logits, world, rank).clone().requires_grad_(True) for _ in range(2)]
    t = _slice(targets, world, rank)
    crit = D.DistributedCGGRLoss(scope="local", warmup_steps=5)
    plain = CGGRLoss(warmup_steps=5)
    a, b = crit(xs[0], t), plain(xs[1], t)
    a.backward()
    b.backward()
    assert float(a.detach()) == float(b.detach())
    assert torch.equal(xs[0].grad, xs[1].grad)
    ma, mb = crit.get_metrics(), plain.get_metrics()
    for key, value in mb.items():
        assert ma[key] == value, key
    assert ma["tokens_selected_local"] == ma["tokens_selected"] and ma["scope"] == "local"


def case_consistency_errors(rank: int, world: int) -> None:
    """Ranks that disagree on the shape or on the step get a ValueError on every rank (no hang)."""
    logits, targets = _batch(1000, world, (2, 3), V=5)
    x, t = _slice(logits, world, rank), _slice(targets, world, rank)
    with pytest.raises(ValueError, match="same curriculum step"):
        D.cggr_loss(x, t, 4 + (rank == 0), scope="global")
    extra = 1 if rank == world - 1 else 0
    x2 = torch.cat([x, x[:extra]]) if extra else x
    t2 = torch.cat([t, t[:extra]]) if extra else t
    with pytest.raises(ValueError, match=r"rank 0: logits \(2, 3, 5\)"):
        D.cggr_loss(x2, t2, 4, scope="global")
    # With the check off, equal shapes and steps give the same result as with it on.
    a, _ = D.cggr_loss(x, t, 4, scope="global", check_consistency=False)
    b, _ = D.cggr_loss(x, t, 4, scope="global")
    assert float(a.detach()) == float(b.detach())


CASES: dict[str, Callable[[int, int], None]] = {
    "strategies_3d": case_strategies_3d,
    "flat_2d": case_flat_2d,
    "half_precision": case_half_precision,
    "nonfinite_and_ignored": case_nonfinite_and_ignored,
    "all_ignored": case_all_ignored,
    "ddp": case_ddp,
    "fsdp": case_fsdp,
    "module": case_module,
    "local_scope": case_local_scope,
    "consistency_errors": case_consistency_errors,
}
WORLD_CASES: dict[int, tuple[str, ...]] = {
    2: tuple(CASES),
    # DDP's first construction imports torch._dynamo (slow); world 3 checks the gradient shares directly.
    3: ("strategies_3d", "nonfinite_and_ignored", "flat_2d", "half_precision", "fsdp"),
}


def _worker(rank: int, world: int, store: str, out_dir: str, names: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results: dict[str, str] = {}
    try:
        for name in names:
            try:
                CASES[name](rank, world)
                results[name] = "ok"
            except Exception:  # reported to the parent test, which fails
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_RESULTS: dict[int, list[dict[str, str]]] = {}


def _run_world(world: int) -> list[dict[str, str]]:
    """Run every case of ``world`` in one spawn (once per pytest session, failures included)."""
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            crashed = ""
            try:
                mp.start_processes(_worker, args=(world, store, tmp, WORLD_CASES[world]), nprocs=world,
                                   start_method="spawn", join=True)
            except Exception:
                crashed = traceback.format_exc()
            reports = []
            for r in range(world):
                path = os.path.join(tmp, f"rank{r}.json")
                report: dict[str, str] = {}
                if os.path.exists(path):
                    with open(path) as f:
                        report = json.load(f)
                if crashed:
                    report = {name: (report.get(name, "did not run") if report.get(name) == "ok" else
                                     f"{report.get(name, 'did not run')}\nworker crashed:\n{crashed}")
                              for name in WORLD_CASES[world]}
                reports.append(report)
            _RESULTS[world] = reports
    return _RESULTS[world]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@needs_gloo
@pytest.mark.parametrize("world,case", [(w, c) for w, names in WORLD_CASES.items() for c in names])
def test_data_parallel_case(world: int, case: str) -> None:
    reports = _run_world(world)
    failures = [f"rank {r}:\n{rep.get(case, 'did not run')}" for r, rep in enumerate(reports)
                if rep.get(case) != "ok"]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ single-process checks
def test_scope_is_checked() -> None:
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="scope"):
        D.cggr_loss(x, t, 0, scope="everywhere")
    with pytest.raises(ValueError, match="scope"):
        D.DistributedCGGRLoss(scope="GLOBAL")
    with pytest.raises(ValueError, match="check_consistency"):
        D.DistributedCGGRLoss(check_consistency=1)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group is initialised")
def test_global_scope_needs_initialised_process_group() -> None:
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="init_process_group"):
        D.cggr_loss(x, t, 0)
    with pytest.raises(ValueError, match="init_process_group"):
        D.DistributedCGGRLoss()(x, t)


def test_local_scope_without_process_group_is_the_plain_loss() -> None:
    rng = np.random.default_rng(5)
    logits, targets = random_logits(rng, (2, 5, 7)), random_targets(rng, (2, 5), 7)
    a, ma = D.cggr_loss(logits, targets, 3, scope="local", warmup_steps=4)
    b, mb = plain_cggr_loss(logits, targets, 3, warmup_steps=4)
    assert float(a.detach()) == float(b.detach())
    for key, value in mb.items():
        assert float(ma[key]) == float(value), key
    assert int(ma["world_size"]) == 1


def test_bad_inputs_are_rejected_before_any_communication() -> None:
    with pytest.raises(ValueError, match="targets"):
        D.cggr_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="targets"):
        D.cggr_loss(torch.zeros(2, 4), torch.full((2,), 9), 0)
    with pytest.raises(ValueError, match="selection"):
        D.cggr_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 0, selection="random")
