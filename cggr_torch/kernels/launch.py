"""Launch heuristics of the Triton kernels: block shapes, warps, grid variants and their measured defaults.

One place for every launch decision (:class:`LaunchConfig` and the functions choosing one), so that the
kernels (:mod:`cggr_torch.kernels.scoring`, ``cross_entropy``, ``fused_linear``) hold only kernel code and
the benchmarks sweep alternatives here. Each default names the decision that chose it in
``benchmarks/DECISIONS.md``. Imports only ``torch``, ``..utils`` and the standard library.

Variants of the scoring stream (:mod:`cggr_torch.kernels.scoring`) for the benchmark sweep, fields of
:class:`LaunchConfig`: ``ftz`` (the stream's ``2^u`` by ``ex2.approx.ftz.f32`` inline PTX: one MUFU op instead of
MUFU plus the subnormal fix-up; results below ``2^−126`` flush to 0, far below every tolerance; CUDA only),
``lazy_top2`` (the runner-up kept as one scalar; a block's own top-2 is computed only when its maximum
exceeds it, which for real logits is a handful of the ~125 blocks of a row: one max per logit instead of
the pairwise top-2, and no top-2 lanes in registers; exact, ties included), ``persistent`` (a grid of
``persistent × #SM`` programs looping over rows) and ``evict`` (the cache eviction hint of the streaming
loads). Budget of the hot loop per logit (bf16): upcast 1, ``u`` 1, ``2^u`` 1 MUFU (+3 for the non-ftz
subnormal fix-up), ``d`` 1, ``s`` 2, top-2 3 (lazy: 0.9) - i.e. ~12.7 instructions by default and ~7.5 with
``ftz`` and ``lazy_top2``, which matters because the default loop issues close to the SM's limit at HBM rate.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
import numbers
from typing import Any, NamedTuple, Optional

import torch

from ..utils import FLOAT_DTYPES

__all__ = ["LaunchConfig", "scoring_config", "scoring_config_for_rows", "lse_config", "backward_config",
           "num_sms", "check_config_device", "interpreting", "next_pow2", "BACKWARD_FLAT_GRID",
           "DEFAULT_MEMORY_BUDGET", "ChunkPlan", "plan_chunks", "check_positive_int"]


def interpreting() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET=1``): the kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# ============================================================================================ heuristics
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and x >= 1 and (x & (x - 1)) == 0


_EVICT_POLICIES = ("evict_first", "evict_last", "")
_STORE_HINTS = ("", ".cs", ".wt", ".cg")


@dataclass(frozen=True)
class LaunchConfig:
    """Launch shape of one kernel.

    Attributes:
        rows: ``ROWS`` (power of two): vector lanes of the loop-carried state.
        group: ``GROUP`` (power of two): contiguous elements reduced inside a thread before they reach the
            state (1 = no in-thread pre-reduction). The block is ``rows·group`` logits per loop iteration.
            The backward kernel ignores the split and uses a flat block of ``rows·group`` elements.
        num_warps: warps per program (power of two, 1-32).
        ftz: scoring stream only: ``2^u`` by ``ex2.approx.ftz.f32`` (inline PTX, CUDA only; see the module
            docstring). False: ``tl.exp2``.
        persistent: scoring only: 0 = one program per row; ``p > 0`` = ``p`` programs per SM looping over the
            rows (grid ``min(N, p·#SM)``).
        evict: eviction hint of the streaming logit loads: ``'evict_first'``, ``'evict_last'`` or ``''``.
        lazy_top2: scoring only: track the row's runner-up as a scalar and compute a block's top-2 only when
            the block's maximum exceeds it (see :func:`_stream_block_lazy`; exact, ties included). False: the
            per-lane pairwise top-2 on every block.
        blocks_per_program: backward only: consecutive column blocks written by one program (grid
            ``(N, ceil(V / (BLOCK·blocks_per_program)))``).
        store_hint: backward only: cache modifier of the gradient stores (``''``, ``'.cs'``, ``'.wt'``,
            ``'.cg'``).
        flat_grid: backward only: a 1-D grid of ``N·G`` programs (``G`` column groups per row), program
            ``p`` writing group ``p mod G`` of row ``p div G``, so that programs launched one after another
            store along one row (sequential addresses). False: the 2-D grid ``(N, G)``, whose fastest
            index is the row (neighbouring programs store the same columns of different rows).
    """

    rows: int
    group: int
    num_warps: int
    ftz: bool = False
    persistent: int = 0
    evict: str = "evict_first"
    lazy_top2: bool = False
    blocks_per_program: int = 1
    store_hint: str = ""
    flat_grid: bool = False

    def __post_init__(self) -> None:
        for name in ("rows", "group", "num_warps", "blocks_per_program"):
            value = getattr(self, name)
            if not _is_pow2(value):
                raise ValueError(f"LaunchConfig.{name}: expected a power of two >= 1, got {value!r}")
        if self.num_warps > 32:
            raise ValueError(f"LaunchConfig.num_warps: expected at most 32, got {self.num_warps}")
        for name in ("ftz", "lazy_top2", "flat_grid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LaunchConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if isinstance(self.persistent, bool) or not isinstance(self.persistent, int) or self.persistent < 0:
            raise ValueError(f"LaunchConfig.persistent: expected an int >= 0 (programs per SM), got "
                             f"{self.persistent!r}")
        if self.evict not in _EVICT_POLICIES:
            raise ValueError(f"LaunchConfig.evict: expected one of {_EVICT_POLICIES}, got {self.evict!r}")
        if self.store_hint not in _STORE_HINTS:
            raise ValueError(f"LaunchConfig.store_hint: expected one of {_STORE_HINTS}, got {self.store_hint!r}")

    @property
    def block(self) -> int:
        """Logits per loop iteration (``rows·group``)."""
        return self.rows * self.group

    def describe(self) -> str:
        """Short label, e.g. ``128x8 1w ftz p21`` or ``512x8 4w bpp2 flat``."""
        parts = [f"{self.rows}x{self.group}", f"{self.num_warps}w"]
        if self.ftz:
            parts.append("ftz")
        if self.lazy_top2:
            parts.append("lazy")
        if self.persistent:
            parts.append(f"p{self.persistent}")
        if self.evict != "evict_first":
            parts.append(f"evict={self.evict or 'none'}")
        if self.blocks_per_program != 1:
            parts.append(f"bpp{self.blocks_per_program}")
        if self.store_hint:
            parts.append(f"st{self.store_hint}")
        if self.flat_grid:
            parts.append("flat")
        return " ".join(parts)


#: Scoring / lse kernels: one warp per row and ``ROWS = 128`` lanes, i.e. four 16-byte loads per thread per
#: iteration (1024 bf16 / 512 fp32 logits). One warp needs no barrier for the per-block max (shuffles only);
#: with the next block prefetched the loop uses ~96 registers (sm_90, ptxas), so ~21 programs fit on an SM
#: with ~42 KB of loads in flight. Measured alternatives: ``benchmarks/bench_scoring_torch.py`` (sweep).
_STREAM_ROWS = 128
_STREAM_WARPS = 1
#: Scoring stream variants chosen by the sweep (see :class:`LaunchConfig`): flush-to-zero exp2 + lazy
#: runner-up + no eviction hint streamed at 1.044x the read-once floor on the H200 at N = 16384, V = 128256 bf16
#: (1.057x at V = 131072), against 1.129x / 1.171x for the plain stream (DECISIONS.md: scoring-launch-variants).
_STREAM_FTZ = True
_STREAM_LAZY_TOP2 = True
_STREAM_PERSISTENT = 0
_STREAM_EVICT = ""
#: Backward kernel: bytes of gradient per block (the grid is rows × column-block groups), with four 16-byte
#: vectors per thread; ``_BACKWARD_BLOCKS_PER_PROGRAM`` consecutive blocks per program and the cache modifier
#: of the gradient stores are sweep variants (``benchmarks/bench_selective_ce_torch.py``), and so is the
#: flat (row-major) grid: the 2-D grid's launch order scatters consecutive programs' stores one row
#: (V·elsize bytes) apart; the flat grid keeps them sequential, which suits the DRAM write path better.
#: On the H200 at N = 16384, V = 128256 bf16, 25 % selected: 2-D grid 1316 µs, flat 1183 µs, flat + streaming
#: stores (``.cs``) 1175 µs (1439 / 1215 / 1204 µs at V = 131072) - adopted (DECISIONS.md: ce-backward-flat-grid).
_BACKWARD_BYTES = 8192
_BACKWARD_BLOCKS_PER_PROGRAM = 1
_BACKWARD_STORE_HINT = ".cs"
BACKWARD_FLAT_GRID = True


def _warps_for(rows: int) -> int:
    """Four 16-byte vectors per thread: ``rows // 128`` warps, clamped to ``[1, 8]``."""
    return max(1, min(8, rows // 128))


def _element_size(dtype: torch.dtype) -> int:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    return torch.finfo(dtype).bits // 8


def scoring_config(vocab_size: int, dtype: torch.dtype) -> LaunchConfig:
    """Heuristic block for the one-pass scoring kernel (one program per row, a loop over the row).

    ``GROUP`` = elements of one 16-byte load (8 for bf16/fp16, 4 for fp32, 2 for fp64), ``ROWS = 128``
    (fewer, a power of two, for rows shorter than one block), one warp.
    """
    group = max(1, 16 // _element_size(dtype))
    block = max(group, min(_STREAM_ROWS * group, _next_pow2(vocab_size)))
    ftz = _STREAM_FTZ and not interpreting()
    return LaunchConfig(rows=block // group, group=group, num_warps=_STREAM_WARPS, ftz=ftz,
                        persistent=_STREAM_PERSISTENT, lazy_top2=_STREAM_LAZY_TOP2, evict=_STREAM_EVICT)


#: One-warp scoring programs per SM below which the stream cannot keep enough loads in flight: with fewer
#: rows than ``_STREAM_MIN_WARPS_PER_SM · #SM`` each row gets several warps (see
#: :func:`scoring_config_for_rows`). The fused LM head scores blocks of 896 rows (bf16, V = 128256): on an
#: H200 (132 SMs) 18 such launches took 1.88 ms with 1 warp per row, 1.50 ms with 2, 1.89 ms with 4 and
#: 1.65 ms with 8 (the read floor is ~0.93 ms), so 8 per SM - 2 warps for those blocks - is adopted
#: (DECISIONS.md: scoring-few-row-launch).
_STREAM_MIN_WARPS_PER_SM = 8


def scoring_config_for_rows(n_rows: int, vocab_size: int, dtype: torch.dtype, sms: int) -> LaunchConfig:
    """:func:`scoring_config` for a launch of only ``n_rows`` rows on ``sms`` SMs.

    With ``n_rows ≥ _STREAM_MIN_WARPS_PER_SM · sms`` this is :func:`scoring_config` (one warp per row). With
    fewer rows each program gets ``w = min(8, next_pow2(⌈8·sms / n_rows⌉))`` warps and ``ROWS = 128·w`` lanes
    (still four 16-byte loads per thread per iteration; the per-block maximum then crosses warps), with
    ``ROWS`` clipped to the row length like the default and ``w`` to ``ROWS / 128``. Same statistics up to the
    summation order of the lanes.
    """
    base = scoring_config(vocab_size, dtype)
    target = _STREAM_MIN_WARPS_PER_SM * max(1, int(sms))
    if n_rows <= 0 or n_rows >= target:
        return base
    warps = min(8, _next_pow2(-(-target // int(n_rows))))
    rows = max(1, min(_STREAM_ROWS * warps, _next_pow2(vocab_size) // base.group))
    return dataclasses.replace(base, rows=rows, num_warps=max(1, min(warps, rows // _STREAM_ROWS)))


def lse_config(vocab_size: int, dtype: torch.dtype) -> LaunchConfig:
    """Heuristic block for the selective forward's log-sum-exp pass (the streaming shape of scoring; the
    scoring-only variants ``ftz``/``persistent`` do not apply)."""
    c = scoring_config(vocab_size, dtype)
    return LaunchConfig(rows=c.rows, group=c.group, num_warps=c.num_warps)


def backward_config(vocab_size: int, dtype: torch.dtype) -> LaunchConfig:
    """Heuristic block for the backward kernel: one flat block per program, ``G = ceil(V/BLOCK)`` column
    groups per row, on the grid ``(N, G)`` or (``BACKWARD_FLAT_GRID``) the row-major 1-D grid ``(N·G,)``.

    ``BLOCK = _BACKWARD_BYTES`` of gradient (4096 bf16 / 2048 fp32; the next power of two ≥ V for short
    rows), ``num_warps = BLOCK / (32·4·GROUP)`` so that each thread stores four 16-byte vectors.
    """
    elsize = _element_size(dtype)
    group = max(1, 16 // elsize)
    block = max(group, min(_BACKWARD_BYTES // elsize, _next_pow2(vocab_size)))
    rows = block // group
    return LaunchConfig(rows=rows, group=group, num_warps=_warps_for(rows),
                        blocks_per_program=_BACKWARD_BLOCKS_PER_PROGRAM, store_hint=_BACKWARD_STORE_HINT,
                        flat_grid=BACKWARD_FLAT_GRID)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def num_sms(tensor: torch.Tensor) -> int:
    """Streaming multiprocessors of the tensor's CUDA device (2 under the interpreter); cached, no sync."""
    if tensor.device.type != "cuda":
        return 2
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def check_config_device(config: LaunchConfig, tensor: torch.Tensor) -> None:
    """``ftz`` is inline PTX: refused for anything but a CUDA tensor (the interpreter cannot run it)."""
    if config.ftz and (tensor.device.type != "cuda" or interpreting()):
        raise ValueError("config.ftz: the ex2.approx.ftz inline PTX needs a CUDA tensor without "
                         "TRITON_INTERPRET; use ftz=False")


next_pow2 = _next_pow2


# ================================================================= the fused LM head's chunk plan
#: Default working-memory budget of the fused loss (bytes): 0.25 GiB.
DEFAULT_MEMORY_BUDGET: int = 2**28

#: Float32 temporaries per logit of the PyTorch reference statistics (upcast, shift, exp, e·shift, top-2).
_REFERENCE_STAT_BYTES = 28
_ALIGN = 128
#: Narrowest forward logits block (columns) before the plan splits the rows instead (very large N).
_MIN_FORWARD_COLUMNS = 4096
_FILL = 0.875  # fraction of the budget a plan aims for (the caching allocator rounds blocks up)


# ============================================================================================ chunk plan
class ChunkPlan(NamedTuple):
    """Chunk sizes of one call: the forward's logits blocks are ``row_chunk`` rows × ``forward_vocab_chunk``
    columns; the backward steps through ``vocab_chunk`` columns of the selected rows at a time."""

    row_chunk: int
    vocab_chunk: int
    forward_vocab_chunk: int


def _round_down(x: int, align: int = _ALIGN) -> int:
    return (x // align) * align if x >= align else max(1, x)


def check_positive_int(value: Any, name: str, allow_none: bool = True) -> Optional[int]:
    """``value`` as an int >= 1 (or None when allowed); ``ValueError`` naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"{name}: expected {'None or ' if allow_none else ''}an integer >= 1, got {value!r}")
    return int(value)


def _forward_columns(rows: int, vocab_size: int, elsize: int, target: int) -> int:
    """Columns of an ``rows``-row forward block within ``target`` bytes (the whole row when it fits)."""
    if rows * vocab_size * elsize <= target:
        return vocab_size
    return min(vocab_size, _round_down(target // (rows * elsize)))


def plan_chunks(num_rows: int, hidden_dim: int, vocab_size: int, dtype: torch.dtype, *,
                selected_rows: Optional[int] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                statistics_kernel: bool = True, gradient_kernel: bool = False,
                row_chunk: Optional[int] = None, inplace_accumulation: bool = False) -> ChunkPlan:
    """Chunk sizes that keep the fused loss' working memory near ``memory_budget_bytes`` (module docstring).

    Args:
        num_rows: ``N``, tokens of the call.
        hidden_dim: ``d``.
        vocab_size: ``V``.
        dtype: dtype of the hidden states and the weight (the logits' dtype).
        selected_rows: ``K``, rows of the backward (``N`` when unknown).
        memory_budget_bytes: the budget ``B`` (default 0.25 GiB).
        statistics_kernel: True when the statistics come from the Triton kernel (no float32 temporaries;
            the forward may then split the vocabulary, see the module docstring).
        gradient_kernel: True when the backward's chunk gradient is the in-place Triton kernel
            (:mod:`cggr_torch.kernels.fused_linear`: no float32 copy of the chunk).
        row_chunk: rows per forward block chosen by the caller (the plan then only sizes the columns).
        inplace_accumulation: True when the backward's float32 ``∂h_S`` accumulator is updated in place (no
            second ``K × d`` float32 buffer; cuBLAS' float32-output GEMM with ``out=``, or float32 inputs).

    Returns:
        :class:`ChunkPlan` ``(row_chunk, vocab_chunk, forward_vocab_chunk)``: ``1 ≤ row_chunk ≤ max(1, N)``,
        ``1 ≤ vocab_chunk ≤ V``, ``1 ≤ forward_vocab_chunk ≤ V`` (``V`` without the statistics kernel).
    """
    for name, value in (("num_rows", num_rows), ("hidden_dim", hidden_dim), ("vocab_size", vocab_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size: expected an integer >= 1, got {vocab_size}")
    budget = check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)
    row_chunk = check_positive_int(row_chunk, "row_chunk")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    e = torch.empty((), dtype=dtype).element_size()
    V = int(vocab_size)
    target = int(_FILL * budget)
    n = max(1, int(num_rows))
    if statistics_kernel:
        # Vocabulary blocks of all rows: GEMMs of the full height and a statistics launch with a program per
        # row (rows of a block fill the GPU); rows are split only when a block would be narrower than
        # _MIN_FORWARD_COLUMNS.
        rows = min(n, row_chunk) if row_chunk is not None else n
        cols = _forward_columns(rows, V, e, target)
        if row_chunk is None and cols < min(V, _MIN_FORWARD_COLUMNS):
            cols = min(V, _MIN_FORWARD_COLUMNS)
            rows = min(n, _round_down(target // (cols * e)))
    else:
        per_row = V * (e + _REFERENCE_STAT_BYTES)
        rows = min(n, row_chunk) if row_chunk is not None else min(n, _round_down(target // per_row))
        cols = V
    k = int(num_rows) if selected_rows is None else int(selected_rows)
    k = max(1, k)
    fixed = k * int(hidden_dim) * ((4 if inplace_accumulation else 8) + e)
    per_col = k * (e if gradient_kernel else 2 * e + 4)
    bcols = (target - fixed) // per_col if target > fixed else 0
    vocab_chunk = min(V, max(min(_ALIGN, V), _round_down(int(bcols))))
    return ChunkPlan(int(rows), int(vocab_chunk), int(cols))
