"""Pallas scoring kernel: every SPEC §2 statistic of a row in one read of the logits.

One program handles one row ``z ∈ ℝ^V`` (upcast exactly to float32 on load) and walks the vocabulary in
blocks of ``block_v`` columns with an online (streaming) softmax. The carry after blocks ``0 … b`` is

    m  = max_j z_j                                   running maximum
    r  = second largest element of the multiset      runner-up logit z_(2) (ties counted, −∞ if none)
    d  = Σ_j exp(z_j − m)                            running normaliser
    s  = Σ_j exp(z_j − m)·(z_j − m)                  running first moment, shifted by m

When a block raises the maximum to ``m' ≥ m`` the old terms are rescaled with ``α = exp(m − m')``::

    d ← α·d + Σ_blk exp(z − m')
    s ← α·(s + d·(m − m')) + Σ_blk exp(z − m')·(z − m')

(the second line is ``Σ e^{z−m'}(z−m') = α·Σ e^{z−m}((z−m) + (m−m'))``). At the end, with ``z_t`` the target logit,

    lse = m + log d        H = log d − s/d   (= lse − Σ_j p_j z_j)
    p1  = 1/d              p2 = exp(r − m)/d
    nll = (m − z_t) + log d

These are the brief's identities with ``s`` kept relative to ``m`` (``Σ p_j z_j = m + s/d``), which avoids the
cancellation of two numbers of size ``|m|`` in ``H``. A ``−∞`` entry has ``exp(z − m) = 0`` exactly and its
``(z − m)`` factor is clamped to a finite value first, so it contributes 0 to ``s`` (no ``0·(−∞)``).

Top-2 across blocks. A block with maximum ``b1`` (``c`` copies) and second value ``b2`` (``b2 = b1`` when
``c ≥ 2``) merges with the carry as ``m' = max(m, b1)``, ``r' = max(min(m, b1), max(r, b2))`` — the second
largest of the union of two multisets, ties included (two equal maxima give ``r' = m'`` and so ``p2 = p1``).
A block with ``b1 ≤ r`` cannot change ``(m, r)``; the merge, which costs three more passes over the block
in registers, is skipped for it. ``V = 1`` leaves ``r = −∞`` and ``p2 = 0``.

Non-finite rows. A NaN anywhere makes ``d`` NaN (``exp(NaN) = NaN``; this does not rely on how ``max``
treats NaN, which differs between the Triton lowering (``maxnumf``) and XLA); ``+∞`` makes ``m = +∞``; a row
of only ``−∞`` keeps ``m = −∞``. Such rows get NaN in ``lse, entropy, confidence, runner_up`` (and in
``nll`` when the target is valid), exactly like ``tests/oracle.py``, so every consumer sees them as not
finite (SPEC §2).

Targets. The target logit is read with one masked scalar load at the sanitised column
``where(valid ∧ 0 ≤ t < V, t, 0)``; the load is masked off for ignored rows, so an ``ignore_index`` row
never reads its target. ``nll = 0`` where ``t = ignore_index``. Concrete (non-traced) targets outside
``[0, V)`` raise ``ValueError``; under ``jit`` they cannot raise (SPEC §11) and, like ignored ones, give
``nll = 0`` (``cggr_jax.scoring.TokenStatistics``: no valid target) and are never used as an index; the
callers make them ineligible.

Ragged vocabularies. Full blocks are read unmasked; the last, ragged block (``V mod block_v ≠ 0``) is a
masked load with ``other = −∞`` — never a clamped ``pl.ds`` slice, whose start the interpreter (and
``lax.dynamic_slice``) would silently shift back into range.

Backend (the single switch, :data:`PALLAS_GPU_BACKEND`): see ``cggr_jax/kernels/__init__.py``. On GPU the
``pallas_call`` is lowered through Pallas' Triton backend by passing ``plt.CompilerParams``; elsewhere it
runs with ``interpret=True``. Addresses: the Triton lowering switches the pointer offsets of a ref to
64-bit when the whole array exceeds 2^32 bytes, so ``N·V > 2^31`` elements is addressed correctly (the
row index itself is < 2^31).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from cggr_jax import utils

if TYPE_CHECKING:  # imported lazily at run time: cggr_jax.scoring may import this module
    from cggr_jax.scoring import TokenStatistics

__all__ = [
    "PALLAS_GPU_BACKEND",
    "KernelConfig",
    "kernel_config",
    "kernels_enabled",
    "use_pallas_kernels",
    "resolve_interpret",
    "token_statistics_pallas",
]

# ------------------------------------------------------------------------------------------------ backend
#: How ``pallas_call`` is lowered on a GPU. ``"triton"``: Pallas' Triton backend, selected explicitly with
#: ``jax.experimental.pallas.triton.CompilerParams`` (present in jax 0.10.x and 0.11.x; 0.11 deprecates it
#: with a warning at lowering but keeps it). Why not Mosaic GPU (the default backend of a bare
#: ``pl.pallas_call`` since jax 0.10): its generic ``pallas_call`` path is itself deprecated in favour of
#: ``plgpu.kernel`` (an API that changed between 0.10 and 0.11), it has no masked load with a fill value
#: (a ragged vocabulary block must read as −∞) and needs warpgroup-level code for a row reduction, while this workload — a
#: bandwidth-bound streaming reduction without matmuls — gains nothing from wgmma/TMA on Hopper.
#: This constant is the only place that names the lowering; :func:`_compiler_params` reads it.
PALLAS_GPU_BACKEND: str = "triton"

_LOG2E = 1.4426950408889634
#: Lower clamp of ``z − m`` inside ``exp(z − m)·(z − m)``: ``exp2(-200·log2 e) = 0`` in float32, so the
#: clamp changes no nonzero term and turns ``0·(−∞)`` into ``0·(−200) = 0``.
_T_MIN = -200.0
_SQUEEZED: Any = getattr(pl, "squeezed", None)  # a squeezed block dim; older jax spells it None

DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 8
DEFAULT_NUM_STAGES = 3


def kernels_enabled() -> bool:
    """False when ``CGGR_DISABLE_KERNELS`` is ``1``/``true``/``yes`` (the same switch as ``cggr_torch``)."""
    return os.environ.get("CGGR_DISABLE_KERNELS", "").strip().lower() not in ("1", "true", "yes")


def use_pallas_kernels() -> bool:
    """Whether ``cggr_jax`` should route its jitted scoring/loss through these kernels.

    True on a GPU backend (``jax.default_backend() == "gpu"``) unless ``CGGR_DISABLE_KERNELS`` is set; on
    CPU/TPU the XLA reference is used (the kernels stay callable there with ``interpret=True``).
    """
    return kernels_enabled() and jax.default_backend() == "gpu"


def resolve_interpret(interpret: Optional[bool]) -> bool:
    """``interpret=None``: compile for the GPU when the default backend is a GPU, interpret otherwise."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    return bool(interpret)


def _compiler_params(num_warps: int, num_stages: int) -> Any:
    """Backend-specific ``compiler_params`` for ``pl.pallas_call`` (see :data:`PALLAS_GPU_BACKEND`)."""
    if PALLAS_GPU_BACKEND != "triton":
        raise ValueError(f"PALLAS_GPU_BACKEND must be 'triton', got {PALLAS_GPU_BACKEND!r}")
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams", None)
    if cls is None:
        raise RuntimeError(
            f"jax {jax.__version__} has no jax.experimental.pallas.triton.CompilerParams: the Pallas Triton "
            "backend these kernels use was removed; run with CGGR_DISABLE_KERNELS=1 (XLA reference) or use "
            "a jax that ships it (0.10.x and 0.11.x are supported)")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _masked_load(ref: Any, mask: jax.Array, other: Any) -> jax.Array:
    """``plt.load`` with a mask (the only masked load the Triton lowering and the interpreter share)."""
    load = getattr(plt, "load", None)
    if load is None:
        raise RuntimeError(f"jax {jax.__version__} has no jax.experimental.pallas.triton.load (masked load)")
    return load(ref, mask=mask, other=other)


def _masked_store(ref: Any, value: jax.Array, mask: jax.Array) -> None:
    store = getattr(plt, "store", None)
    if store is None:
        raise RuntimeError(f"jax {jax.__version__} has no jax.experimental.pallas.triton.store (masked store)")
    store(ref, value, mask=mask)


# ------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static launch parameters (hashable: used as a ``custom_vjp`` non-differentiable argument).

    ``block_v``: vocabulary columns per loop step, a power of two (Triton tensors must be); ``num_warps``,
    ``num_stages``: Triton launch options (ignored by the interpreter); ``interpret``: run the kernel as
    ``pallas_call(..., interpret=True)``.
    """

    block_v: int
    num_warps: int
    num_stages: int
    interpret: bool


def kernel_config(vocab: int, *, block_v: Optional[int] = None, num_warps: Optional[int] = None,
                  num_stages: Optional[int] = None, interpret: Optional[bool] = None) -> KernelConfig:
    """Validate/default the launch parameters for a vocabulary of ``vocab`` columns."""
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, max(16, 1 << max(0, (vocab - 1).bit_length())))
    if not isinstance(block_v, (int, np.integer)) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two, got {block_v!r}")
    num_warps = DEFAULT_NUM_WARPS if num_warps is None else num_warps
    if not isinstance(num_warps, (int, np.integer)) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a positive power of two, got {num_warps!r}")
    num_stages = DEFAULT_NUM_STAGES if num_stages is None else num_stages
    if not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    return KernelConfig(int(block_v), int(num_warps), int(num_stages), resolve_interpret(interpret))


def pallas_call_options(cfg: KernelConfig) -> dict[str, Any]:
    """``interpret=``/``compiler_params=`` keyword arguments of ``pl.pallas_call`` for ``cfg``."""
    if cfg.interpret:
        return {"interpret": True}
    return {"interpret": False, "compiler_params": _compiler_params(cfg.num_warps, cfg.num_stages)}


# --------------------------------------------------------------------------------------------- validation
def check_inputs(logits: Any, targets: Any, ignore_index: Any) -> tuple[jax.Array, Optional[jax.Array], int]:
    """SPEC §1/§11 checks shared with the reference (``cggr_jax.utils``): ``ValueError`` naming the argument
    for a bad rank/dtype/shape or ``V = 0``, and for concrete targets outside ``[0, V)`` that are not
    ``ignore_index`` (traced targets cannot be checked; see :func:`sanitize_targets`)."""
    logits = utils.as_logits(logits)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    if targets is not None:
        targets = utils.as_targets(targets, logits.shape)
        utils.check_target_range(targets, logits.shape[-1], ignore_index)
    return logits, targets, ignore_index


def as_float32_input(logits2d: jax.Array) -> jax.Array:
    """float64 is accepted and computed in float32 (SPEC §1); fp32/fp16/bf16 are read as they are."""
    if logits2d.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        return logits2d.astype(jnp.float32)
    return logits2d


def sanitize_targets(targets1d: jax.Array, vocab: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """``(t, code)``, int32 ``(N,)``: ``t`` = the target where it is valid and in ``[0, V)``, else 0 (so it is
    never an out-of-bounds index); ``code`` = 1 valid and in range, 0 ignored (``t = ignore_index``), −1 valid
    but outside ``[0, V)`` (possible only under ``jit``, where values cannot raise)."""
    not_ignored, in_range, safe = utils.target_masks(targets1d, vocab, ignore_index)
    code = jnp.where(not_ignored, jnp.where(in_range, 1, -1), 0).astype(jnp.int32)
    return safe, code


# ------------------------------------------------------------------------------------------------- kernel
def _vocab_loop(v: int, block_v: int, step: Callable[[jax.Array, Any], Any],
                load_full: Callable[[Any], jax.Array], load_tail: Callable[[Any, jax.Array], jax.Array],
                carry: Any) -> Any:
    """Fold ``carry = step(x_block, carry)`` over the vocabulary: the full blocks with ``load_full(slice)``
    (unmasked), then the ragged last block with ``load_tail(slice, cols < V)`` (masked, reads −∞ past V)."""
    n_full, tail = divmod(v, block_v)

    def full_body(j: jax.Array, c: Any) -> Any:
        start = pl.multiple_of(j * block_v, block_v)
        return step(load_full(pl.ds(start, block_v)), c)

    if n_full:
        carry = lax.fori_loop(0, n_full, full_body, carry)
    if tail:
        # A one-step loop: its index is traced, so the slice start is dynamic. (A static start past V − block_v
        # is rejected at trace time; a clamped one would read the wrong columns. The load is masked instead.)
        def tail_body(j: jax.Array, c: Any) -> Any:
            start = pl.multiple_of(j * block_v, block_v)
            cols = start + lax.broadcasted_iota(jnp.int32, (block_v,), 0)
            return step(load_tail(pl.ds(start, block_v), cols < v), c)

        carry = lax.fori_loop(n_full, n_full + 1, tail_body, carry)
    return carry


def _row_statistics_kernel(*refs: Any, v: int, block_v: int, has_targets: bool, has_row_mask: bool) -> None:
    it = iter(refs)
    x_ref = next(it)
    tgt_ref = next(it) if has_targets else None
    code_ref = next(it) if has_targets else None
    row_ref = next(it) if has_row_mask else None
    lse_ref, ent_ref, p1_ref, p2_ref = next(it), next(it), next(it), next(it)
    nll_ref = next(it) if has_targets else None
    f32 = jnp.float32
    neg_inf = f32(-jnp.inf)

    def step(x: jax.Array, carry: Any) -> Any:
        x = x.astype(f32)
        m, r, d, s = carry
        b1 = jnp.max(x)

        def merge_top2() -> jax.Array:
            is_max = x == b1
            copies = jnp.sum(is_max.astype(jnp.int32))
            below = jnp.max(jnp.where(is_max, neg_inf, x))
            b2 = jnp.where(copies > 1, b1, below)
            return jnp.maximum(jnp.minimum(m, b1), jnp.maximum(r, b2))

        r_new = lax.cond(b1 > r, merge_top2, lambda: r)
        m_new = jnp.maximum(m, b1)
        # Exponent base: m' where it is finite. A row whose maximum is +∞/NaN ends non-finite anyway (its
        # outputs become NaN below); base 0 only keeps its arithmetic defined. All −∞ so far: exp(−∞ − 0) = 0.
        base = jnp.where((m_new > neg_inf) & (m_new < f32(jnp.inf)), m_new, f32(0.0))
        t = x - base
        e = jnp.exp2(t * f32(_LOG2E))
        d_blk = jnp.sum(e)
        s_blk = jnp.sum(e * jnp.maximum(t, f32(_T_MIN)))
        had_terms = m > neg_inf  # d = s = 0 until a finite maximum was seen
        delta = jnp.where(had_terms, jnp.maximum(m - base, f32(_T_MIN)), f32(0.0))
        alpha = jnp.where(had_terms, jnp.exp2(delta * f32(_LOG2E)), f32(0.0))
        d_new = d * alpha + d_blk
        s_new = (s + d * delta) * alpha + s_blk
        return m_new, r_new, d_new, s_new

    def compute() -> None:
        init = (neg_inf, neg_inf, f32(0.0), f32(0.0))
        m, r, d, s = _vocab_loop(
            v, block_v, step,
            lambda sl: x_ref[sl],
            lambda sl, mask: _masked_load(x_ref.at[sl], mask, -jnp.inf),
            init)
        bad = jnp.logical_not((d == d) & (m > neg_inf) & (m < f32(jnp.inf)))
        nan = f32(jnp.nan)
        log_d = jnp.log(d)
        lse_ref[...] = jnp.where(bad, nan, m + log_d)
        ent_ref[...] = jnp.where(bad, nan, log_d - s / d)
        p1_ref[...] = jnp.where(bad, nan, f32(1.0) / d)
        p2_ref[...] = jnp.where(bad, nan, jnp.exp2((r - m) * f32(_LOG2E)) / d)
        if has_targets:
            code = code_ref[...]
            ok = code == 1
            # One masked scalar read of the target logit: rows without a valid in-range target read nothing.
            z_t = _masked_load(x_ref.at[tgt_ref[...]], ok, 0).astype(f32)
            nll = (m - z_t) + log_d
            nll_ref[...] = jnp.where(ok, jnp.where(bad, nan, nll), f32(0.0))

    if not has_row_mask:
        compute()
        return
    active = row_ref[...] != 0
    pl.when(active)(compute)

    @pl.when(jnp.logical_not(active))
    def _skip() -> None:
        zero = jnp.float32(0.0)
        for ref in (lse_ref, ent_ref, p1_ref, p2_ref) + ((nll_ref,) if has_targets else ()):
            ref[...] = zero


def row_statistics(logits2d: jax.Array, targets1d: Optional[jax.Array], *, ignore_index: int,
                   cfg: KernelConfig, row_mask: Optional[jax.Array] = None) -> tuple[jax.Array, ...]:
    """Run the scoring kernel on ``(N, V)`` logits; returns float32 ``(lse, entropy, p1, p2[, nll])`` ``(N,)``.

    ``row_mask`` (optional, ``(N,)`` bool): rows where it is False are not read at all and get 0 in every
    output (the selective cross-entropy's sparse forward).
    """
    n, v = logits2d.shape
    x = as_float32_input(logits2d)
    row_spec = pl.BlockSpec((_SQUEEZED, v), lambda i: (i, 0))
    scalar_spec = pl.BlockSpec((_SQUEEZED,), lambda i: (i,))
    args: list[jax.Array] = [x]
    in_specs = [row_spec]
    has_targets = targets1d is not None
    if has_targets:
        t, code = sanitize_targets(targets1d, v, ignore_index)
        args += [t, code]
        in_specs += [scalar_spec, scalar_spec]
    if row_mask is not None:
        args.append(row_mask.astype(jnp.int32))
        in_specs.append(scalar_spec)
    n_out = 5 if has_targets else 4
    kernel = _bind(_row_statistics_kernel, v=v, block_v=cfg.block_v, has_targets=has_targets,
                   has_row_mask=row_mask is not None)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * n_out,
        grid=(n,),
        in_specs=in_specs,
        out_specs=[scalar_spec] * n_out,
        name="cggr_token_statistics",
        **pallas_call_options(cfg),
    )(*args))


def _bind(fn: Callable[..., None], **static: Any) -> Callable[..., None]:
    """``functools.partial`` that keeps the kernel's name (Pallas names the kernel after it)."""
    def kernel(*refs: Any) -> None:
        fn(*refs, **static)
    kernel.__name__ = fn.__name__.lstrip("_")
    kernel.__qualname__ = kernel.__name__
    return kernel


# ------------------------------------------------------------------------------------------- entry point
def token_statistics_pallas(logits: jax.Array, targets: Optional[jax.Array] = None, ignore_index: int = -100,
                            *, interpret: Optional[bool] = None, block_v: Optional[int] = None,
                            num_warps: Optional[int] = None,
                            num_stages: Optional[int] = None) -> "TokenStatistics":
    """SPEC §2 statistics of every token from one read of the logits (the kernel behind
    ``cggr_jax.scoring.token_statistics``).

    Args:
      logits: ``(N, V)`` or ``(B, T, V)``, float32/float16/bfloat16 (float64 is computed in float32).
      targets: optional integer array of the token shape; ``ignore_index`` marks tokens without a target.
      ignore_index: the ignored target value (default −100).
      interpret: ``None`` = compile with the Triton backend on a GPU, interpret elsewhere.
      block_v, num_warps, num_stages: launch parameters (defaults: 4096 or the next power of two ≥ V, 8, 3).

    Returns:
      ``cggr_jax.scoring.TokenStatistics(lse, entropy, confidence, runner_up, nll)``, float32 of the token
      shape; ``nll = 0`` where there is no valid target, NaN statistics on non-finite rows. jit-safe.
    """
    from cggr_jax.scoring import TokenStatistics  # lazy: cggr_jax.scoring dispatches to this module

    logits, targets, ignore_index = check_inputs(logits, targets, ignore_index)
    shape = logits.shape[:-1]
    v = logits.shape[-1]
    n = math.prod(shape)
    if n == 0:
        z = jnp.zeros(shape, jnp.float32)
        return TokenStatistics(z, z, z, z, z)
    cfg = kernel_config(v, block_v=block_v, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    outs = row_statistics(logits.reshape(n, v), None if targets is None else targets.reshape(n),
                          ignore_index=ignore_index, cfg=cfg)
    lse, ent, p1, p2 = (o.reshape(shape) for o in outs[:4])
    nll = outs[4].reshape(shape) if targets is not None else jnp.zeros(shape, jnp.float32)
    return TokenStatistics(lse, ent, p1, p2, nll)
