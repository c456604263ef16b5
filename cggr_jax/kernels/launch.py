"""Launch parameters of the Pallas kernels and their defaults (the kernels' only tunables).

:class:`Launch` is what a caller may pass; :class:`LaunchDefaults` the defaults of one kernel
(:data:`SCORING_DEFAULTS`, :data:`BACKWARD_DEFAULTS`), chosen by GPU sweeps whose evidence is recorded in
``DECISIONS.md`` (``pallas-launch-defaults``, ``scoring-few-row-launch``, ``ce-backward-flat-grid``);
:func:`kernel_config` validates a launch into the hashable :class:`KernelConfig` the kernels take;
:func:`scoring_config_for_rows` is the few-row heuristic of the fused LM head's blocks. A leaf: imports no
other ``cggr_jax`` module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import utils

__all__ = [
    "PALLAS_GPU_BACKEND",
    "Launch",
    "LaunchDefaults",
    "KernelConfig",
    "SCORING_DEFAULTS",
    "BACKWARD_DEFAULTS",
    "BACKWARD_FLAT_GRID",
    "MAX_FLAT_PROGRAMS",
    "STREAM_MIN_WARPS_PER_SM",
    "kernel_config",
    "tile_columns",
    "scoring_config_for_rows",
    "num_sms",
    "resolve_interpret",
    "DEFAULT_MEMORY_BUDGET",
    "ChunkPlan",
    "plan_chunks",
]

# ------------------------------------------------------------------------------------------------ backend
#: How ``pallas_call`` is lowered on a GPU. ``"triton"``: Pallas' Triton backend, selected explicitly with
#: ``jax.experimental.pallas.triton.CompilerParams`` (present in jax 0.10.x and 0.11.x; 0.11 deprecates it
#: with a warning at lowering but keeps it). Why not Mosaic GPU (the default backend of a bare
#: ``pl.pallas_call`` since jax 0.10): its generic ``pallas_call`` path is itself deprecated in favour of
#: ``plgpu.kernel`` (an API that changed between 0.10 and 0.11), it has no masked load with a fill value
#: (a ragged vocabulary block must read as −∞) and needs warpgroup-level code for a row reduction, while this
#: workload — a bandwidth-bound streaming reduction without matmuls — gains nothing from wgmma/TMA on Hopper.
#: This constant is the only place that names the lowering; :func:`_compiler_params` reads it.
PALLAS_GPU_BACKEND: str = "triton"

# ------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch parameters of one kernel; ``None`` fields take the kernel's defaults.

    ``block_rows``: token rows per program (power of two); ``block_v``: vocabulary columns per loop step
    (scoring) or per program (backward), a power of two; ``num_warps``: warps per program (power of two);
    ``num_stages``: Triton's ``num_stages`` (passed through; no effect on these loops, see the module doc).
    """

    block_rows: Optional[int] = None
    block_v: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None

    def kwargs(self) -> dict[str, Optional[int]]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LaunchDefaults:
    """Default launch of a kernel: ``block_bytes`` is the width of one row's step in bytes, so that
    ``block_v = block_bytes // itemsize`` (the same loads per thread for bf16/fp16 and fp32)."""

    block_rows: int
    block_bytes: int
    num_warps: int
    num_stages: int


#: Scoring kernel defaults: one warp per program owning one row, 2 KiB of the row per step (bf16: 1024
#: logits, four 16-byte loads per thread, the next step prefetched). Switch with the best line printed by
#: ``benchmarks/bench_scoring_jax.py``. Within 1.11x of the H200's bandwidth floor, the best of the sweep
#: (DECISIONS.md: pallas-launch-defaults).
SCORING_DEFAULTS = LaunchDefaults(block_rows=1, block_bytes=4096, num_warps=1, num_stages=1)
#: Selective-CE backward defaults: one row × 8 KiB of gradient per program (bf16: 4096 columns), 4 warps
#: (four 16-byte stores per thread). Switch with ``benchmarks/bench_selective_ce_jax.py``; the best of the
#: H200 sweep (DECISIONS.md: pallas-launch-defaults).
BACKWARD_DEFAULTS = LaunchDefaults(block_rows=1, block_bytes=16384, num_warps=8, num_stages=1)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Validated static launch parameters (hashable: used as a ``custom_vjp`` non-differentiable argument).

    ``block_rows``: token rows per program; ``block_v``: vocabulary columns per step (scoring) or per program
    (backward); ``num_warps``, ``num_stages``: Triton launch options (ignored by the interpreter);
    ``interpret``: run the kernel as ``pallas_call(..., interpret=True)``.
    """

    block_rows: int
    block_v: int
    num_warps: int
    num_stages: int
    interpret: bool
    #: the selective cross-entropy backward's grid order (:data:`BACKWARD_FLAT_GRID`); unused by scoring.
    flat_grid: bool = False


def _is_pow2(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 and not x & (x - 1)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def kernel_config(vocab: int, itemsize: int = 2, *, defaults: LaunchDefaults = SCORING_DEFAULTS,
                  block_rows: Optional[int] = None, block_v: Optional[int] = None,
                  num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                  interpret: Optional[bool] = None) -> KernelConfig:
    """Validate/default the launch parameters for a vocabulary of ``vocab`` columns of ``itemsize`` bytes.

    Defaults come from ``defaults`` (:data:`SCORING_DEFAULTS` or :data:`BACKWARD_DEFAULTS`); the default
    ``block_v`` is ``defaults.block_bytes // itemsize`` capped at the next power of two ≥ ``vocab`` (and at
    least 16). ``ValueError`` for a parameter that is not a power of two (``num_stages``: a positive int).
    """
    if block_rows is None:
        block_rows = defaults.block_rows
    if not _is_pow2(block_rows):
        raise ValueError(f"block_rows must be a positive power of two, got {block_rows!r}")
    if block_v is None:
        block_v = max(16, min(defaults.block_bytes // max(1, itemsize), _next_pow2(vocab)))
    if not _is_pow2(block_v):
        raise ValueError(f"block_v must be a positive power of two, got {block_v!r}")
    num_warps = defaults.num_warps if num_warps is None else num_warps
    if not _is_pow2(num_warps) or num_warps > 32:
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
    num_stages = defaults.num_stages if num_stages is None else num_stages
    if not isinstance(num_stages, (int, np.integer)) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    return KernelConfig(int(block_rows), int(block_v), int(num_warps), int(num_stages),
                        resolve_interpret(interpret))


def tile_columns(cfg: KernelConfig, itemsize: int) -> int:
    """Columns ``C`` of one ``(R, C)`` sub-tile (module doc): ``32·vec·max(1, num_warps // R)``, at most
    ``block_v``; ``vec`` = elements of a 16-byte load."""
    vec = max(1, 16 // max(1, itemsize))
    return min(cfg.block_v, 32 * vec * max(1, cfg.num_warps // cfg.block_rows))


#: One-warp scoring programs resident per SM below which the stream cannot keep enough loads in flight
#: (the value measured for the PyTorch twin of this kernel; DECISIONS.md: scoring-few-row-launch; see
#: :func:`scoring_config_for_rows`).
STREAM_MIN_WARPS_PER_SM = 8


def scoring_config_for_rows(n_rows: int, vocab: int, itemsize: int, sms: int) -> Launch:
    """Launch of the scoring kernel for a call of only ``n_rows`` rows on ``sms`` SMs.

    ``Launch()`` (the :data:`SCORING_DEFAULTS`) when ``n_rows ≥ 8·sms``. With fewer rows (the fused LM head's
    blocks) each row's program gets ``w = min(8, next_pow2(⌈8·sms / n_rows⌉))`` warps and a step ``w`` times
    as wide (the same loads per thread), with the step clipped to the row like the default and ``w`` to the
    widening that clipping leaves. Same statistics up to the summation order.
    """
    target = STREAM_MIN_WARPS_PER_SM * max(1, int(sms))
    if n_rows <= 0 or n_rows >= target:
        return Launch()
    warps = min(8, _next_pow2(-(-target // int(n_rows))))
    base_v = max(16, min(SCORING_DEFAULTS.block_bytes // max(1, itemsize), _next_pow2(vocab)))
    block_v = max(16, min(SCORING_DEFAULTS.block_bytes * warps // max(1, itemsize), _next_pow2(vocab)))
    warps = max(1, min(warps, block_v // base_v)) * SCORING_DEFAULTS.num_warps
    return Launch(block_v=block_v, num_warps=min(32, warps))


def num_sms() -> int:
    """Streaming multiprocessors of the default JAX GPU device, as ``cggr_torch.kernels.scoring.num_sms`` (2
    when it reports none or is not a GPU, as the PyTorch twin does under its interpreter)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no backend at all
        return 2
    count = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
    return int(count) if isinstance(count, (int, np.integer)) and count > 0 else 2


def resolve_interpret(interpret: Optional[bool]) -> bool:
    """``interpret=None``: compile for the GPU when the default backend is a GPU, interpret otherwise."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    return bool(interpret)


#: Grid order of the selective cross-entropy backward when the caller passes ``flat_grid=None``. ``False``:
#: the 2-D grid ``(⌈N / R⌉, ⌈V / block_v⌉)`` (the Triton lowering launches ``program_id(0)`` fastest, so
#: consecutive programs write the same column tile of successive row tiles, one logits row apart). ``True``:
#: a flat 1-D grid in row-major order, whose consecutive programs store contiguously. The PyTorch twin of
#: the kernel is faster with the flat grid; the Pallas variant keeps the 2-D grid until it is measured
#: (DECISIONS.md: ce-backward-flat-grid). Both give bit-identical gradients.
BACKWARD_FLAT_GRID: bool = False

#: Largest flat grid (programs): CUDA's ``gridDim.x`` limit, and ``program_id`` is int32.
MAX_FLAT_PROGRAMS = 2**31 - 1


#: Default working-memory budget (bytes): 0.25 GiB.
DEFAULT_MEMORY_BUDGET: int = 2**28

_REFERENCE_STAT_BYTES = 16
_ALIGN = 128
_FILL = 0.875
#: Narrowest forward logits block (columns) before the plan splits the rows instead (very large N); the
#: same value as ``cggr_torch.fused_linear``.
_MIN_FORWARD_COLUMNS = 4096


# ------------------------------------------------------------------------------- the fused head's chunk plan
class ChunkPlan(NamedTuple):
    """Chunk sizes of one call: the forward's logits blocks are ``row_chunk`` rows × ``forward_vocab_chunk``
    columns; the backward steps through ``vocab_chunk`` columns of the selected rows at a time."""

    row_chunk: int
    vocab_chunk: int
    forward_vocab_chunk: int


def _round_down(x: int, align: int = _ALIGN) -> int:
    return (x // align) * align if x >= align else max(1, x)


def _forward_columns(rows: int, vocab_size: int, elsize: int, target: int) -> int:
    """Columns of a ``rows``-row forward block within ``target`` bytes (the whole row when it fits)."""
    if rows * vocab_size * elsize <= target:
        return vocab_size
    return min(vocab_size, _round_down(target // (rows * elsize)))


def plan_chunks(num_rows: int, hidden_dim: int, vocab_size: int, dtype: Any, *,
                selected_rows: Optional[int] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                statistics_kernel: bool = True, logits_dtype: Any = None,
                row_chunk: Optional[int] = None) -> ChunkPlan:
    """Chunk sizes that keep the working memory near ``memory_budget_bytes`` (see the module docstring).

    Args:
        num_rows: ``N``; hidden_dim: ``d``; vocab_size: ``V``.
        dtype: dtype of the hidden states and weight; ``logits_dtype``: that of the logits (default ``dtype``).
        selected_rows: rows of the backward buffer (``capacity``; ``N`` when None).
        memory_budget_bytes: the budget (default 0.25 GiB).
        statistics_kernel: True (default, as in ``cggr_torch``) when the statistics come from the Pallas
            kernel (no float32 temporaries; the forward may then split the vocabulary, see the module
            docstring); False for the XLA reference (whole rows).
        row_chunk: rows per forward block chosen by the caller (the plan then only sizes the columns).

    Returns:
        :class:`ChunkPlan` ``(row_chunk, vocab_chunk, forward_vocab_chunk)``: ``1 ≤ row_chunk ≤ max(1, N)``,
        ``1 ≤ vocab_chunk ≤ V``, ``1 ≤ forward_vocab_chunk ≤ V`` (``V`` without the statistics kernel).
    """
    num_rows = utils.check_int(num_rows, "num_rows", minimum=0)
    hidden_dim = utils.check_int(hidden_dim, "hidden_dim", minimum=0)
    vocab_size = utils.check_int(vocab_size, "vocab_size", minimum=1)
    budget = utils.check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
    row_chunk = None if row_chunk is None else utils.check_int(row_chunk, "row_chunk", minimum=1)
    e = jnp.dtype(dtype).itemsize
    ell = jnp.dtype(dtype if logits_dtype is None else logits_dtype).itemsize
    target = int(_FILL * budget)
    n = max(1, num_rows)
    if statistics_kernel:
        # Vocabulary blocks of all rows: GEMMs of the full height and a statistics launch with a program per
        # row (the rows of a block fill the GPU); rows are split only when a block would be narrower than
        # _MIN_FORWARD_COLUMNS (very large N).
        rows = min(n, row_chunk) if row_chunk is not None else n
        cols = _forward_columns(rows, vocab_size, ell, target)
        if row_chunk is None and cols < min(vocab_size, _MIN_FORWARD_COLUMNS):
            cols = min(vocab_size, _MIN_FORWARD_COLUMNS)
            rows = min(n, _round_down(target // (cols * ell)))
    else:
        # The XLA reference statistics take whole rows (their float32 temporaries are what is sized here).
        per_row = vocab_size * (ell + _REFERENCE_STAT_BYTES)
        rows = min(n, row_chunk) if row_chunk is not None else min(n, _round_down(target // per_row))
        cols = vocab_size
    k = max(1, num_rows if selected_rows is None else int(selected_rows))
    fixed = k * hidden_dim * (4 + e)
    per_col = k * (ell + 8 + e)
    bcols = (target - fixed) // per_col if target > fixed else 0
    vocab_chunk = min(vocab_size, max(min(_ALIGN, vocab_size), _round_down(int(bcols))))
    return ChunkPlan(int(rows), int(vocab_chunk), int(cols))
