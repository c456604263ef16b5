"""The one-pass Triton scoring kernel (cggr_torch.kernels.scoring) against the float64 oracle.

Runs in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1) or, when the interpreter is off and a GPU
is present, on CUDA. Shapes are small and odd; the launch configs force blocks smaller than V so that every
row has several full blocks and a ragged last block (V = 37, BLOCK = 16: 16 + 16 + 5).
"""
from __future__ import annotations

import os

# tests/conftest.py selects the Triton interpreter on machines without an NVIDIA GPU.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from cggr_torch import scoring as ref_scoring  # noqa: E402
from cggr_torch import selection as ref_selection  # noqa: E402
from cggr_torch.kernels import scoring as ks  # noqa: E402
from tests.torch import assert_range_check_fails, kernel_test_device  # noqa: E402
from tests import oracle  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: log2(0), inf − inf on bad rows

DEVICE = kernel_test_device()

NEG = float("-inf")
V = 37
IGN = -100
CFG = ks.LaunchConfig(rows=4, group=4, num_warps=1)       # BLOCK 16 → blocks of 16, 16, 5
STAT_KEYS = ("lse", "entropy", "confidence", "runner_up", "nll")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def crafted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits (15, 37) with every edge case of SPEC §2, and int64 targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(15, V, generator=g, dtype=torch.float64) * 2.0
    t = torch.randint(0, V, (15,), generator=g)
    x[1, 35] = 15.0                                   # max in the ragged last block
    x[2, 3] = x[2, 20] = 9.0                          # equal maxima in two blocks → p2 = p1
    x[3, 10] = 8.0
    x[3, 2] = x[3, 33] = 6.0                          # runner-up tie across blocks (one in the tail)
    x[4, :16] = NEG                                   # whole first block −∞ (max still −∞ after it)
    x[4, 30] = NEG
    t[4] = 20
    x[5, 32:] = NEG                                   # −∞ in the ragged tail
    x[5, 0] = 5.0
    t[5] = 0
    x[6, :] = NEG                                     # only −∞: not finite
    x[7, 25] = float("nan")                           # NaN: not finite
    x[8, 30] = float("inf")                           # +∞: not finite
    t[9] = 11
    x[9, 11] = NEG                                    # target logit −∞: nll = +∞, not finite
    t[10] = IGN                                       # ignored target: nll = 0, never read
    x[11, :] = NEG                                    # one finite entry: p1 = 1, p2 = 0, H = 0
    x[11, 17] = 2.5
    t[11] = 17
    x[12] += 1000.0                                   # large offset: no cancellation in H / nll
    x[13, :] = 0.75                                   # constant row: p1 = p2 = 1/V, H = log V
    x[14] -= 1000.0
    return x, t


def assert_close_tol(got: np.ndarray, want: np.ndarray, key: str, where: np.ndarray) -> None:
    atol, rtol = oracle.SCORE_TOL[key]
    got = np.asarray(got, dtype=np.float64)[where]
    want = np.asarray(want, dtype=np.float64)[where]
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    assert np.all(err <= bound), f"{key}: max excess {np.max(err - bound):.3e} at rows {np.nonzero(err > bound)[0]}"


def finite_from_stats(st: ref_scoring.TokenStatistics) -> np.ndarray:
    ok = np.ones(st.lse.shape, dtype=bool)
    for k in STAT_KEYS:
        ok &= np.isfinite(getattr(st, k).cpu().numpy())
    return ok


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_statistics_match_oracle(dtype: str) -> None:
    x64, t = crafted()
    x = x64.to(DTYPES[dtype])
    ref = oracle.token_statistics(x.to(torch.float64).numpy(), t.numpy(), IGN)
    st = ks.token_statistics_triton(x.to(DEVICE), t.to(DEVICE), IGN, config=CFG)
    assert isinstance(st, ref_scoring.TokenStatistics)
    fin = ref["row_finite"]
    assert fin.sum() == 11 and not fin[[6, 7, 8, 9]].any()
    for k in STAT_KEYS:
        v = getattr(st, k)
        assert v.dtype == torch.float32 and tuple(v.shape) == (15,)
        assert_close_tol(v.cpu().numpy(), ref[k], k, fin)
    assert np.array_equal(finite_from_stats(st), fin)
    c = st.confidence.cpu()
    r = st.runner_up.cpu()
    assert r[2] == c[2]                                 # tie across blocks: bit-identical p2 = p1
    assert r[11] == 0 and c[11] == 1
    # A one-hot row has entropy 0: exactly in the interpreter; compiled, u = fma(z, log2 e, −c) keeps the
    # rounding residual of the reference c = m·log2 e, so |H| is a few 1e-8 (far inside SPEC §11).
    h11 = float(st.entropy.cpu()[11])
    assert h11 == 0 if DEVICE == "cpu" else abs(h11) <= 1e-6
    assert r[13] == c[13]
    assert st.nll.cpu()[10] == 0                        # ignored target
    assert torch.isposinf(st.nll.cpu()[9])


@pytest.mark.parametrize("cfg", [ks.LaunchConfig(16, 1, 1), ks.LaunchConfig(8, 2, 2), ks.LaunchConfig(2, 8, 1)],
                         ids=["group1", "group2", "group8"])
def test_block_shapes_agree(cfg: ks.LaunchConfig) -> None:
    """Every (ROWS, GROUP) split of a 16-wide block gives the oracle's statistics (per-lane and grouped top-2)."""
    x64, t = crafted(seed=1)
    x = x64.to(torch.float32)
    ref = oracle.token_statistics(x.to(torch.float64).numpy(), t.numpy(), IGN)
    st = ks.token_statistics_triton(x.to(DEVICE), t.to(DEVICE), IGN, config=cfg)
    for k in STAT_KEYS:
        assert_close_tol(getattr(st, k).cpu().numpy(), ref[k], k, ref["row_finite"])
    assert np.array_equal(finite_from_stats(st), ref["row_finite"])
    assert st.runner_up.cpu()[2] == st.confidence.cpu()[2]


def test_default_config_and_poisoned_buffers() -> None:
    """Heuristic launch shape (one ragged block) into NaN / sentinel-filled buffers: every row is written."""
    x64, t = crafted(seed=2)
    x = x64.to(torch.bfloat16).to(DEVICE)
    geom = ks.row_geometry(x)
    out = torch.full((6, 15), float("nan"), dtype=torch.float32, device=DEVICE)
    fin = torch.full((15,), 7, dtype=torch.int8, device=DEVICE)
    ks.launch_scoring(geom, ks.flat_targets(t.to(DEVICE)), IGN, ks.MODE_CODE["combined"], out, fin)
    ref = oracle.score_tokens(x.to(torch.float64).cpu().numpy(), t.numpy(), "combined", IGN)
    rf = ref["stats"]["row_finite"]
    assert set(fin.cpu().tolist()) <= {0, 1}
    assert np.array_equal(fin.cpu().numpy().astype(bool), rf)
    for j, k in enumerate(STAT_KEYS):
        assert_close_tol(out[j].cpu().numpy(), ref["stats"][k], k, rf)
    assert_close_tol(out[5].cpu().numpy(), ref["difficulty"], "difficulty", ref["eligible"])
    assert not torch.isnan(out[:, torch.from_numpy(rf).to(DEVICE)]).any()
    # statistics only (mode −1): the difficulty row is left untouched
    out2 = torch.full((6, 15), float("nan"), dtype=torch.float32, device=DEVICE)
    ks.launch_scoring(geom, None, IGN, -1, out2, fin, CFG)
    assert torch.isnan(out2[5]).all()
    assert (out2[4] == 0).all()                         # no targets: nll = 0


@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss", "combined"])
def test_difficulty_modes(scoring: str) -> None:
    x64, t = crafted(seed=3)
    x = x64.to(torch.float32)
    vm = torch.ones(15, dtype=torch.bool)
    vm[0] = False
    sc = ks.score_tokens_triton(x.to(DEVICE), t.to(DEVICE), scoring=scoring, ignore_index=IGN,
                                valid_mask=vm.to(DEVICE), config=CFG)
    ref = oracle.score_tokens(x.numpy().astype(np.float64), t.numpy(), scoring, IGN, valid_mask=vm.numpy())
    assert np.array_equal(sc.eligible.cpu().numpy(), ref["eligible"])
    assert np.array_equal(sc.valid.cpu().numpy(), ref["valid"])
    assert sc.difficulty.dtype == torch.float32
    assert_close_tol(sc.difficulty.cpu().numpy(), ref["difficulty"], "difficulty", ref["eligible"])
    # the in-kernel difficulty is bit-identical to the reference formula applied to the kernel's statistics
    d_ref = ref_scoring.difficulty_from_statistics(sc.stats, scoring, has_targets=True)
    torch.testing.assert_close(sc.difficulty, d_ref, rtol=0, atol=0, equal_nan=True)


def test_no_targets() -> None:
    x64, _ = crafted(seed=4)
    x = x64.to(torch.float16)
    sc = ks.score_tokens_triton(x.to(DEVICE), None, scoring="combined", config=CFG)
    ref = oracle.score_tokens(x.to(torch.float64).numpy(), None, "combined")
    assert np.array_equal(sc.eligible.cpu().numpy(), ref["eligible"])
    assert sc.valid.all()
    assert (sc.stats.nll == 0).all()
    assert_close_tol(sc.difficulty.cpu().numpy(), ref["difficulty"], "difficulty", ref["eligible"])
    with pytest.raises(ValueError, match="targets"):
        ks.score_tokens_triton(x.to(DEVICE), None, scoring="loss")


def test_strided_views() -> None:
    """A (B, T, V) slice ``logits[:, :-1]`` is read in place; a non-unit last stride is copied, not misread."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 8, V, generator=g).to(torch.bfloat16)
    t = torch.randint(0, V, (2, 7), generator=g)
    t[1, 3] = IGN
    view = full[:, :-1]                                 # strides (8V, V, 1): rows not evenly spaced
    st = ks.token_statistics_triton(view.to(DEVICE), t.to(DEVICE), IGN, config=CFG)
    assert tuple(st.lse.shape) == (2, 7)
    ref = oracle.token_statistics(view.to(torch.float64).numpy(), t.numpy(), IGN)
    for k in STAT_KEYS:
        assert_close_tol(getattr(st, k).cpu().numpy(), ref[k], k, ref["row_finite"])
    # transposed storage: last stride ≠ 1
    base = torch.randn(V, 9, generator=g)
    tt = torch.randint(0, V, (9,), generator=g)
    xt = base.t()
    assert xt.stride(-1) != 1
    st2 = ks.token_statistics_triton(xt.to(DEVICE), tt.to(DEVICE), config=CFG)
    ref2 = oracle.token_statistics(xt.to(torch.float64).numpy(), tt.numpy())
    for k in STAT_KEYS:
        assert_close_tol(getattr(st2, k).cpu().numpy(), ref2[k], k, ref2["row_finite"])


def test_vocab_one_and_empty() -> None:
    x = torch.tensor([[0.5], [-3.0], [NEG]], dtype=torch.float32)
    st = ks.token_statistics_triton(x.to(DEVICE), torch.tensor([0, IGN, 0]).to(DEVICE), IGN)
    ref = oracle.token_statistics(x.numpy().astype(np.float64), np.array([0, IGN, 0]), IGN)
    for k in STAT_KEYS:
        assert_close_tol(getattr(st, k).cpu().numpy(), ref[k], k, ref["row_finite"])
    assert (st.runner_up.cpu()[:2] == 0).all()
    assert np.array_equal(finite_from_stats(st), ref["row_finite"])
    empty = ks.token_statistics_triton(torch.zeros(2, 0, V).to(DEVICE), torch.zeros(2, 0, dtype=torch.long).to(DEVICE))
    assert tuple(empty.lse.shape) == (2, 0)
    sc = ks.score_tokens_triton(torch.zeros(0, V).to(DEVICE))
    assert sc.difficulty.shape == (0,) and sc.eligible.dtype == torch.bool


def test_out_of_range_target_is_never_read() -> None:
    """Past the checks (e.g. after a failed CUDA device assertion) an out-of-range target is not read:
    its nll is NaN and the row is not finite."""
    x = torch.randn(3, V)
    geom = ks.row_geometry(x.to(DEVICE))
    out = torch.full((6, 3), float("nan"), device=DEVICE)
    fin = torch.full((3,), 7, dtype=torch.int8, device=DEVICE)
    t = torch.tensor([V, -5, 4], dtype=torch.int64, device=DEVICE)
    ks.launch_scoring(geom, t, IGN, ks.MODE_CODE["loss"], out, fin, CFG)
    assert torch.isnan(out[4, :2]).all() and torch.isfinite(out[4, 2])
    assert fin.cpu().tolist() == [0, 0, 1]


def test_bad_input() -> None:
    x = torch.randn(4, V, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        ks.token_statistics_triton(torch.ones(4, V, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        ks.token_statistics_triton(torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        ks.token_statistics_triton(torch.randn(4, 0, device=DEVICE))
    with pytest.raises(ValueError, match="targets"):
        ks.token_statistics_triton(x, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="targets"):
        ks.token_statistics_triton(x, torch.zeros(4, device=DEVICE))            # float targets
    # a valid target outside [0, V): ValueError under the interpreter, a device-side assertion on CUDA
    assert_range_check_fails(
        "from cggr_torch.kernels import scoring as ks\n"
        f"ks.token_statistics_triton(torch.randn(4, {V}, device=dev), torch.tensor([0, 1, {V}, 2], device=dev))\n",
        rf"targets: every value must lie in \[0, {V}\)")
    with pytest.raises(ValueError, match="scoring"):
        ks.score_tokens_triton(x, scoring="focal")
    with pytest.raises(ValueError, match="valid_mask"):
        ks.score_tokens_triton(x, valid_mask=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="ignore_index"):
        ks.token_statistics_triton(x, None, 1.5)
    with pytest.raises(ValueError, match="LaunchConfig.rows"):
        ks.LaunchConfig(rows=3, group=4, num_warps=1)
    with pytest.raises(ValueError, match="out"):
        ks.launch_scoring(ks.row_geometry(x), None, IGN, -1, torch.empty(5, 4, device=DEVICE),
                          torch.empty(4, dtype=torch.int8, device=DEVICE))


def test_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU tensor with the interpreter off (switched off here; on a GPU it is off anyway): a ValueError."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        ks.token_statistics_triton(torch.randn(2, V))


def test_heuristics() -> None:
    for dt, group in ((torch.bfloat16, 8), (torch.float16, 8), (torch.float32, 4), (torch.float64, 2)):
        c = ks.scoring_config(128256, dt)
        assert c.group == group and c.block * torch.finfo(dt).bits // 8 == 16 * 128 and c.num_warps == 1
        b = ks.backward_config(128256, dt)
        assert b.block * torch.finfo(dt).bits // 8 == 8192
    small = ks.scoring_config(37, torch.float32)
    assert small.block == 64 and small.rows == 16
    assert ks.backward_config(3, torch.bfloat16).block == 8


def test_few_rows_get_wider_programs_with_the_same_statistics() -> None:
    """A launch of few rows (the fused LM head's blocks) widens each row's program; the statistics agree."""
    base = ks.scoring_config(128256, torch.bfloat16)
    assert ks.scoring_config_for_rows(16384, 128256, torch.bfloat16, 132) == base
    wide = ks.scoring_config_for_rows(896, 128256, torch.bfloat16, 132)
    assert (wide.num_warps, wide.rows, wide.group) == (2, 256, 8) and wide.lazy_top2 == base.lazy_top2
    assert ks.scoring_config_for_rows(1, 128256, torch.bfloat16, 132).num_warps == 8
    assert ks.scoring_config_for_rows(5, 37, torch.float32, 132).rows == 16     # clipped to the row length
    assert ks.scoring_config_for_rows(2, 301, torch.float32, 132).num_warps == 1  # 128 lanes cover the row
    x = torch.randn(6, 1201, dtype=torch.float32) * 4
    x[2, 1200] = 40.0                                  # the row maximum in the ragged last block
    x[4] = float("nan")
    t = torch.tensor([0, 1200, 1200, 5, 7, -100])
    want = ks.token_statistics_triton(x.to(DEVICE), t.to(DEVICE))
    cfg = ks.scoring_config_for_rows(6, 1201, torch.float32, 64)
    assert (cfg.num_warps, cfg.rows) == (4, 512) and cfg.rows > ks.scoring_config(1201, torch.float32).rows
    got = ks.token_statistics_triton(x.to(DEVICE), t.to(DEVICE), config=cfg)
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)


def test_selection_on_kernel_scores_matches_oracle() -> None:
    """Selection given identical float32 scores is identical (SPEC §11 level 1), for every strategy."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 13, V, generator=g) * 2).to(torch.bfloat16)
    t = torch.randint(0, V, (3, 13), generator=g)
    t[0, :4] = IGN
    x[2, 5, 7] = float("nan")
    x[1, 2] = 0.0                                        # exact ties of difficulty
    x[1, 9] = 0.0
    sc = ks.score_tokens_triton(x.to(DEVICE), t.to(DEVICE), scoring="combined", ignore_index=IGN, config=CFG)
    d = sc.difficulty.cpu()
    e = sc.eligible.cpu()
    ref = oracle.score_tokens(x.to(torch.float64).numpy(), t.numpy(), "combined", IGN)
    assert np.array_equal(e.numpy(), ref["eligible"])
    for selection in ("topk", "stratified", "sequence_aware", "fixed_quota"):
        for ratio in (np.float32(0.3375), np.float32(0.25), np.float32(1.0)):
            mask, k = ref_selection.select_tokens(sc.difficulty, sc.eligible, torch.tensor(ratio, device=DEVICE),
                                                  selection=selection, num_strata=3, min_tokens_per_sequence=2)
            m_ref, k_ref = oracle.select_tokens(d.numpy(), e.numpy(), ratio, selection, 3, 2)
            assert int(k) == k_ref
            assert np.array_equal(mask.cpu().numpy(), m_ref), selection


@pytest.mark.parametrize("key_dtype", [torch.int32, torch.int64], ids=["key32", "key64"])
def test_selection_outputs_key_and_status(key_dtype: torch.dtype) -> None:
    """With key/status buffers the kernel also writes the SPEC §6 sort key and the status bits; the
    statistics and the difficulty are unchanged (bit for bit)."""
    from cggr_torch.selection import order_key32

    x64, t = crafted(seed=7)
    x = x64.to(torch.float32)
    x[0] = 0.5                                          # constant rows: equal difficulties (ties), d = ±0 cases
    x[1] = 0.5
    t[0], t[1] = 3, 5
    t[12] = V + 3                                       # out of range: never read, not eligible, status bit 2
    t[13] = -7
    xd, td = x.to(DEVICE), t.to(DEVICE)
    geom = ks.row_geometry(xd)
    tf = ks.flat_targets(td)
    out = torch.full((6, 15), float("nan"), device=DEVICE)
    fin = torch.full((15,), 7, dtype=torch.int8, device=DEVICE)
    key = torch.full((15,), 99, dtype=key_dtype, device=DEVICE)
    status = torch.full((15,), 99, dtype=torch.int8, device=DEVICE)
    ks.launch_scoring(geom, tf, IGN, ks.MODE_CODE["combined"], out, fin, CFG, key=key, status=status)
    plain = torch.full((6, 15), float("nan"), device=DEVICE)
    ks.launch_scoring(geom, tf, IGN, ks.MODE_CODE["combined"], plain, fin, CFG)
    torch.testing.assert_close(out, plain, rtol=0, atol=0, equal_nan=True)
    stats = ref_scoring.TokenStatistics(*(out[j] for j in range(5)))
    finite = torch.ones(15, dtype=torch.bool, device=DEVICE)
    for k in STAT_KEYS:
        finite &= torch.isfinite(getattr(stats, k))
    valid = td != IGN
    eligible = valid & finite & ~torch.isnan(out[5])
    in_range = (td >= 0) & (td < V)
    assert status.cpu().tolist() == (valid.to(torch.int8) | (eligible.to(torch.int8) << 1)
                                     | ((valid & ~in_range).to(torch.int8) << 2)).cpu().tolist()
    assert status.cpu()[[12, 13]].tolist() == [5, 5] and status.cpu()[10] == 0
    want = order_key32(out[5], eligible)
    if key_dtype == torch.int64:
        want = (want.to(torch.int64) << 32) | torch.arange(15, device=DEVICE)
    assert torch.equal(key, want)
    # the key's ascending (stable) order is the oracle's rank order
    order = torch.sort(key, stable=True).indices.cpu().numpy()
    rank = oracle.rank_tokens(out[5].cpu().numpy(), eligible.cpu().numpy())
    n = int(eligible.sum())
    assert rank[order[:n]].tolist() == list(range(n)) and (rank[order[n:]] == -1).all()
    with pytest.raises(ValueError, match="key"):
        ks.launch_scoring(geom, tf, IGN, -1, out, fin, CFG, key=key, status=status)
    with pytest.raises(ValueError, match="status"):
        ks.launch_scoring(geom, tf, IGN, 3, out, fin, CFG, key=key, status=status.to(torch.int32))


@pytest.mark.parametrize("cfg", [ks.LaunchConfig(4, 4, 1, persistent=1), ks.LaunchConfig(4, 4, 1, persistent=3),
                                 ks.LaunchConfig(4, 4, 1, evict=""), ks.LaunchConfig(4, 4, 1, evict="evict_last")],
                         ids=["persistent1", "persistent3", "no-evict-hint", "evict-last"])
def test_launch_variants_are_bit_identical(cfg: ks.LaunchConfig) -> None:
    """Persistent grids and eviction hints change the schedule, not the arithmetic."""
    x64, t = crafted(seed=8)
    x = x64.to(torch.bfloat16).to(DEVICE)
    sc = ks.score_tokens_triton(x, t.to(DEVICE), ignore_index=IGN, config=CFG)
    sv = ks.score_tokens_triton(x, t.to(DEVICE), ignore_index=IGN, config=cfg)
    torch.testing.assert_close(sv.difficulty, sc.difficulty, rtol=0, atol=0, equal_nan=True)
    for k in STAT_KEYS:
        torch.testing.assert_close(getattr(sv.stats, k), getattr(sc.stats, k), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(sv.eligible, sc.eligible)


@pytest.mark.parametrize("rows,group", [(4, 4), (16, 1), (2, 8)], ids=["4x4", "16x1", "2x8"])
def test_lazy_top2_is_bit_identical(rows: int, group: int) -> None:
    """The lazy runner-up (block top-2 only when the block can change it) equals the per-lane top-2 exactly:
    ties across blocks, a tie with the maximum in a later block, −∞ blocks, an ascending row (every block
    raises the runner-up) and a descending row (no block after the first does)."""
    x64, t = crafted(seed=10)
    x64[0] = torch.arange(V, dtype=torch.float64)                  # ascending: the slow path every block
    x64[13] = -torch.arange(V, dtype=torch.float64)                # descending: the fast path after block 0
    x64[14, 3] = x64[14, 30] = x64[14].max() + 1.0                 # equal maxima in the first and last block
    x = x64.to(torch.float32).to(DEVICE)
    base = ks.LaunchConfig(rows, group, 1)
    lazy = ks.LaunchConfig(rows, group, 1, lazy_top2=True)
    a = ks.score_tokens_triton(x, t.to(DEVICE), ignore_index=IGN, config=base)
    b = ks.score_tokens_triton(x, t.to(DEVICE), ignore_index=IGN, config=lazy)
    for k in STAT_KEYS:
        torch.testing.assert_close(getattr(b.stats, k), getattr(a.stats, k), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.difficulty, a.difficulty, rtol=0, atol=0, equal_nan=True)
    assert b.stats.runner_up[14] == b.stats.confidence[14]
    ref = oracle.token_statistics(x64.to(torch.float32).double().numpy(), t.numpy(), IGN)
    assert_close_tol(b.stats.runner_up.cpu().numpy(), ref["runner_up"], "runner_up", ref["row_finite"])


def test_launch_config_validation() -> None:
    for kw, field in ((dict(persistent=-1), "persistent"), (dict(persistent=True), "persistent"),
                      (dict(evict="evict_never"), "evict"), (dict(ftz=1), "ftz"), (dict(lazy_top2=0), "lazy_top2"),
                      (dict(blocks_per_program=3), "blocks_per_program"), (dict(store_hint=".xx"), "store_hint")):
        with pytest.raises(ValueError, match=f"LaunchConfig.{field}"):
            ks.LaunchConfig(4, 4, 1, **kw)
    c = ks.LaunchConfig(128, 8, 1, ftz=True, persistent=16, evict="", lazy_top2=True)
    assert c.describe() == "128x8 1w ftz lazy p16 evict=none"
    assert not ks.scoring_config(128256, torch.bfloat16).ftz or DEVICE == "cuda"
    if DEVICE == "cpu":                                  # inline PTX cannot run in the interpreter
        with pytest.raises(ValueError, match="ftz"):
            ks.token_statistics_triton(torch.randn(2, V), config=ks.LaunchConfig(4, 4, 1, ftz=True))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="ftz is inline PTX: CUDA only")
def test_cuda_ftz_stream_matches_oracle() -> None:
    x64, t = crafted(seed=9)
    for dtype in (torch.float32, torch.bfloat16):
        x = x64.to(dtype)
        ref = oracle.score_tokens(x.to(torch.float64).numpy(), t.numpy(), "combined", IGN)
        sc = ks.score_tokens_triton(x.to(DEVICE), t.to(DEVICE), ignore_index=IGN,
                                    config=ks.LaunchConfig(4, 4, 1, ftz=True, lazy_top2=True))
        fin = ref["stats"]["row_finite"]
        for k in STAT_KEYS:
            assert_close_tol(getattr(sc.stats, k).cpu().numpy(), ref["stats"][k], k, fin)
        assert_close_tol(sc.difficulty.cpu().numpy(), ref["difficulty"], "difficulty", ref["eligible"])
        assert np.array_equal(sc.eligible.cpu().numpy(), ref["eligible"])


# --------------------------------------------------------------------------- vocabulary-chunked launches
def _chunked(x: torch.Tensor, t, widths: list[int], cfg=None, poison: bool = True):
    """Statistics of ``x`` streamed in column chunks of the given widths (one launch each), into poisoned
    buffers."""
    n, vocab = x.shape
    fill = float("nan") if poison else 0.0
    state = torch.full((ks.CHUNK_STATE_ROWS, n), fill, dtype=torch.float32, device=x.device)
    out = torch.full((6, n), fill, dtype=torch.float32, device=x.device)
    fin = torch.full((n,), 7, dtype=torch.int8, device=x.device)
    v0 = 0
    for w in widths:
        c = x[:, v0:v0 + w]
        ks.launch_scoring_chunk(c, t, IGN, v0, vocab, state, out, fin, cfg)
        v0 += w
    assert v0 == vocab
    return out, fin


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("widths", [[16, 16, 5], [1, 30, 6], [3, 1, 1, 32], [37]],
                         ids=["block-aligned", "one-column-first", "odd", "whole-row"])
def test_chunked_launches_match_the_oracle(dtype: str, widths: list[int]) -> None:
    """Every SPEC §2 edge case of ``crafted`` (−∞ blocks, ties across chunks, NaN, +∞, targets in any chunk,
    ignored targets) gives the oracle's statistics when the row arrives in chunks."""
    x64, t = crafted(seed=3)
    x = x64.to(DTYPES[dtype]).to(DEVICE)
    ref = oracle.token_statistics(x.cpu().to(torch.float64).numpy(), t.numpy(), IGN)
    out, fin = _chunked(x, t.to(DEVICE), widths, CFG)
    fin_ref = ref["row_finite"]
    assert np.array_equal(fin.cpu().numpy().astype(bool), fin_ref)
    for j, k in enumerate(STAT_KEYS):
        assert_close_tol(out[j].cpu().numpy(), ref[k], k, fin_ref)
    assert out[3].cpu()[2] == out[2].cpu()[2]             # equal maxima in two chunks: p2 = p1
    assert out[4].cpu()[10] == 0 and torch.isposinf(out[4].cpu()[9])


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-top2", "pairwise-top2"])
def test_chunked_launches_equal_the_whole_row_launch(lazy: bool) -> None:
    """Same kernel, same rows: chunking changes only the summation order of d and s (and nothing in the
    top-2, the target logit or the finite flags)."""
    x64, t = crafted(seed=4)
    x = x64.to(torch.float32).to(DEVICE)
    import dataclasses
    cfg = dataclasses.replace(CFG, lazy_top2=lazy)
    whole = torch.full((6, 15), float("nan"), dtype=torch.float32, device=DEVICE)
    fin_whole = torch.zeros((15,), dtype=torch.int8, device=DEVICE)
    ks.launch_scoring(ks.row_geometry(x), t.to(DEVICE), IGN, -1, whole, fin_whole, cfg)
    out, fin = _chunked(x, t.to(DEVICE), [7, 9, 21], cfg)
    assert torch.equal(fin.cpu(), fin_whole.cpu())
    ok = fin_whole.cpu().bool()
    for j in (2, 3):                                      # p1, p2 from the same top-2 and d up to rounding
        torch.testing.assert_close(out[j].cpu()[ok], whole[j].cpu()[ok], rtol=2e-6, atol=1e-7)
    for j in (0, 1, 4):
        torch.testing.assert_close(out[j].cpu()[ok], whole[j].cpu()[ok], rtol=2e-6, atol=2e-6)
    assert torch.equal(out[4].cpu().isnan(), whole[4].cpu().isnan())


def test_chunked_launch_without_targets_and_with_strided_chunks() -> None:
    """Chunks as column views of one (N, V) tensor (row stride V > C), no targets: nll = 0 everywhere."""
    x64, _ = crafted(seed=5)
    x = x64.to(torch.bfloat16).to(DEVICE)
    ref = oracle.token_statistics(x.cpu().to(torch.float64).numpy(), None, IGN)
    out, fin = _chunked(x, None, [20, 17])
    assert np.array_equal(fin.cpu().numpy().astype(bool), ref["row_finite"])
    for j, k in enumerate(STAT_KEYS[:4]):
        assert_close_tol(out[j].cpu().numpy(), ref[k], k, ref["row_finite"])
    assert (out[4].cpu() == 0).all()


def test_chunked_launch_bad_input() -> None:
    x = torch.zeros((4, 10), device=DEVICE)
    state = torch.zeros((ks.CHUNK_STATE_ROWS, 4), device=DEVICE)
    out = torch.zeros((6, 4), device=DEVICE)
    fin = torch.zeros((4,), dtype=torch.int8, device=DEVICE)
    t = torch.zeros((4,), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="v0"):
        ks.launch_scoring_chunk(x, t, IGN, 5, 12, state, out, fin)        # chunk past the end of the row
    with pytest.raises(ValueError, match="v0"):
        ks.launch_scoring_chunk(x, t, IGN, -1, 12, state, out, fin)
    with pytest.raises(ValueError, match="vocab_size"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12.0, state, out, fin)
    with pytest.raises(ValueError, match="state"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12, state[:4], out, fin)
    with pytest.raises(ValueError, match="state"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12, state.double(), out, fin)
    with pytest.raises(ValueError, match="out"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12, state, out[:5], fin)
    with pytest.raises(ValueError, match="finite"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12, state, out, fin.int())
    with pytest.raises(ValueError, match="targets"):
        ks.launch_scoring_chunk(x, t.int(), IGN, 0, 12, state, out, fin)
    with pytest.raises(ValueError, match="z"):
        ks.launch_scoring_chunk(x.t(), t, IGN, 0, 12, state, out, fin)   # columns not unit-stride
    with pytest.raises(ValueError, match="persistent"):
        ks.launch_scoring_chunk(x, t, IGN, 0, 12, state, out, fin, ks.LaunchConfig(4, 4, 1, persistent=1))
    ks.launch_scoring_chunk(x[:0], t[:0], IGN, 0, 12, state[:, :0], out[:, :0], fin[:0])   # no rows: no launch
