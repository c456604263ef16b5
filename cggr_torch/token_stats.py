r"""Per-token log-probs and entropy of an LM head without materialising the ``(N, V)`` logits (SPEC §14).

With hidden states ``h ∈ R^{N×d}``, an LM-head weight ``W ∈ R^{V×d}`` and an optional bias ``b``, the raw
logits are ``z_i = W h_i + b``. The sampling distribution of SPEC §14.1 transforms them first, as sampling
engines (vLLM, TRL's ``logits / temperature``) do - the soft-cap is part of the model, the temperature part of
the sampler::

    y = softcap · tanh(z / softcap)      (only when softcap is not None)
    y = y / temperature

and every SPEC §2 statistic (lse, entropy, p1, p2, nll) is taken of ``y``. :func:`fused_linear_token_stats`
returns the target log-prob ``logprob_i = y_i[t_i] − lse_i`` (0 for ``ignore_index``), the entropy ``H_i`` and
``lse_i``, all float32, with the exact gradients (``g_lp``, ``g_H`` the upstream gradients)::

    ∂/∂y_ij = g_lp·(onehot_j − p_ij) − g_H·p_ij·(log p_ij + H_i)       (terms with p_ij = 0 are 0)
    ∂/∂z_ij = ∂/∂y_ij · (1 − tanh²(z_ij / softcap)) / temperature       (without softcap: / temperature)
    ∂h_i = Σ_j ∂/∂z_ij W_j,   ∂W = Σ_i (∂/∂z_i)ᵀ h_i,   ∂b = Σ_i ∂/∂z_i

**Kernels** (kernel devices; the CPU and float64 use plain PyTorch, DECISIONS.md: token-stats-pure-first-version):
the forward's statistics come from the fused LM head's statistics op (cuBLAS blocks, each read once by the Triton
scoring kernel) when ``temperature = 1`` and there is no soft-cap (that kernel's SPEC §2 streaming state has no
transform; a transform takes the PyTorch blocks); the backward turns each recomputed cuBLAS chunk into its
gradient in place with :mod:`cggr_torch.kernels.token_stats_gradient` (any temperature and soft-cap). Both hold
only the logits chunk, so the same bytes hold more columns than the element-wise plan below (``_kernel_plan``).
Forward: blocks of ``R`` rows × ``C`` vocabulary columns ``Z = H_r W[v0:v1]ᵀ + b[v0:v1]`` (one matmul in the
inputs' dtype), each folded into the rows' streaming state - running maximum ``m``, runner-up,
``s = Σ e^{y−m}``, ``a = Σ e^{y−m}(y − m)``, the target's ``y`` - and dropped (``lse = m + ln s``,
``H = ln s − a/s``, ``p1 = 1/s``). Backward: the same blocks are recomputed (``R'`` rows × ``C'`` columns) from the saved ``lse`` and ``H``; ``∂h`` of a row block accumulates in
float32 over the vocabulary chunks; ``∂W[v0:v1]`` is one matmul per (row block, chunk), accumulated in the
weight's dtype across row blocks (one row block - one rounding - whenever its rows fit the budget, e.g.
``≤ 3584`` rows at ``d = 4096`` bf16; float32 weights accumulate in float32); ``∂b`` in float32.

**Memory bound** (:func:`plan_token_stats`; ``e`` = element size of the inputs, ``B`` = ``memory_budget_bytes``,
default 0.25 GiB, of which 7/8 is planned): beyond the inputs, the outputs and the gradients, the working set
is at most ``B`` bytes - forward ``R·C·(e + 20) + 32·R``, backward ``R'·d·(4 + 2e) + C'·(R'·(2e + 24) + d·e)``
plus ``4V`` for the float32 ``∂b`` (at ``N = 16384, V = 151936, d = 4096`` bf16: forward 16384 rows × 640
columns, backward 3584 rows × 1024 columns, both under 0.22 GiB). The plan is a pure function of the shapes;
``tests/torch/test_token_stats.py`` measures the live bytes of every tensor the call allocates.

**Non-finite rows** (SPEC §14.2): a row whose transformed logits hold a NaN or ``+∞``, are all ``−∞``, whose
valid target's ``y`` is ``−∞``, or whose hidden state is not finite, gets ``logprob = NaN`` (0 when its target is
ignored), ``entropy = lse = NaN``, ``finite = False`` and exactly zero gradient (never ``0·NaN``).

Nothing here synchronises with the device (the gradient rows of :func:`token_stats_on_rows` are a device
array of static length).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dispatch
from .fused_linear import DEFAULT_MEMORY_BUDGET
from .fused_linear_backward import accumulate_matmul
from .kernels.launch import check_positive_int
from .types import TokenStatistics
from .utils import FLOAT_DTYPES, check_target_range, is_integer_dtype, widen_labels

__all__ = [
    "NEEDS",
    "TokenStatsOutput",
    "TokenStatsPlan",
    "check_transform",
    "fused_linear_statistics",
    "fused_linear_token_stats",
    "plan_token_stats",
    "token_stats_on_rows",
    "flat_inputs",
    "gradient_kernel",
    "statistics_op_applies",
]

#: The differentiable outputs a caller may ask for (SPEC §14.1).
NEEDS = ("logprob", "entropy")
_FILL = 0.875           # the fraction of the budget a plan fills (the caching allocator rounds blocks up)
_ALIGN = 128
_FORWARD_MIN_COLUMNS = 512


class TokenStatsOutput(NamedTuple):
    """Per-token float32 results of the token shape (or ``(len(rows),)`` for :func:`token_stats_on_rows`).

    Attributes:
        logprob: ``log p(target)`` of the transformed logits; 0 for ``ignore_index``; NaN on a non-finite row;
            differentiable when ``"logprob"`` is in ``need`` (else ``None``).
        entropy: ``H`` of the transformed distribution; NaN on a non-finite row; differentiable when
            ``"entropy"`` is in ``need`` (else ``None``).
        lse: log-sum-exp of the transformed logits (no gradient); NaN on a non-finite row.
        finite: bool, the row is finite (SPEC §14.2).
        statistics: the SPEC §2 :class:`~cggr_torch.types.TokenStatistics` of the transformed logits (no
            gradient; NaN in every field of a non-finite row): what CGGR scores and selects from.
    """

    logprob: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    lse: torch.Tensor
    finite: torch.Tensor
    statistics: TokenStatistics


class TokenStatsPlan(NamedTuple):
    """Blocks of one call: the forward's ``row_chunk × vocab_chunk`` logits, the backward's
    ``backward_row_chunk × backward_vocab_chunk``."""

    row_chunk: int
    vocab_chunk: int
    backward_row_chunk: int
    backward_vocab_chunk: int


# ========================================================================================= checks
def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def check_transform(temperature: Any, softcap: Any) -> tuple[float, Optional[float]]:
    """``(temperature, softcap)`` as host floats: finite ``temperature > 0``, ``softcap`` None or finite
    ``> 0`` (SPEC §14.1); ``ValueError`` naming the argument otherwise."""
    for name, value, optional in (("temperature", temperature, False), ("softcap", softcap, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
                or float(value) <= 0:
            raise ValueError(f"{name}: expected {'None or ' if optional else ''}a finite number > 0, got {value!r}")
    return float(temperature), (None if softcap is None else float(softcap))


def _check_need(need: Any) -> tuple[str, ...]:
    if isinstance(need, str) or not isinstance(need, Sequence) or any(n not in NEEDS for n in need):
        raise ValueError(f"need: expected a sequence of names from {NEEDS}, got {need!r}")
    return tuple(n for n in NEEDS if n in need)


def _check_inputs(hidden: Any, weight: Any, targets: Any, bias: Any, ignore_index: Any) -> torch.Tensor:
    """Shapes, dtypes, devices and the target range (SPEC §1, §11); returns the widened targets."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected a (N, d) or (B, T, d) floating tensor, got {_describe(hidden)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: expected dtype float32, float16, bfloat16 or float64, got {hidden.dtype}")
    d = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(f"weight: expected the LM head weight of shape (V, {d}) with V >= 1 (d = "
                         f"hidden.shape[-1]), got {_describe(weight)}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is None:
            continue
        if name == "bias" and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (weight.shape[0],)):
            raise ValueError(f"bias: expected None or a tensor of shape ({weight.shape[0]},), got {_describe(x)}")
        if x.dtype != hidden.dtype:
            raise ValueError(f"{name}: expected dtype {hidden.dtype} (that of hidden), got {x.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} (that of hidden), got {x.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
    expected = tuple(hidden.shape[:-1])
    if not isinstance(targets, torch.Tensor) or not is_integer_dtype(targets.dtype) \
            or tuple(targets.shape) != expected:
        raise ValueError(f"targets: expected an integer tensor of shape {expected} (the leading dims of hidden), "
                         f"got {_describe(targets)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets: expected device {hidden.device} (that of hidden), got {targets.device}")
    targets = widen_labels(targets, int(ignore_index), name="targets")
    check_target_range(targets, weight.shape[0], int(ignore_index), name="targets")
    return targets


# ============================================================================================= plan
def _round_down(x: int) -> int:
    return (x // _ALIGN) * _ALIGN if x >= _ALIGN else max(1, x)


def _element_size(dtype: Any) -> int:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    return torch.empty((), dtype=dtype).element_size()


def plan_token_stats(num_rows: int, hidden_dim: int, vocab_size: int, dtype: Any, *,
                     grad_rows: Optional[int] = None,
                     memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsPlan:
    """Blocks that keep the working set of :func:`fused_linear_token_stats` within ``memory_budget_bytes``
    (module docstring; the same formula in ``cggr_jax.token_stats``).

    Forward: ``R·C·(e + 20) + 32·R ≤ 7/8·B`` with the tallest blocks first (``R = N`` while that leaves at least
    512 columns); backward over ``K = grad_rows`` rows (default ``N``): ``R' = min(K, ⌊7/16·B / (d·(4 + 2e))⌋)``
    (rounded down to 128), then ``C' = ⌊(7/8·B − R'·d·(4 + 2e) − 4V) / (R'·(2e + 24) + d·e)⌋``. Every size is
    at least 1 and at most ``N``/``K``/``V``; when even one row and one column exceed the budget (enormous
    ``d``), the blocks are 1 and the bound cannot hold.
    """
    for name, value in (("num_rows", num_rows), ("hidden_dim", hidden_dim), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size: expected an integer >= 1, got {vocab_size}")
    budget = check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)
    grad_rows = check_positive_int(grad_rows, "grad_rows") if grad_rows != 0 else 0
    e = _element_size(dtype)
    n, V, d = max(1, int(num_rows)), int(vocab_size), int(hidden_dim)
    target = int(_FILL * budget)
    per_logit = e + 20
    cols_min = min(V, _FORWARD_MIN_COLUMNS)
    rows = n if n * (cols_min * per_logit + 32) <= target else _round_down(target // (cols_min * per_logit + 32))
    rows = min(n, rows)
    cols = min(V, max(1, _round_down((target - 32 * rows) // (rows * per_logit)) if target > 32 * rows else 1))
    k = n if grad_rows is None else max(1, int(grad_rows))
    fixed_row = d * (4 + 2 * e)
    brows = min(k, _round_down((target // 2) // max(1, fixed_row)))
    free = target - brows * fixed_row - 4 * V
    per_col = brows * (2 * e + 24) + d * e
    bcols = min(V, max(1, _round_down(free // per_col) if free > per_col else 1))
    return TokenStatsPlan(int(rows), int(cols), int(brows), int(bcols))


# ======================================================================================== forward
def _transform(z: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """SPEC §14.1 in float32: soft-cap, then temperature."""
    y = z.to(torch.float32)
    if softcap is not None:
        y = torch.tanh(y / softcap) * softcap
    return y / temperature if temperature != 1.0 else y


def _block_statistics(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], safe_t: torch.Tensor,
                      has_t: torch.Tensor, cols: int, temperature: float,
                      softcap: Optional[float]) -> tuple[torch.Tensor, ...]:
    """The streaming SPEC §2 statistics of the rows ``h`` over vocabulary chunks of ``cols`` columns."""
    R = h.shape[0]
    V = weight.shape[0]
    dev = h.device
    ninf = torch.full((R,), -math.inf, dtype=torch.float32, device=dev)
    m1, m2 = ninf.clone(), ninf.clone()
    s = torch.zeros((R,), dtype=torch.float32, device=dev)
    a = torch.zeros_like(s)
    yt = torch.zeros_like(s)
    bad = torch.zeros((R,), dtype=torch.bool, device=dev)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        y = _transform(F.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1]), temperature, softcap)
        bad |= (torch.isnan(y) | (y == math.inf)).any(dim=1)
        if v1 - v0 >= 2:
            top = torch.topk(y, 2, dim=1).values
            c1, c2 = top[:, 0], top[:, 1]
        else:
            c1, c2 = y[:, 0], ninf
        new_m = torch.maximum(m1, c1)
        m2 = torch.maximum(torch.maximum(torch.minimum(m1, c1), m2), c2)
        # Rescale the running sums to the new maximum; a state that holds only -inf so far (s = 0) contributes
        # nothing, and must not produce 0·(-inf).
        shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
        old = s > 0
        alpha = torch.where(old, torch.exp(m1 - shift), torch.zeros_like(s))
        delta = torch.where(old, m1 - shift, torch.zeros_like(s))
        u = y - shift[:, None]
        ex = torch.exp(u)
        eu = torch.where(ex > 0, ex * u, torch.zeros((), dtype=torch.float32, device=dev))
        a = alpha * (a + s * delta) + eu.sum(dim=1)
        s = alpha * s + ex.sum(dim=1)
        del u, ex, eu
        local = safe_t - v0
        here = has_t & (local >= 0) & (local < v1 - v0)
        yt = torch.where(here, y.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], yt)
        m1 = new_m
        del y
    ln_s = torch.log(s)
    lse = m1 + ln_s
    entropy = ln_s - a / s
    p1 = torch.exp(m1 - lse)
    p2 = torch.exp(m2 - lse)
    nll = torch.where(has_t, lse - yt, torch.zeros_like(lse))
    ok = ~bad & torch.isfinite(lse) & torch.isfinite(entropy) & torch.isfinite(p1) & torch.isfinite(p2) \
        & torch.isfinite(nll) & torch.isfinite(h).all(dim=1)
    nan = torch.full_like(lse, math.nan)
    return tuple(torch.where(ok, x, nan) for x in (lse, entropy, p1, p2, nll)) + (ok,)


def statistics_op_applies(h2: torch.Tensor, temperature: float, softcap: Optional[float]) -> bool:
    """The fused LM head's statistics op (``cggr::fused_linear_statistics``: cuBLAS blocks + the Triton
    scoring kernel, one pass over each block) serves the untransformed distribution (SPEC §14.1 with
    ``temperature = 1`` and no soft-cap, where ``y = z``) on a kernel device; a transform takes the blocks here."""
    return (temperature == 1.0 and softcap is None and dispatch.use_kernels(h2)
            and dispatch.kernel("token_statistics_triton") is not None)


def _kernel_statistics(h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], safe_t: torch.Tensor,
                       has_t: torch.Tensor, plan: TokenStatsPlan) -> tuple[TokenStatistics, torch.Tensor]:
    """:func:`_flat_statistics` through the fused head's statistics op (its columns widened by
    :func:`_kernel_plan`)."""
    cols = plan.vocab_chunk
    t = torch.where(has_t, safe_t, torch.full_like(safe_t, -1))     # -1: never a valid target (safe_t >= 0)
    with torch.no_grad(), torch.autocast(device_type=h2.device.type, enabled=False):
        out = torch.ops.cggr.fused_linear_statistics(h2, weight, bias, t, -1, int(plan.row_chunk), int(cols))
        stats = [out[k] for k in range(5)]
        # SPEC §2: a non-finite row carries a non-finite value in some field; §14.2 makes it NaN in all of them.
        ok = torch.isfinite(h2).all(dim=1)
        for x in stats:
            ok &= torch.isfinite(x)
        nan = torch.full_like(stats[0], math.nan)
        return TokenStatistics(*(torch.where(ok, x, nan) for x in stats)), ok


def _flat_statistics(h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], safe_t: torch.Tensor,
                     has_t: torch.Tensor, plan: TokenStatsPlan, temperature: float,
                     softcap: Optional[float]) -> tuple[TokenStatistics, torch.Tensor]:
    if statistics_op_applies(h2, temperature, softcap):
        return _kernel_statistics(h2, weight, bias, safe_t, has_t, plan)
    N = h2.shape[0]
    out = [torch.empty((N,), dtype=torch.float32, device=h2.device) for _ in range(5)]
    ok = torch.empty((N,), dtype=torch.bool, device=h2.device)
    with torch.no_grad(), torch.autocast(device_type=h2.device.type, enabled=False):
        for r0 in range(0, N, plan.row_chunk):
            r1 = min(N, r0 + plan.row_chunk)
            res = _block_statistics(h2[r0:r1], weight, bias, safe_t[r0:r1], has_t[r0:r1], plan.vocab_chunk,
                                    temperature, softcap)
            for buf, x in zip(out, res[:5]):
                buf[r0:r1] = x
            ok[r0:r1] = res[5]
            del res
    return TokenStatistics(*out), ok


def flat_inputs(hidden: Any, weight: Any, targets: Any, bias: Any,
                ignore_index: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked inputs (shapes, dtypes, devices, the target range: SPEC §1, §11; ``ValueError`` naming the
    argument) as ``(h2, safe_t, has_t)``: the ``(N, d)`` hidden rows, int64 targets with 0 where there is none,
    and the rows that have one."""
    targets = _check_inputs(hidden, weight, targets, bias, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    has_t = t != int(ignore_index)
    return h2, torch.where(has_t, t, torch.zeros_like(t)).to(torch.int64), has_t


def _row_block(h2: torch.Tensor, rows: Optional[torch.Tensor], ok: torch.Tensor, r0: int,
               r1: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The backward's rows ``r0:r1`` (of ``h2``, or of ``h2[rows]``): their indices and hidden states, a
    non-finite row read as zeros (its gradient is zero, and 0·NaN must not reach ``∂W``)."""
    idx = None if rows is None else rows[r0:r1]
    h = h2[r0:r1] if idx is None else h2.index_select(0, idx)
    return idx, torch.where(ok[r0:r1, None], h, torch.zeros((), dtype=h2.dtype, device=h2.device))


def _store_rows(gh: torch.Tensor, idx: Optional[torch.Tensor], r0: int, r1: int, acc: torch.Tensor) -> None:
    """``∂h`` of a row block into the gradient (rows ``r0:r1``, or added at the gathered ``idx``)."""
    if idx is None:
        gh[r0:r1] = acc.to(gh.dtype)
    else:
        gh.index_add_(0, idx, acc.to(gh.dtype))


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, targets: Any, bias: Optional[torch.Tensor],
             temperature: Any, softcap: Any, ignore_index: Any, row_chunk_size: Any, vocab_chunk_size: Any,
             memory_budget_bytes: Any, grad_rows: Optional[int] = None):
    temperature, softcap = check_transform(temperature, softcap)
    for name, value in (("row_chunk_size", row_chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        check_positive_int(value, name)
    check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)
    h2, safe_t, has_t = flat_inputs(hidden, weight, targets, bias, ignore_index)
    plan = plan_token_stats(h2.shape[0], h2.shape[1], weight.shape[0], hidden.dtype, grad_rows=grad_rows,
                            memory_budget_bytes=int(memory_budget_bytes))
    if vocab_chunk_size is None:
        plan = _kernel_plan(plan, h2, weight.shape[0], temperature, softcap)
    plan = TokenStatsPlan(row_chunk_size or plan.row_chunk, vocab_chunk_size or plan.vocab_chunk,
                          row_chunk_size or plan.backward_row_chunk, vocab_chunk_size or plan.backward_vocab_chunk)
    return h2, safe_t, has_t, plan, temperature, softcap


def gradient_kernel(h2: torch.Tensor) -> Optional[Any]:
    """The Triton chunk-gradient launch (``launch_token_stats_gradient``) for ``h2``'s device and dtype, or None
    (PyTorch element-wise ops: non-kernel devices, ``CGGR_DISABLE_KERNELS=1``, float64)."""
    if not dispatch.use_kernels(h2) or h2.dtype == torch.float64:
        return None
    return dispatch.kernel("launch_token_stats_gradient")


def _kernel_plan(plan: TokenStatsPlan, h2: torch.Tensor, vocab_size: int, temperature: float,
                 softcap: Optional[float]) -> TokenStatsPlan:
    """The plan's columns where kernels hold the blocks: the same bytes, more columns. The statistics op's
    forward blocks hold only the logits (``e`` bytes a logit instead of ``e + 20``); the gradient kernel's
    backward chunk is the logits buffer itself (``R'·e`` bytes a column, plus ``4·⌈R'/16⌉`` for the bias sums,
    instead of ``R'·(2e + 24)``; ``∂W`` accumulates in place, so no ``C'·d·e`` product either)."""
    e = h2.element_size()
    cols, bcols = plan.vocab_chunk, plan.backward_vocab_chunk
    if statistics_op_applies(h2, temperature, softcap):
        cols = min(vocab_size, _round_down(cols * (e + 20) // e))
    if gradient_kernel(h2) is not None:
        R, d = plan.backward_row_chunk, h2.shape[1]
        bcols = min(vocab_size, _round_down(bcols * (R * (2 * e + 24) + d * e) // (R * e + 4 * -(-R // 16))))
    return plan._replace(vocab_chunk=cols, backward_vocab_chunk=bcols)


def fused_linear_statistics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                            softcap: Optional[float] = None, ignore_index: int = -100,
                            row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                            memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatistics:
    """SPEC §2 statistics of the transformed logits (§14.1) of every token, token-shaped, float32, no gradient
    (NaN in every field of a non-finite row, §14.2). What CGGR scores and selects from; arguments as
    :func:`fused_linear_token_stats`."""
    h2, safe_t, has_t, plan, temperature, softcap = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                             ignore_index, row_chunk_size, vocab_chunk_size,
                                                             memory_budget_bytes)
    stats, _ = _flat_statistics(h2.detach(), weight.detach(), None if bias is None else bias.detach(), safe_t,
                                has_t, plan, temperature, softcap)
    shape = tuple(hidden.shape[:-1])
    return TokenStatistics(*(x.reshape(shape) for x in stats))


# ======================================================================================= backward
def _backward(h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: Optional[torch.Tensor],
              safe_t: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, g_lp: torch.Tensor,
              g_h: torch.Tensor, plan: TokenStatsPlan, temperature: float, softcap: Optional[float],
              need_h: bool, need_w: bool, need_b: bool):
    """``(∂h, ∂W, ∂b)`` of ``Σ g_lp·logprob + g_H·H`` over the rows (all of ``h2``, or ``h2[rows]``); rows with
    ``g_lp = g_H = 0`` and NaN ``lse`` (non-finite) contribute exactly 0."""
    K = safe_t.shape[0]
    V, d = weight.shape
    dev, dt = h2.device, h2.dtype
    f32 = torch.float32
    ok = torch.isfinite(lse) & torch.isfinite(entropy)
    zero = torch.zeros((), dtype=f32, device=dev)
    g_lp = torch.where(ok & (safe_t >= 0), g_lp.to(f32), zero)   # -1: no target, a constant logprob 0
    g_h = torch.where(ok, g_h.to(f32), zero)
    lse = torch.where(ok, lse, zero)
    entropy = torch.where(ok, entropy, zero)
    launch = gradient_kernel(h2)
    if launch is not None:
        return _kernel_backward(launch, h2, weight, bias, rows, safe_t, lse, entropy, g_lp, g_h, plan,
                                temperature, softcap, need_h, need_w, need_b, ok)
    gh = torch.zeros((h2.shape[0], d), dtype=dt, device=dev) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros((V,), dtype=f32, device=dev) if need_b else None
    R, C = plan.backward_row_chunk, plan.backward_vocab_chunk
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        for r0 in range(0, K, R):
            r1 = min(K, r0 + R)
            idx, h = _row_block(h2, rows, ok, r0, r1)
            acc = torch.zeros((r1 - r0, d), dtype=f32, device=dev) if need_h else None
            gl, gH, l_r, H_r, t_r = (x[r0:r1, None] for x in (g_lp, g_h, lse, entropy, safe_t))
            for v0 in range(0, V, C):
                v1 = min(V, v0 + C)
                z = F.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1]).to(f32)
                if softcap is not None:
                    th = torch.tanh(z / softcap)
                    y, dz = th * softcap, (1.0 - th * th)
                    del th
                else:
                    y, dz = z, None
                if temperature != 1.0:
                    y = y / temperature
                logp = y - l_r
                del y, z
                p = torch.exp(logp)
                # ∂/∂y = g_lp·(onehot − p) − g_H·p·(log p + H); p = 0 terms are exactly 0 (no 0·(−inf)).
                g = torch.where(p > 0, p * (logp + H_r), zero).mul_(-gH).sub_(p * gl)
                del logp, p
                local = t_r - v0
                hit = (local >= 0) & (local < v1 - v0)
                g.scatter_add_(1, local.clamp(0, v1 - v0 - 1), torch.where(hit, gl, zero))
                if dz is not None:
                    g.mul_(dz)
                    del dz
                if temperature != 1.0:
                    g.div_(temperature)
                if need_b:
                    gb[v0:v1] += g.sum(dim=0)
                gd = g.to(dt)
                del g
                if need_h:
                    acc += (gd @ weight[v0:v1]).to(f32)
                if need_w:
                    gw[v0:v1] += gd.t() @ h
                del gd
            if need_h:
                _store_rows(gh, idx, r0, r1, acc)
            del acc, h
    return gh, gw, (None if gb is None else gb.to(dt))


def _kernel_backward(launch, h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     rows: Optional[torch.Tensor], safe_t: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                     g_lp: torch.Tensor, g_h: torch.Tensor, plan: TokenStatsPlan, temperature: float,
                     softcap: Optional[float], need_h: bool, need_w: bool, need_b: bool, ok: torch.Tensor):
    """:func:`_backward` with each recomputed chunk turned into its gradient in place by the Triton kernel
    (``launch``): one read and one write of the chunk in the inputs' dtype; ``∂h`` of a row block accumulates
    in float32 through a float32-output GEMM where the backend has one, ``∂W`` in place (``addmm_``). The caller
    has zeroed ``g_lp``/``g_H``/``lse``/``H`` of non-finite rows and ``g_lp`` of rows without a target."""
    K = safe_t.shape[0]
    V, d = weight.shape
    dev, dt = h2.device, h2.dtype
    f32 = torch.float32
    gh = torch.zeros((h2.shape[0], d), dtype=dt, device=dev) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros((V,), dtype=f32, device=dev) if need_b else None
    R, C = plan.backward_row_chunk, plan.backward_vocab_chunk
    targets = torch.where(g_lp != 0, safe_t, torch.full_like(safe_t, -1)).to(torch.int64)
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        for r0 in range(0, K, R):
            r1 = min(K, r0 + R)
            idx, h = _row_block(h2, rows, ok, r0, r1)
            acc = torch.zeros((r1 - r0, d), dtype=f32, device=dev) if need_h else None
            per_row = [x[r0:r1].contiguous() for x in (lse, entropy, g_lp, g_h, targets)]
            for v0 in range(0, V, C):
                v1 = min(V, v0 + C)
                z = F.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1])
                colsum = torch.empty((-(-(r1 - r0) // 16), v1 - v0), dtype=f32, device=dev) if need_b else None
                launch(z, *per_row[:4], per_row[4], v0, temperature=temperature, softcap=softcap, colsum=colsum)
                if need_b:
                    gb[v0:v1] += colsum.sum(dim=0)
                    del colsum
                if need_h:
                    acc = accumulate_matmul(acc, z, weight[v0:v1])
                if need_w:
                    gw[v0:v1].addmm_(z.t(), h)
                del z
            if need_h:
                _store_rows(gh, idx, r0, r1, acc)
            del acc, h
    return gh, gw, (None if gb is None else gb.to(dt))


class _TokenStatsGrad(torch.autograd.Function):
    """Attaches the precomputed ``logprob``/``entropy`` of the rows to ``hidden``, ``weight``, ``bias``; the
    backward recomputes the rows' logits block by block (:func:`_backward`)."""

    @staticmethod
    def forward(ctx, h2, weight, bias, logprob, entropy, rows, safe_t, lse, plan, temperature, softcap):
        ctx.save_for_backward(h2, weight, bias, rows, safe_t, lse, entropy)
        ctx.cfg = (plan, temperature, softcap, bias is not None, rows is not None)
        return logprob.clone(), entropy.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_h):
        h2, weight, bias, rows, safe_t, lse, entropy = ctx.saved_tensors
        plan, temperature, softcap, has_bias, has_rows = ctx.cfg
        if not has_bias:
            bias = None
        if not has_rows:
            rows = None
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_h = torch.zeros_like(lse) if g_h is None else g_h
        gh, gw, gb = _backward(h2, weight, bias, rows, safe_t, lse, entropy, g_lp, g_h, plan, temperature,
                               softcap, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                               has_bias and ctx.needs_input_grad[2])
        return gh, gw, gb, None, None, None, None, None, None, None, None


def _outputs(stats: TokenStatistics, has_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logprob = torch.where(has_t, -stats.nll, torch.zeros_like(stats.nll))
    return logprob, stats.entropy


def _finish(logprob, entropy, lse, ok, stats, need, shape) -> TokenStatsOutput:
    r = (lambda x: x.reshape(shape))
    return TokenStatsOutput(r(logprob) if "logprob" in need else None, r(entropy) if "entropy" in need else None,
                            r(lse), r(ok), TokenStatistics(*(r(x) for x in stats)))


def fused_linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, *, need: Sequence[str] = NEEDS,
                             temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                             row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                             memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsOutput:
    """Per-token target log-prob, entropy and lse of ``hidden · weightᵀ + bias`` (soft-capped, then divided by
    the temperature: SPEC §14.1), without materialising the logits (module docstring). No host synchronisation.

    Args:
        hidden: ``(N, d)`` or ``(B, T, d)`` floating tensor, aligned with ``targets`` (a causal LM shifts first).
        weight: ``(V, d)`` (the ``nn.Linear`` layout), dtype and device of ``hidden``.
        targets: integer tensor of the token shape, values in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``.
        need: the differentiable outputs, a subset of :data:`NEEDS`; the others are ``None`` (all statistics
            are computed in one pass anyway; only the backward differs).
        temperature: finite ``> 0``; the logits are divided by it after the soft-cap.
        softcap: None or finite ``> 0``: ``y = softcap·tanh(z/softcap)`` first (Gemma-2 style).
        ignore_index: target value of tokens without a target (their ``logprob`` is 0, with no gradient).
        row_chunk_size, vocab_chunk_size: override the rows/columns of both passes' blocks.
        memory_budget_bytes: the working-memory bound (default 0.25 GiB): at ``N = 16384, V = 151936,
            d = 4096`` bf16 the forward and the backward each stay below 0.22 GiB beyond the inputs and the
            gradients (:func:`plan_token_stats`).

    Returns:
        :class:`TokenStatsOutput`, every tensor of the token shape.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``need``, ``temperature``, ``softcap``, chunk sizes, or
            targets out of range (CPU; a device assertion on CUDA).
    """
    need = _check_need(need)
    h2, safe_t, has_t, plan, temperature, softcap = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                             ignore_index, row_chunk_size, vocab_chunk_size,
                                                             memory_budget_bytes)
    stats, ok = _flat_statistics(h2.detach(), weight.detach(), None if bias is None else bias.detach(), safe_t,
                                 has_t, plan, temperature, softcap)
    logprob, entropy = _outputs(stats, has_t)
    grad_safe_t = torch.where(has_t & ok, safe_t, torch.full_like(safe_t, -1))   # -1: no onehot term
    if need and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        lp_g, ent_g = _TokenStatsGrad.apply(h2, weight, bias, logprob, entropy, None, grad_safe_t, stats.lse,
                                            plan, temperature, softcap)
        logprob = lp_g if "logprob" in need else logprob
        entropy = ent_g if "entropy" in need else entropy
    return _finish(logprob, entropy, stats.lse, ok, stats, need, tuple(hidden.shape[:-1]))


def token_stats_on_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: Optional[torch.Tensor], statistics: TokenStatistics, rows: torch.Tensor,
                        live: torch.Tensor, *, need: Sequence[str] = NEEDS, temperature: float = 1.0,
                        softcap: Optional[float] = None, ignore_index: int = -100,
                        row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsOutput:
    """:func:`fused_linear_token_stats` of the gathered rows ``rows`` only, from the ``statistics`` that
    :func:`fused_linear_statistics` already computed (no forward matmul): outputs of shape ``(K,)``,
    ``K = len(rows)``, whose backward recomputes and touches the LM head for these ``K`` rows only (the
    policy-gradient loss' selected tokens, SPEC §14.3). ``live`` (bool ``(K,)``) marks the real rows; a row
    with ``live = False`` (padding of a static-size buffer) has ``logprob = entropy = 0``, ``finite = False``
    and no gradient. Flat row indices into ``hidden.reshape(-1, d)``; no host synchronisation.
    """
    need = _check_need(need)
    N = int(math.prod(hidden.shape[:-1])) if isinstance(hidden, torch.Tensor) else 0
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or not is_integer_dtype(rows.dtype):
        raise ValueError(f"rows: expected a 1-D integer tensor of flat row indices, got {_describe(rows)}")
    if not isinstance(live, torch.Tensor) or live.dtype != torch.bool or tuple(live.shape) != tuple(rows.shape):
        raise ValueError(f"live: expected a bool tensor of shape {tuple(rows.shape)}, got {_describe(live)}")
    if not isinstance(statistics, TokenStatistics):
        raise ValueError(f"statistics: expected a TokenStatistics, got {type(statistics).__name__}")
    h2, safe_t, has_t, plan, temperature, softcap = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                             ignore_index, row_chunk_size, vocab_chunk_size,
                                                             memory_budget_bytes, grad_rows=rows.shape[0])
    rows = torch.where(live, rows.to(torch.int64), torch.zeros_like(rows, dtype=torch.int64)).clamp(0, max(0, N - 1))
    flat = TokenStatistics(*(x.reshape(-1) for x in statistics))
    sel = TokenStatistics(*(torch.where(live, x[rows], torch.full_like(x[rows], math.nan)) for x in flat))
    has_r = has_t[rows] & live
    ok = torch.isfinite(sel.lse) & torch.isfinite(sel.entropy) & torch.isfinite(sel.confidence) \
        & torch.isfinite(sel.runner_up) & (torch.isfinite(sel.nll) | ~has_r)
    logprob = torch.where(has_r, -sel.nll, torch.zeros_like(sel.nll))
    entropy = torch.where(live, sel.entropy, torch.zeros_like(sel.entropy))
    t_r = torch.where(has_r & ok, safe_t[rows], torch.full_like(rows, -1))
    lse_r = torch.where(ok, sel.lse, torch.full_like(sel.lse, math.nan))
    if need and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        lp_g, ent_g = _TokenStatsGrad.apply(h2, weight, bias, logprob, entropy, rows, t_r, lse_r, plan,
                                            temperature, softcap)
        logprob = lp_g if "logprob" in need else logprob
        entropy = ent_g if "entropy" in need else entropy
    return _finish(logprob, entropy, sel.lse, ok, sel, need, (rows.shape[0],))
