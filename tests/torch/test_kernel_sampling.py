"""The Triton ``sampled`` selection (cggr_torch.kernels.sampling, SPEC §7.4) against the PyTorch reference and
the float64 oracle.

What SPEC §11 requires, checked here: the same ``k`` (exact, SPEC §5.3) and bit-identical draws ``u`` as the
reference and the oracle; ``π`` within ``oracle.PI_RTOL`` of both; masks identical to the reference's except
tokens with ``|u − π| ≤ PI_RTOL·π``; the weights of tokens kept by both within ``PI_RTOL``. Stronger, checked
exactly: the kernel's mask is ``eligible & (u < π)`` with the reference's ``u`` and the kernel's own ``π``
(the draws and the comparison are exact) and its weights are ``1 ⊘ π`` bit for bit. Every output element is
written (poisoned buffers), and ``CGGRLoss(selection='sampled')`` gives the same loss and gradient on the
kernel path as on the reference path. Runs in the Triton interpreter on CPU tensors, or on CUDA when the
interpreter is off, on both kernel paths (one program per step, or multi-program kernels for large inputs).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cggr_torch import CGGRLoss, dispatch  # noqa: E402
from cggr_torch import selection as sel  # noqa: E402
from cggr_torch.kernels import sampling as ksam  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import assert_range_check_fails, kernel_test_device, random_logits, random_targets  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = kernel_test_device()
PI_RTOL = oracle.PI_RTOL
INF, NAN = float("inf"), float("nan")
PARAMS = [(1.0, 0.1), (0.0, 0.1), (2.0, 0.0), (1.0, 1.0), (0.5, 0.3), (3.0, 0.05), (4.0, 0.0), (1.0, 0.0)]
HALF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@pytest.fixture(autouse=True, params=["single", "multi"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both kernel paths: the one-program kernels and the multi-program ones (normally above
    ``SINGLE_PROGRAM_MAX_TOKENS``; here for every non-empty input)."""
    monkeypatch.setattr(ksam, "SINGLE_PROGRAM_MAX_TOKENS", 2**31 if request.param == "single" else 0)
    if request.param == "multi":    # small blocks: many partials, reduced in several steps, even on small inputs
        monkeypatch.setattr(ksam, "MULTI_BLOCK", 512)
        monkeypatch.setattr(ksam, "REDUCE_BLOCK", 4)
    return request.param


def _tensors(d: np.ndarray, e: np.ndarray, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(d).to(dtype).to(DEVICE), torch.from_numpy(e).to(DEVICE)


def _reference(d: torch.Tensor, e: torch.Tensor, ratio, **kw):
    with dispatch.force("reference"):
        mask, w, k = sel.sample_tokens(d.cpu(), e.cpu(), ratio.cpu() if isinstance(ratio, torch.Tensor) else ratio,
                                       **kw)
        pi = sel.sampling_probabilities(d.cpu(), e.cpu(), int(k), power=kw.get("power", 1.0),
                                        uniform_mix=kw.get("uniform_mix", 0.1), floor=kw.get("floor", 1e-6))
    return mask.numpy(), w.numpy(), int(k), pi.numpy()


def _u(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    return sel.uniform_hash(seed, step, torch.arange(int(np.prod(shape)))).numpy().reshape(shape)


def _check_against_reference(d_t: torch.Tensor, e_t: torch.Tensor, ratio, *, step: int, seed: int, power: float,
                             mix: float, floor: float = 1e-6, exact_k: int | None = None) -> None:
    """Kernel vs reference and oracle (the SPEC §11 rules of the module docstring) on one problem."""
    kw = dict(step=step, seed=seed, power=power, uniform_mix=mix, floor=floor)
    shape = tuple(d_t.shape)
    m_r, w_r, k_r, pi_r = _reference(d_t, e_t, ratio, **kw)
    with dispatch.force("kernel") as log:
        mask, w, k = sel.sample_tokens(d_t, e_t, ratio, **kw)
        pi = sel.sampling_probabilities(d_t, e_t, k, power=power, uniform_mix=mix, floor=floor)
    assert log.calls["sample_tokens_triton"] == 1 and log.calls["sampling_probabilities_triton"] == 1
    assert mask.dtype == torch.bool and w.dtype == torch.float32 and pi.dtype == torch.float32
    assert tuple(mask.shape) == tuple(w.shape) == tuple(pi.shape) == shape
    assert k.dtype == torch.int32 and k.shape == ()
    mask, w, pi, k = mask.cpu().numpy(), w.cpu().numpy(), pi.cpu().numpy(), int(k)
    assert k == k_r
    if exact_k is not None:
        assert k == exact_k
    d32 = d_t.cpu().to(torch.float32).numpy()
    e = e_t.cpu().numpy() & ~np.isnan(d32)
    n = int(e.sum())
    assert k == oracle.num_selected(n, np.float32(ratio.item() if isinstance(ratio, torch.Tensor) else ratio))
    # π: the reference and the oracle within PI_RTOL; 0 off the eligible tokens; Σπ = k within SPEC §7.4's bound
    np.testing.assert_allclose(pi, pi_r, rtol=PI_RTOL, atol=1e-12)
    degenerate = mix == 0.0 and power > 0      # SPEC §7.4: λ = 0 may underflow q (π = 0, Σπ < k)
    if not degenerate:
        np.testing.assert_allclose(pi, oracle.sampling_probabilities(d32, e, k, power, mix, floor), rtol=PI_RTOL,
                                   atol=1e-12)
        assert abs(float(pi.astype(np.float64).sum()) - k) <= 1e-5 * k + 1e-5
    assert (pi[~e] == 0).all() and ((pi >= 0) & (pi <= 1)).all()
    # exact: the draws are the reference's u bit for bit, the comparison and the weights are exact
    u = _u(seed, step, shape)
    np.testing.assert_array_equal(mask, e & (u < pi))
    np.testing.assert_array_equal(w, np.where(mask, np.float32(1.0) / np.where(mask, pi, np.float32(1.0)),
                                              np.float32(0.0)).astype(np.float32))
    # SPEC §11 against the reference: masks identical outside the band, weights of tokens kept by both
    differ = mask != m_r
    assert not (differ & ~(np.abs(u - pi_r) <= PI_RTOL * pi_r + 1e-12)).any()
    both = mask & m_r
    np.testing.assert_allclose(w[both], w_r[both], rtol=PI_RTOL)
    assert (w[~mask] == 0).all() and (w[mask] >= 1).all() and np.isfinite(w).all()


# --------------------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("shape", [(1,), (2,), (37,), (5, 7), (1, 13), (3, 1), (4099,), (3, 1500)])
def test_matches_reference_and_oracle_on_random_problems(shape):
    rng = np.random.default_rng(sum(shape) * 31 + len(shape))
    for trial in range(4):
        d = (rng.standard_normal(shape) * rng.uniform(0.1, 6)).astype(np.float32)
        if trial % 2 == 0:
            d[rng.random(shape) < 0.1] = NAN
        if trial == 1:
            d.flat[0] = INF
        if trial == 3:
            d.flat[-1] = -INF
        e = rng.random(shape) < rng.uniform(0.2, 1.0)
        ratio = float(np.float32(rng.choice([rng.uniform(1e-3, 1.0), 1.0, 0.25])))
        power, mix = PARAMS[(trial + len(shape) + shape[0]) % len(PARAMS)]
        seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**40))
        _check_against_reference(*_tensors(d, e), ratio, step=step, seed=seed, power=power, mix=mix)


@pytest.mark.parametrize("dtype", list(HALF))
def test_difficulty_dtypes(dtype):
    """float16/bfloat16 widen exactly, float64 rounds to float32 (SPEC §6): the reference's rules."""
    rng = np.random.default_rng(7)
    d = (rng.standard_normal((6, 23)) * 4).astype(np.float64)
    d[0, :3] = [NAN, INF, -INF]
    e = rng.random((6, 23)) < 0.85
    d_t, e_t = _tensors(d, e, HALF[dtype])
    _check_against_reference(d_t, e_t, 0.3, step=5, seed=99, power=1.5, mix=0.2)


def test_ties_and_repeated_values_keep_the_reference_order():
    """Equal p (power 0, λ = 1, repeated difficulties, ±0): tied tokens must get the same π and the same
    treatment as in the reference (SPEC §7.4's order: p descending, ties by lower flat index)."""
    d = np.array([3.0, 3.0, 1.0, 3.0, -0.0, 0.0, 1.0, 3.0, 2.0] * 7, dtype=np.float32)
    e = np.ones(d.shape, dtype=bool)
    e[5::9] = False
    for power, mix, ratio in [(0.0, 0.1, 0.3), (1.0, 1.0, 0.5), (8.0, 0.0, 0.2), (1.0, 0.1, 0.9), (30.0, 0.01, 0.4)]:
        d_t, e_t = _tensors(d, e)
        _check_against_reference(d_t, e_t, ratio, step=3, seed=1, power=power, mix=mix)


def test_power_zero_and_full_mix_are_uniform():
    d = np.linspace(-3, 9, 101).astype(np.float32)
    e = np.ones(101, dtype=bool)
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        for kw in (dict(power=0.0), dict(uniform_mix=1.0)):
            pi = sel.sampling_probabilities(d_t, e_t, 30, **kw).cpu().numpy()
            np.testing.assert_allclose(pi, 30 / 101, rtol=1e-6)


def test_infinite_difficulties_stay_finite():
    d = np.array([3.0, -1.0, 0.5, INF, -INF, 2.0, 7.0, 1e-30], dtype=np.float32)
    e = np.ones(8, dtype=bool)
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        pi = sel.sampling_probabilities(d_t, e_t, 2).cpu().numpy()
        mask, w, _ = sel.sample_tokens(d_t, e_t, 0.25, step=4, seed=2)
    assert np.isfinite(pi).all() and pi[3] == 1.0
    np.testing.assert_allclose(pi, oracle.sampling_probabilities(d, e, 2), rtol=PI_RTOL)
    assert bool(mask.cpu()[3]) and float(w.cpu()[3]) == 1.0 and torch.isfinite(w).all()


def test_degenerate_underflow_matches_the_reference():
    """λ = 0 with a huge β: every q but the largest underflows to 0 (SPEC §7.4: π = 0, Σπ < k)."""
    d = np.array([50.0, 1.0, 2.0, 0.5, 3.0, 49.0], dtype=np.float32)
    e = np.ones(6, dtype=bool)
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        pi = sel.sampling_probabilities(d_t, e_t, 3, power=200.0, uniform_mix=0.0).cpu().numpy()
    with dispatch.force("reference"):
        pi_r = sel.sampling_probabilities(d_t.cpu(), e_t.cpu(), 3, power=200.0, uniform_mix=0.0).numpy()
    np.testing.assert_allclose(pi, pi_r, rtol=PI_RTOL, atol=0)
    assert pi[0] == 1.0 and (pi[1:5] == 0).all()


def test_k_edge_cases_of_sampling_probabilities():
    rng = np.random.default_rng(11)
    d = rng.standard_normal(19).astype(np.float32)
    e = rng.random(19) < 0.7
    n = int(e.sum())
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        assert not sel.sampling_probabilities(d_t, e_t, 0).any()                      # k = 0: nothing
        for k in (n, n + 1, 10**12):                                                   # k ≥ n: every eligible
            pi = sel.sampling_probabilities(d_t, e_t, k).cpu().numpy()
            assert (pi[e] == 1.0).all() and (pi[~e] == 0).all()
        for k in (1, 3, n - 1):
            pi = sel.sampling_probabilities(d_t, e_t, k).cpu().numpy()
            np.testing.assert_allclose(pi, oracle.sampling_probabilities(d, e, k), rtol=PI_RTOL, atol=1e-12)
            # a k tensor on the device gives the same π
            pi_t = sel.sampling_probabilities(d_t, e_t, torch.tensor(k, device=DEVICE)).cpu().numpy()
            np.testing.assert_array_equal(pi, pi_t)
        # a negative k tensor (only a tensor can be negative) counts as 0, as in the reference
        assert not sel.sampling_probabilities(d_t, e_t, torch.tensor(-4, device=DEVICE)).any()


@pytest.mark.parametrize("shape", [(0,), (0, 5), (4, 0)])
def test_empty_input(shape):
    d_t = torch.zeros(shape, device=DEVICE)
    e_t = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    with dispatch.force("kernel"):
        mask, w, k = sel.sample_tokens(d_t, e_t, 0.5)
        pi = sel.sampling_probabilities(d_t, e_t, 3)
    assert tuple(mask.shape) == tuple(w.shape) == tuple(pi.shape) == shape
    assert int(k) == 0 and k.dtype == torch.int32


@pytest.mark.parametrize("case", ["none_eligible", "all_nan", "one_token", "one_eligible"])
def test_nothing_or_one_eligible(case):
    d = np.array([1.0, 2.0, -3.0, 0.5, 9.0], dtype=np.float32)
    e = np.ones(5, dtype=bool)
    if case == "none_eligible":
        e[:] = False
    elif case == "all_nan":
        d[:] = NAN
    elif case == "one_token":
        d, e = d[:1], e[:1]
    else:
        e[:] = False
        e[3] = True
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        mask, w, k = sel.sample_tokens(d_t, e_t, 0.4, step=1, seed=3)
        pi = sel.sampling_probabilities(d_t, e_t, 2).cpu().numpy()
    mask, w = mask.cpu().numpy(), w.cpu().numpy()
    if case in ("none_eligible", "all_nan"):
        assert int(k) == 0 and not mask.any() and (w == 0).all() and (pi == 0).all()
    else:      # k = 1 = n: the token is kept with π = 1 and weight 1
        i = 0 if case == "one_token" else 3
        assert int(k) == 1 and mask.sum() == 1 and mask[i] and w[i] == 1.0 and pi[i] == 1.0


def test_tensor_ratio_and_step_give_the_same_draw():
    rng = np.random.default_rng(5)
    d, e = rng.standard_normal((3, 17)).astype(np.float32), rng.random((3, 17)) < 0.9
    d_t, e_t = _tensors(d, e)
    with dispatch.force("kernel"):
        m1, w1, k1 = sel.sample_tokens(d_t, e_t, 0.3, step=2**32 + 7, seed=2**32 - 1)
        for step in (torch.tensor(2**32 + 7, device=DEVICE), torch.tensor(7, dtype=torch.int32, device=DEVICE),
                     torch.tensor([7], device=DEVICE), 7):
            m2, w2, k2 = sel.sample_tokens(d_t, e_t, torch.tensor(0.3, device=DEVICE), step=step, seed=2**32 - 1)
            assert torch.equal(m1, m2) and torch.equal(w1, w2) and int(k1) == int(k2)
        # select_tokens(selection='sampled') is the same draw
        m3, k3 = sel.select_tokens(d_t, e_t, 0.3, selection="sampled", step=7, seed=2**32 - 1)
        assert torch.equal(m3, m1) and int(k3) == int(k1)
        # another step or seed is another draw
        assert not torch.equal(sel.sample_tokens(d_t, e_t, 0.3, step=8, seed=2**32 - 1)[0], m1)


def test_large_input(kernel_path, monkeypatch):
    """N = 2^20 + 3 on the one-program path (256 steps per pass); 2^17 + 3 on the multi-program path with its
    default blocks (65 per launch; the interpreter runs programs one by one), reduced 16 at a time."""
    g = torch.Generator().manual_seed(0)
    n_tok = 2**20 + 3 if kernel_path == "single" else 2**17 + 3
    if kernel_path == "multi":
        monkeypatch.setattr(ksam, "MULTI_BLOCK", 2048)
        monkeypatch.setattr(ksam, "REDUCE_BLOCK", 16)
    d = (8.0 + 2.0 * torch.randn(n_tok, generator=g)).to(DEVICE)
    e = (torch.rand(n_tok, generator=g) > 0.1).to(DEVICE)
    m_r, w_r, k_r, pi_r = _reference(d, e, 0.25, step=9, seed=4)
    with dispatch.force("kernel"):
        mask, w, k = sel.sample_tokens(d, e, 0.25, step=9, seed=4)
    assert int(k) == k_r
    mask, w = mask.cpu().numpy(), w.cpu().numpy()
    u = _u(4, 9, (n_tok,))
    differ = mask != m_r
    assert not (differ & ~(np.abs(u - pi_r) <= PI_RTOL * pi_r)).any()
    both = mask & m_r
    np.testing.assert_allclose(w[both], w_r[both], rtol=PI_RTOL)
    assert abs(int(mask.sum()) - k_r) < 6 * np.sqrt(k_r)       # the realised count has mean k


# ------------------------------------------------------------------------------------------ launch helpers
def test_poisoned_outputs_are_fully_written(kernel_path):
    rng = np.random.default_rng(2)
    n_tok = 2 * ksam.DRAW_BLOCK + 37          # several draw programs and a ragged last one
    d = rng.standard_normal(n_tok).astype(np.float32)
    e = rng.random(n_tok) < 0.7
    d_t, e_t = _tensors(d, e)
    ints = torch.full((8,), -7, dtype=torch.int32, device=DEVICE)
    floats = torch.full((4,), NAN, device=DEVICE)
    key = torch.full((n_tok,), 12345, dtype=torch.int32, device=DEVICE)
    ksam.launch_probabilities(d_t, e_t, key, ints, floats, ratio=0.3, power=1.0, uniform_mix=0.1, floor=1e-6)
    n = int(e.sum())
    assert int(ints[ksam.INT_SLOTS["n"]]) == n and int(ints[ksam.INT_SLOTS["k"]]) == oracle.num_selected(
        n, np.float32(0.3))
    assert int(ints[ksam.INT_SLOTS["ok"]]) == 1
    assert (key.cpu().numpy()[~e] == 2**31 - 1).all() and (key.cpu().numpy()[e] < 0).all()
    sorted_key, order = ksam.sort_by_probability(key)
    partials = ksam.launch_water_filling(sorted_key, ints, floats)
    assert (partials is None) == (kernel_path == "single")
    mask = torch.ones(n_tok, dtype=torch.bool, device=DEVICE)
    weights = torch.full((n_tok,), NAN, device=DEVICE)
    pi = torch.full((n_tok,), NAN, device=DEVICE)
    ksam.launch_draws(sorted_key, order, ints, floats, mask=mask, weights=weights, pi=pi, seed=5, step=6,
                      partials=partials)
    pi, mask, weights = pi.cpu().numpy(), mask.cpu().numpy(), weights.cpu().numpy()
    assert not np.isnan(pi).any() and not np.isnan(weights).any()
    assert (pi[~e] == 0).all() and not mask[~e].any() and (weights[~e] == 0).all()
    np.testing.assert_array_equal(mask, e & (_u(5, 6, (n_tok,)) < pi))
    k = oracle.num_selected(n, np.float32(0.3))
    np.testing.assert_allclose(pi, oracle.sampling_probabilities(d, e, k), rtol=PI_RTOL, atol=1e-12)


def test_the_kernel_path_runs_no_torch_compute(monkeypatch):
    """The glue around the three Triton launches reaches PyTorch only for allocations, views and the one sort
    (no elementwise op, no copy, no host read). The launch helpers are stubbed here: the interpreter itself
    copies tensors, which a GPU launch does not."""
    from torch.utils._python_dispatch import _disable_current_modes

    from tests.torch.op_log import OpLog

    launches: list[str] = []
    for name in ("launch_water_filling", "launch_draws"):
        monkeypatch.setattr(ksam, name, lambda *a, _name=name, **k: launches.append(_name))

    def probabilities_stub(d, e, key, ints, floats, **kwargs):
        # The device check reads the kernel's "ok" flag: write it as the kernel would, outside the mode.
        launches.append("launch_probabilities")
        with _disable_current_modes():
            ints.zero_()
            ints[ksam.INT_SLOTS["ok"]] = 1

    monkeypatch.setattr(ksam, "launch_probabilities", probabilities_stub)
    # the custom op's body inline (through the dispatcher the op is one node, its body hidden from the mode)
    monkeypatch.setattr(ksam, "sample_tokens_op", ksam.sample_tokens_op._init_fn)
    rng = np.random.default_rng(3)
    d_t, e_t = _tensors(rng.standard_normal((4, 9)).astype(np.float32), rng.random((4, 9)) < 0.8)
    ratio = torch.tensor(0.3, device=DEVICE)
    with dispatch.force("kernel"), OpLog() as ops:
        sel.sample_tokens(d_t, e_t, ratio, step=3)
    allowed = {"empty", "sort", "view", "select", "_reshape_alias", "reshape", "alias", "clone"}  # clone: k
    allowed |= {"_assert_async"}        # a tensor ratio is checked on the device, without a host read
    if ratio.device.type == "cpu":      # a CPU ratio is also read and checked on the host, as by the reference
        allowed |= {"_local_scalar_dense", "item", "gt", "le", "bitwise_and", "is_nonzero"}
    assert set(ops.names) <= allowed, set(ops.names) - allowed
    assert ops.names.count("sort") == 1
    assert launches == ["launch_probabilities", "launch_water_filling", "launch_draws"]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    d, e = torch.randn(6, device=DEVICE), torch.ones(6, dtype=torch.bool, device=DEVICE)
    cases = [
        (lambda: ksam.sample_tokens_triton(torch.arange(6, device=DEVICE), e, 0.5), "difficulty"),
        (lambda: ksam.sample_tokens_triton(d.reshape(1, 2, 3), e.reshape(1, 2, 3), 0.5), "difficulty"),
        (lambda: ksam.sample_tokens_triton(d, e.int(), 0.5), "eligible"),
        (lambda: ksam.sample_tokens_triton(d, e[:5], 0.5), "eligible"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.0), "ratio"),
        (lambda: ksam.sample_tokens_triton(d, e, 1.5), "ratio"),
        (lambda: ksam.sample_tokens_triton(d, e, torch.tensor(0.0)), "ratio"),
        (lambda: ksam.sample_tokens_triton(d, e, torch.tensor([0.5, 0.5])), "ratio"),
        (lambda: ksam.sample_tokens_triton(d, e, torch.tensor(1)), "ratio"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, step=-1), "step"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, step=1.5), "step"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, step=torch.tensor(1.0)), "step"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, seed=2**32), "seed"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, power=-1.0), "power"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, uniform_mix=1.5), "uniform_mix"),
        (lambda: ksam.sample_tokens_triton(d, e, 0.5, floor=0.0), "floor"),
        (lambda: ksam.sampling_probabilities_triton(d, e, -1), "k"),
        (lambda: ksam.sampling_probabilities_triton(d, e, 2.0), "k"),
        (lambda: ksam.sampling_probabilities_triton(d, e, torch.tensor(2.0)), "k"),
        (lambda: ksam.launch_probabilities(d, e, torch.empty(6, dtype=torch.int32), torch.empty(8), torch.empty(4),
                                           power=1.0, uniform_mix=0.1, floor=1e-6), "ratio and k"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    # a ratio outside (0, 1] on the kernel's device: read and refused on the host under the interpreter (the
    # CPU), a device-side assertion on the kernel's "ok" slot on CUDA (no host read)
    assert_range_check_fails(
        "from cggr_torch.kernels import sampling as ksam\n"
        "d, e = torch.rand(6, device=dev), torch.ones(6, dtype=torch.bool, device=dev)\n"
        "ksam.sample_tokens_triton(d, e, torch.tensor(1.5, device=dev))\n",
        r"ratio: expected a (number|value) in \(0, 1\]")
    # the public functions check before dispatching (same messages on both paths)
    with dispatch.force("kernel") as log:
        with pytest.raises(ValueError, match="step"):
            sel.sample_tokens(d, e, 0.5, step=-2)
        with pytest.raises(ValueError, match="k"):
            sel.sampling_probabilities(d, e, -1)
    assert sum(log.calls.values()) == 0


# ----------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("shape", [(3, 7, 11), (29, 5)])
def test_cggr_loss_kernel_path_equals_reference_path(shape):
    """CGGRLoss(selection='sampled'): loss, gradient and metrics on the kernel path (the fused sampled path:
    scoring kernel → ``sample_from_scores``; the composable path is compared in test_fused_sampled.py) equal
    the reference path's (level 4 of SPEC §11)."""
    rng = np.random.default_rng(len(shape))
    V = shape[-1]
    logits = random_logits(rng, shape)
    targets = random_targets(rng, shape[:-1], V)
    cfg = dict(selection="sampled", warmup_steps=10, sample_seed=11, sample_power=1.5, sample_uniform_mix=0.2)
    out = {}
    for mode in ("reference", "kernel"):
        dev = DEVICE if mode == "kernel" else "cpu"
        x = logits.detach().clone().to(dev).requires_grad_(True)
        crit = CGGRLoss(**cfg)
        crit.set_step(4)
        with dispatch.force(mode) as log:
            loss = crit(x, targets.to(dev))
            loss.backward()
        if mode == "kernel":
            assert log.calls["sample_from_scores"] == 1
        out[mode] = (float(loss.detach()), x.grad.detach().cpu().numpy(), crit.get_metrics())
    (l_r, g_r, m_r), (l_k, g_k, m_k) = out["reference"], out["kernel"]
    assert m_k["tokens_selected"] == m_r["tokens_selected"] and m_k["tokens_total"] == m_r["tokens_total"]
    assert m_k["sample_ess"] == pytest.approx(m_r["sample_ess"], rel=1e-4)
    assert l_k == pytest.approx(l_r, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(g_k, g_r, atol=1e-5, rtol=1e-4)


def test_sequence_level_sampled_uses_the_kernel(kernel_path):
    """SPEC §9.2: ``CGGRModel(selection='sampled')`` draws its sequences with ``sample_tokens`` on the ``(B,)``
    difficulties, so on the kernel path it keeps the same sequences with the same loss."""
    from cggr_torch.batch_split import CGGRModel
    from tests.torch.test_router import FixedRouter
    from tests.torch.test_split_sampled import SAMPLE, LogitsLM, _case

    # on the device of the kernel tests: with the interpreter off, the Triton kernels take CUDA tensors only
    ids, logits, labels, am = (t.to(DEVICE) for t in _case(0, torch.float32))
    out = {}
    for mode in ("reference", "kernel"):
        lm = LogitsLM(11, 0).to(DEVICE)
        model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", warmup_steps=0, min_tokens_ratio=0.5,
                          **SAMPLE)
        with dispatch.force(mode) as log:
            res = model.forward_with(lm, ids, labels, am)
        out[mode] = (res.kept, float(res.loss.detach()), log.calls["sample_tokens_triton"])
    assert out["kernel"][2] == 1 and out["reference"][2] == 0
    assert torch.equal(out["kernel"][0], out["reference"][0]) and out["kernel"][0].numel() > 0
    assert out["kernel"][1] == pytest.approx(out["reference"][1], rel=1e-5)
