r"""Fused LM head + CGGR selective cross-entropy: the ``(N, V)`` logits are never held in memory.

With hidden states ``h ∈ R^{N×d}``, an LM-head weight ``W ∈ R^{V×d}`` (the ``nn.Linear`` layout) and an
optional bias ``b ∈ R^V``, the logits of token ``i`` are ``z_i = W h_i + b``. CGGR (SPEC §2-§8) needs every
row's statistics to choose the selection ``S``, but only the selected rows in the loss::

    loss = Σ_{i∈S} nll_i / max(1, |S|),     nll_i = lse_i − z_i[t_i]

    g_i = ∂loss/∂z_i = (softmax(z_i) − onehot(t_i)) / max(1, |S|)      for i ∈ S, 0 otherwise
    ∂loss/∂h_i = g_i W          (zero for every unselected row)
    ∂loss/∂W   = Σ_{i∈S} g_iᵀ h_i = G_Sᵀ H_S
    ∂loss/∂b   = Σ_{i∈S} g_i

**Forward** (no gradient graph, no host synchronisation): the logits are produced in blocks of ``R`` rows ×
``C`` vocabulary columns, ``Z_b = H_r W[v0:v1]ᵀ + b[v0:v1]`` (one cuBLAS matmul in the inputs' dtype), each
block's statistics are taken and the block is dropped. With the Triton statistics kernel (CUDA) the plan
keeps all rows in one block (``R = N``) and splits the vocabulary: tall GEMMs, and a statistics launch of one
program per row that resumes each row's streaming state - running max, runner-up, the rescaled sums
``d = Σ 2^u`` and ``s = Σ 2^u·u``, the target logit - where the previous column block left it
(:func:`cggr_torch.kernels.scoring.launch_scoring_chunk`; the last block writes the statistics). Row blocks
instead starve the statistics pass: a block of 896 rows cannot fill 132 SMs. The PyTorch reference
statistics (other devices) take whole rows. Only the five float32 statistics per row survive. Then the
difficulty (§3), eligibility (§4), ratio (§5), selection (§7) and the loss value ``Σ_S nll / |S|`` come from
the statistics alone — the forward computes no extra matmul for the loss.

**Backward** (:mod:`cggr_torch.fused_linear_backward`) recomputes the logits of the selected rows only. The
``K = |S|`` selected rows are gathered (``H_S``: ``K × d``); for each vocabulary chunk ``[v0, v1)`` of ``C`` columns::

    Z   = H_S W[v0:v1]ᵀ + b[v0:v1]                 (K × C, inputs' dtype, float32 accumulation in cuBLAS)
    G   = (exp(Z − lse_S) − onehot) · grad / |S|   (float32 arithmetic, with the forward's saved lse)
    ∂h_S   += G W[v0:v1]                            (float32 accumulator K × d)
    ∂W[v0:v1] = Gᵀ H_S                              (one matmul over all K rows: float32 accumulation)
    ∂b[v0:v1] = Σ_rows G                            (float32)

On CUDA the second line is one Triton pass that overwrites ``Z`` with ``G`` in the inputs' dtype
(:mod:`cggr_torch.kernels.fused_linear`: 4 bytes moved per bf16 logit instead of ~20 for the PyTorch
element-wise ops, which remain the reference on other devices), and ``∂h_S`` is accumulated with cuBLAS'
float32-output GEMM (``torch.addmm(..., out_dtype=torch.float32, out=acc)``, in place) where the installed
PyTorch has it, so no partial product is rounded to bf16 before the sum.

``∂W`` is accumulated in float32 inside a single GEMM per vocabulary chunk (no ``V × d`` float32 buffer),
and every vocabulary chunk is visited once. Matmul work: one full forward (``2NVd`` FLOPs) plus three
matmuls on the ``K`` selected rows (recompute, ``∂h``, ``∂W``: ``6KVd``), i.e. ``1 + 3ρ`` matmul
equivalents at ratio ``ρ = K/N`` (1.75 at ``ρ = 0.25``) against 3 for a full-gradient fused kernel. Keeping the
selected rows' softmax from the forward would save the recompute (1.5) but the selection is only known after
*all* rows are scored, and the ``K × V`` buffer it needs (1 GiB in bf16 at ``K = 4096, V = 128256``) is four
times the memory budget below; recomputation is therefore the design.

The backward reads ``K`` on the host (to size the gathered buffer): on CUDA the count is copied to pinned
memory with a non-blocking copy in the forward, and the backward waits only for that copy's event (on the
H200 that wait cost nothing measurable: DECISIONS.md: fused-head-count-wait). The
forward itself never synchronises. Unselected, ignored and non-finite rows are never read in the backward, so
their gradient is exactly zero (never ``0·NaN``).

**Memory heuristic** (:func:`plan_chunks`, in :mod:`cggr_torch.kernels.launch` with the other launch plans; overridable by ``row_chunk_size`` / ``vocab_chunk_size``; all
sizes in bytes, ``e`` = element size of the inputs, ``B`` = ``memory_budget_bytes``, default 0.25 GiB):

* forward with the statistics kernel: a block of ``R × C`` logits holds ``R·C·e`` bytes (the kernel reads
  them in place); ``R = N`` and ``C = V`` when ``N·V·e ≤ 7/8·B``, else ``C = round_down_128(7/8 · B / (N·e))``
  (and, should that be narrower than 4096 columns, ``C = 4096`` and ``R = round_down_128(7/8·B / (C·e))``).
  At ``N = 16384, d = 2048, V = 128256`` bf16: ``C = 7168`` (18 blocks, 224 MiB of logits).
* forward with the PyTorch reference statistics (``s = 28`` bytes of float32 temporaries per logit): whole
  rows, ``R = round_down_128(7/8 · B / (V·(e + s)))`` (at least 1, at most ``N``).
* backward: ``K·d·(a + e)`` bytes are fixed (``H_S`` and the float32 ``∂h_S`` accumulator: ``a = 4`` when it
  is updated in place - cuBLAS' float32-output GEMM with ``out=``, or float32 inputs - else ``a = 8`` for its
  next value) and a chunk of ``C`` columns adds ``K·C·c`` with ``c = e`` with the in-place gradient kernel
  (``Z`` becomes ``G``) and ``c = 2e + 4`` with the PyTorch element-wise ops (``Z``, float32 ``G``, ``G`` in
  the inputs' dtype), so ``C = round_down_128((7/8 · B − fixed) / (K·c))``, at least 128 (or ``V``). At
  ``K = 4096`` (ratio 0.25), ``d = 2048`` bf16 this is ``C = 22528`` with the kernel and the in-place
  accumulator on CUDA (6 vocabulary chunks at ``V = 128256``) and ``C = 4608`` with neither. The fixed part
  alone reaches ``7/8·B`` when ``K·d·(a + e) ≥ 7/8·B`` (``K ≥ 19115`` at ``d = 2048`` bf16 in place, i.e.
  more rows than the 16384 tokens of the benchmark; ``K ≥ 11469`` with ``a = 8``, a ratio ≥ 0.7 as early in
  the warmup); ``C`` is then 128 and the working set exceeds the budget by that fixed part.

The gradients themselves (``∂h``: ``N × d``, ``∂W``: ``V × d``, ``∂b``) are outputs, not working memory.

**GEMM epilogues** (``head_kernel="gemm"``, kernel devices; :mod:`cggr_torch.kernels.fused_head_gemm`): the
forward's statistics are taken in the epilogue of a Triton GEMM split over the vocabulary (per-split partial
states, ``5·S·N`` floats, merged in a fixed order), so no logits block is written or re-read; the backward's
chunk gradient ``G`` is written by the epilogue of a Triton GEMM instead of a cuBLAS matmul plus the in-place
pass (the ``∂h``/``∂W`` matmuls stay cuBLAS; the chunk plan is that of the in-place kernel). The logits are
then the GEMM's float32 accumulator, not rounded to the inputs' dtype. ``"blocks"`` is the path above;
``"auto"`` is ``"blocks"`` until a same-run GPU measurement says otherwise (DECISIONS.md: gemm-epilogue-head).
Where dispatch selects the PyTorch reference (no kernel device, ``CGGR_DISABLE_KERNELS=1``) every value runs
the reference, as for every kernel.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from cggr import CGGRConfig
from cggr.config import reject_sampled_selection

from . import dispatch
from .curriculum import Schedule, base_ratio_tensor, host_step, step_tensor
# The backward pass lives in its own module; its public helpers stay importable from here.
from .fused_linear_backward import (
    SelectedRowsCrossEntropy,
    accumulate_matmul,
    accumulates_in_place,
    gradient_kernel_for,
    selected_rows_cross_entropy_op,
)
from .loss import CGGRLoss, check_schedule
from .pipeline import select_and_measure
from .scoring import check_reference_nll, compute_statistics, scores_from_statistics
from .types import TokenScores, TokenStatistics
from .kernels.launch import DEFAULT_MEMORY_BUDGET, ChunkPlan, check_positive_int, plan_chunks
from .utils import FLOAT_DTYPES, check_scoring, check_target_range, is_integer_dtype, resolve_config, widen_labels

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ChunkPlan",
    "FusedLinearCGGROutput",
    "FusedLinearCGGRLoss",
    "describe",
    "plan_chunks",
    "fused_linear_cggr",
    "fused_linear_cggr_loss",
    "fused_linear_scores",
    "score_next_tokens_fused",
    "gradient_kernel_for",
    "accumulates_in_place",
    "accumulate_matmul",
    # re-exported from cggr_torch.causal_lm (their home since the split), loaded on first use below
    "hf_base_and_head",
    "hf_causal_lm_cggr_loss",
]

#: Names that moved to :mod:`cggr_torch.causal_lm`, which imports this module: resolved lazily (PEP 562) so
#: that ``from cggr_torch.fused_linear import hf_causal_lm_cggr_loss`` keeps working without an import cycle.
_CAUSAL_LM_NAMES = ("hf_base_and_head", "hf_causal_lm_cggr_loss")


def __getattr__(name: str) -> Any:
    if name in _CAUSAL_LM_NAMES:
        from . import causal_lm

        return getattr(causal_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ========================================================================================= input checks
def describe(x: Any) -> str:
    """A short description of an argument for error messages: a tensor's dtype, shape and device, else its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_linear(hidden: Any, weight: Any, bias: Any) -> None:
    """Shapes, dtypes and devices of ``hidden (N, d) | (B, T, d)``, ``weight (V, d)``, ``bias (V,)``."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected a (N, d) or (B, T, d) floating tensor, got {describe(hidden)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: expected dtype float32, float16, bfloat16 or float64, got {hidden.dtype}")
    d = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected the LM head weight of shape (V, d) = (V, {d}), got {describe(weight)}")
    if weight.shape[1] != d:
        raise ValueError(f"weight: expected shape (V, {d}) (d = hidden.shape[-1]), got {tuple(weight.shape)}; "
                         f"an nn.Linear LM head's .weight has this layout")
    if weight.shape[0] < 1:
        raise ValueError(f"weight: the vocabulary dimension V must be >= 1, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (that of hidden), got {weight.dtype}; cast one of "
                         f"them (e.g. hidden.to(weight.dtype))")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device} (that of hidden), got {weight.device}")
    if bias is not None:
        V = weight.shape[0]
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected None or a tensor of shape ({V},), got {describe(bias)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias: expected dtype {hidden.dtype} (that of hidden), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected device {hidden.device} (that of hidden), got {bias.device}")


def _check_targets(targets: Any, hidden: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Static checks of the aligned targets, the label-dtype rule, the range check; returns them widened."""
    expected = tuple(hidden.shape[:-1])
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets: expected an integer tensor of shape {expected}, got {describe(targets)}")
    if not is_integer_dtype(targets.dtype):
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != expected:
        raise ValueError(f"targets: expected shape {expected} (the leading dims of hidden {tuple(hidden.shape)}), "
                         f"got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets: expected device {hidden.device} (that of hidden), got {targets.device}")
    targets = widen_labels(targets, ignore_index, name="targets")
    check_target_range(targets, vocab_size, ignore_index, name="targets")
    return targets


def _statistics_kernel_for(hidden: torch.Tensor) -> bool:
    return dispatch.use_kernels(hidden) and dispatch.kernel("token_statistics_triton") is not None


#: Values of ``head_kernel`` (module docstring): ``"auto"`` is ``"blocks"`` until measured otherwise.
_HEAD_KERNELS = ("auto", "gemm", "blocks")
_HEAD_GEMM_MODULE = "cggr_torch.kernels.fused_head_gemm"
_HEAD_GEMM_LOADED: dict[str, bool] = {}


@torch.compiler.disable
def _load_head_gemm() -> bool:
    return dispatch.load_kernel(_HEAD_GEMM_MODULE, "head_statistics_op") is not None


def _head_gemm_importable() -> bool:
    """Whether the GEMM-epilogue kernels import (memoised: a compiled call reads the cache, never imports)."""
    if "ok" not in _HEAD_GEMM_LOADED:
        _HEAD_GEMM_LOADED["ok"] = _load_head_gemm()
    return _HEAD_GEMM_LOADED["ok"]


def _check_head_kernel(head_kernel: Any, dtype: Optional[torch.dtype] = None) -> str:
    """``head_kernel`` validated (``ValueError`` naming it): one of ``_HEAD_KERNELS``; ``"gemm"`` has no
    float64 path (``tl.dot``), refused whatever the device so that a call never depends on where it runs."""
    if not isinstance(head_kernel, str) or head_kernel not in _HEAD_KERNELS:
        raise ValueError(f"head_kernel: expected one of {_HEAD_KERNELS}, got {head_kernel!r}")
    if head_kernel == "gemm" and dtype == torch.float64:
        raise ValueError("head_kernel: 'gemm' needs float32, float16 or bfloat16 hidden states (its Triton GEMM "
                         "has no float64 path), got float64; use head_kernel='blocks' or 'auto'")
    return head_kernel


def _head_gemm_for(hidden: torch.Tensor, head_kernel: str) -> bool:
    """True when the head's GEMMs run with the CGGR epilogues: ``head_kernel='gemm'`` where dispatch selects
    the kernels and Triton imports (a missing Triton warns once and takes the dispatch rule's path)."""
    if head_kernel != "gemm" or not dispatch.use_kernels(hidden):
        return False
    if not _head_gemm_importable():
        dispatch.warn_no_kernel(_HEAD_GEMM_MODULE)
        return False
    return True


# ==================================================================================== blockwise scoring
def _blockwise_statistics(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: Optional[torch.Tensor], ignore_index: int, row_chunk: int,
                          vocab_chunk: int, head_gemm: bool = False) -> TokenStatistics:
    """SPEC §2 statistics of every row of ``hidden2d Wᵀ + b`` from logit blocks of ``row_chunk`` rows ×
    ``vocab_chunk`` columns (flat), or (``head_gemm``) from the epilogue of the split-V Triton GEMM
    (``cggr::head_gemm_statistics``: no logits block at all; the block sizes are then unused).

    With the Triton statistics kernel each block goes to one launch that writes its rows' statistics
    straight into one ``(6, N)`` buffer (the targets were range-checked once by the caller, so no per-block
    validation or copy); a row split into vocabulary blocks carries its running state from one block's
    launch to the next (:func:`cggr_torch.kernels.scoring.launch_scoring_chunk`). Elsewhere the statistics
    dispatcher (the PyTorch reference) takes whole rows (``vocab_chunk`` is ignored: its float32 temporaries
    are what the plan sizes). The blocks run in order on one stream: a block's statistics beside the next
    block's GEMM on a side stream gained nothing reliable on the H200 (the GEMM occupies every SM;
    DECISIONS.md: fused-head-chunk-plan).
    """
    N = hidden2d.shape[0]
    V = weight.shape[0]
    dev = hidden2d.device
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        if head_gemm:
            out = torch.ops.cggr.head_gemm_statistics(hidden2d, weight, bias, targets, int(ignore_index))
            return TokenStatistics(*(out[k] for k in range(5)))
        if _statistics_kernel_for(hidden2d):
            # One custom op (cggr::fused_linear_statistics): torch.compile sees through it (SPEC §12.1).
            out = _kernel_statistics_op(hidden2d, weight, bias, targets, int(ignore_index), int(row_chunk),
                                        int(vocab_chunk))
            return TokenStatistics(*(out[k] for k in range(5)))
        out_list = [torch.empty((N,), dtype=torch.float32, device=dev) for _ in TokenStatistics._fields]
        for r0 in range(0, N, row_chunk):
            r1 = min(N, r0 + row_chunk)
            z = F.linear(hidden2d[r0:r1], weight, bias)
            st = compute_statistics(z, None if targets is None else targets[r0:r1], ignore_index)
            for buf, x in zip(out_list, st):
                buf[r0:r1] = x
            del z, st
    return TokenStatistics(*out_list)


@torch.library.custom_op("cggr::fused_linear_statistics", mutates_args=())
def _kernel_statistics_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: Optional[torch.Tensor], ignore_index: int, row_chunk: int,
                          vocab_chunk: int) -> torch.Tensor:
    """The statistics kernel's branch of :func:`_blockwise_statistics`: float32 ``(6, N)`` (rows lse,
    entropy, p1, p2, nll; the last row 0), from logit blocks that exist only inside this op."""
    N = hidden2d.shape[0]
    V = weight.shape[0]
    dev = hidden2d.device
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        from .kernels import scoring as ks
        out = torch.empty((6, N), dtype=torch.float32, device=dev)
        finite = torch.empty((N,), dtype=torch.int8, device=dev)
        C = max(1, min(int(vocab_chunk), V))
        state = torch.empty((ks.CHUNK_STATE_ROWS, N), dtype=torch.float32, device=dev) if C < V else None
        t = None if targets is None else ks.flat_targets(targets)
        for r0 in range(0, N, row_chunk):
            r1 = min(N, r0 + row_chunk)
            t_r = None if t is None else t[r0:r1]
            for v0 in range(0, V, C):
                v1 = min(V, v0 + C)
                z = F.linear(hidden2d[r0:r1], weight[v0:v1], None if bias is None else bias[v0:v1])
                # A block of few rows widens each row's program so that the GPU still streams at full rate.
                cfg = ks.scoring_config_for_rows(r1 - r0, v1 - v0, z.dtype, ks.num_sms(z))
                if state is None:
                    geom = ks.row_geometry(z)
                    ks.launch_scoring(geom, t_r, ignore_index, ks.NO_DIFFICULTY, out[:, r0:r1],
                                      finite[r0:r1], cfg)
                    del geom  # holds z too: both must go before the next block is allocated
                else:
                    ks.launch_scoring_chunk(z, t_r, ignore_index, v0, V, state[:, r0:r1], out[:, r0:r1],
                                            finite[r0:r1], cfg)
                del z
        out[5].zero_()   # no difficulty here; the row is defined all the same (deterministic outputs)
        return out


@_kernel_statistics_op.register_fake
def _(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: Optional[torch.Tensor],
      ignore_index: int, row_chunk: int, vocab_chunk: int) -> torch.Tensor:
    return torch.empty((6, hidden2d.shape[0]), dtype=torch.float32, device=hidden2d.device)



# ================================================================================================ core
class FusedLinearCGGROutput(NamedTuple):
    """Result of :func:`fused_linear_cggr`.

    Attributes:
        loss: float32 0-d loss with gradient (to ``hidden``, ``weight``, ``bias``).
        metrics: SPEC §10 numeric metrics as detached 0-d tensors (no synchronisation).
        mask: bool selection of the token shape (``hidden.shape[:-1]``).
        scores: :class:`cggr_torch.scoring.TokenScores` of every token (token shape).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    mask: torch.Tensor
    scores: TokenScores


def _forward_blocks(hidden: torch.Tensor, vocab_size: int, row_chunk_size: Optional[int],
                    vocab_chunk_size: Optional[int], memory_budget_bytes: int) -> tuple[int, int]:
    """``(rows, columns)`` of the forward's logits blocks: the caller's sizes where given, else the plan's."""
    d = hidden.shape[-1]
    N = math.prod(hidden.shape[:-1])
    plan = plan_chunks(N, d, vocab_size, hidden.dtype, memory_budget_bytes=memory_budget_bytes,
                       statistics_kernel=_statistics_kernel_for(hidden), row_chunk=row_chunk_size)
    return plan.row_chunk, (vocab_chunk_size or plan.forward_vocab_chunk)


def _run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
         step: Union[int, torch.Tensor], base: Union[np.float32, torch.Tensor], cfg: CGGRConfig,
         row_chunk_size: Optional[int],
         vocab_chunk_size: Optional[int], memory_budget_bytes: int,
         reference_nll: Optional[torch.Tensor] = None, head_kernel: str = "auto") -> FusedLinearCGGROutput:
    """The fused loss on validated inputs (``reference_nll``: checked float32, ``scoring='excess'`` only;
    ``head_kernel``: checked)."""
    token_shape = tuple(hidden.shape[:-1])
    d = hidden.shape[-1]
    V = weight.shape[0]
    hidden2d = hidden.reshape(-1, d)
    N = hidden2d.shape[0]
    row_chunk, forward_cols = _forward_blocks(hidden, V, row_chunk_size, vocab_chunk_size, memory_budget_bytes)
    gemm = _head_gemm_for(hidden, head_kernel)
    with torch.no_grad():
        flat_t = targets.reshape(-1)
        flat = _blockwise_statistics(hidden2d.detach(), weight.detach(),
                                     None if bias is None else bias.detach(), flat_t, cfg.ignore_index, row_chunk,
                                     forward_cols, gemm)
        stats = TokenStatistics(*(x.reshape(token_shape) for x in flat))
        # SPEC §3.1: excess subtracts the reference after the statistics (kernel or reference), never in them.
        scores, mask, _k, metrics = select_and_measure(stats, targets, step, base, cfg, reference_nll)[:4]
        count = metrics["tokens_selected"]
        valid = scores.valid
        safe_t = torch.where(valid & (targets >= 0) & (targets < V), targets, torch.zeros_like(targets))
        safe_t = safe_t.reshape(-1).to(torch.int64)

    if torch.compiler.is_compiling():
        loss = selected_rows_cross_entropy_op(hidden2d, weight, bias, flat.nll, mask.reshape(-1), safe_t,
                                              flat.lse, count, vocab_chunk_size or 0, memory_budget_bytes, gemm)
    else:
        loss = SelectedRowsCrossEntropy.apply(hidden2d, weight, bias, flat.nll, mask.reshape(-1), safe_t,
                                               flat.lse, count, vocab_chunk_size, memory_budget_bytes, gemm)
    return FusedLinearCGGROutput(loss, metrics, mask, scores)


def _check_chunk_args(row_chunk_size: Any, vocab_chunk_size: Any, memory_budget_bytes: Any) -> None:
    check_positive_int(row_chunk_size, "row_chunk_size")
    check_positive_int(vocab_chunk_size, "vocab_chunk_size")
    check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)


def fused_linear_cggr(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      step: Union[int, torch.Tensor], *, bias: Optional[torch.Tensor] = None,
                      scoring: str = CGGRConfig.scoring, selection: str = CGGRConfig.selection,
                      dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                      threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                      min_tokens_ratio: float = CGGRConfig.min_tokens_ratio,
                      warmup_steps: int = CGGRConfig.warmup_steps, num_strata: int = CGGRConfig.num_strata,
                      min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                      ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None,
                      row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                      memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, config: Optional[CGGRConfig] = None,
                      reference_nll: Optional[torch.Tensor] = None, head_kernel: str = "auto"
                      ) -> FusedLinearCGGROutput:
    """CGGR loss of the LM head ``z = hidden · weightᵀ + bias`` without materialising the logits.

    Equal (up to float rounding of the chunked matmuls) to ``cggr_loss(F.linear(hidden, weight, bias), targets,
    step, ...)`` with the default cross-entropy, in value, gradients and selection.

    Args:
        hidden: ``(N, d)`` or ``(B, T, d)`` float32/float16/bfloat16/float64 (a 3-D input's rows are the
            sequences of ``sequence_aware``); already aligned with ``targets`` (a causal LM shifts its labels
            first, see :func:`cggr_torch.causal_lm.hf_causal_lm_cggr_loss`).
        weight: ``(V, d)`` LM-head weight (``nn.Linear`` layout), same dtype and device as ``hidden``.
        targets: integer tensor of shape ``hidden.shape[:-1]``; values in ``[0, V)`` or ``ignore_index``.
        step: curriculum step: a host integer or a 0-d integer tensor (pass a tensor under torch.compile).
        bias: optional ``(V,)`` LM-head bias.
        scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps,
        num_strata, min_tokens_per_sequence, ignore_index, ratio_schedule: as :class:`cggr_torch.CGGRLoss`.
        row_chunk_size: rows per forward logits block (default: :func:`plan_chunks`).
        vocab_chunk_size: vocabulary columns per forward logits block (statistics kernel only; the reference
            statistics take whole rows) and per backward step (default: :func:`plan_chunks`, its
            ``forward_vocab_chunk`` and, with the real ``K``, its ``vocab_chunk``).
        memory_budget_bytes: working-memory target of the default plan (bytes, default 0.25 GiB).
        config: a ready :class:`cggr.CGGRConfig` instead of the settings.
        reference_nll: with ``scoring='excess'`` (and only then) the reference model's per-token loss, a
            floating tensor of the targets' shape aligned like them (SPEC §3.1); no gradient.
        head_kernel: ``"blocks"`` (cuBLAS logits blocks, then the statistics kernel / the in-place gradient
            pass), ``"gemm"`` (the statistics and the chunk gradient in Triton GEMM epilogues; not float64) or
            ``"auto"`` (today ``"blocks"``); kernel devices only (module docstring).

    Raises:
        ValueError: bad shapes/dtypes/devices/configuration, a missing/misplaced/mis-shaped ``reference_nll``,
            a bad ``head_kernel``, or (CPU) targets out of range. On CUDA an
            out-of-range label trips a device-side assertion (no synchronisation).
    """
    cfg = resolve_config(config, dict(
        scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
        threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
        num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index))
    reject_sampled_selection(cfg, "fused_linear_cggr")
    schedule = check_schedule(ratio_schedule, cfg)
    _check_chunk_args(row_chunk_size, vocab_chunk_size, memory_budget_bytes)
    if not isinstance(step, torch.Tensor):
        host_step(step)
    _check_linear(hidden, weight, bias)
    _check_head_kernel(head_kernel, hidden.dtype)
    targets = _check_targets(targets, hidden, weight.shape[0], cfg.ignore_index)
    ref = check_reference_nll(reference_nll, cfg.scoring, tuple(targets.shape), device=hidden.device)
    s = step_tensor(step, hidden.device)
    base = base_ratio_tensor(schedule, s, host=None if isinstance(step, torch.Tensor) else (lambda: int(step)))
    return _run(hidden, weight, targets, bias, s, base, cfg, row_chunk_size, vocab_chunk_size,
                int(memory_budget_bytes), ref, head_kernel)


def fused_linear_cggr_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           step: Union[int, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor,
                                                                                    dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of :func:`fused_linear_cggr` (same arguments): the functional form, mirroring
    :func:`cggr_torch.cggr_loss`."""
    out = fused_linear_cggr(hidden, weight, targets, step, **kwargs)
    return out.loss, out.metrics


# =============================================================================================== module
class FusedLinearCGGRLoss(CGGRLoss):
    """:class:`cggr_torch.CGGRLoss` fused with the LM head: ``forward(hidden, weight, targets, bias=None)``.

    Same configuration, ``step()``, ``get_metrics()`` and ``state_dict()`` as ``CGGRLoss`` (the default
    float32 cross-entropy; no ``base_loss``), plus the chunking arguments and ``head_kernel`` of
    :func:`fused_linear_cggr`.
    The logits are never materialised; see the module docstring for the algorithm and memory heuristic.

    Example::

        criterion = FusedLinearCGGRLoss(min_tokens_ratio=0.25, warmup_steps=1000)
        hidden = model.model(input_ids).last_hidden_state            # (B, T, d)
        loss = criterion(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
        loss.backward(); optimizer.step(); criterion.step()
    """

    def __init__(self, scoring: str = CGGRConfig.scoring, selection: str = CGGRConfig.selection,
                 dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                 threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                 min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
                 num_strata: int = CGGRConfig.num_strata,
                 min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                 ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None, *,
                 row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, config: Optional[CGGRConfig] = None,
                 head_kernel: str = "auto") -> None:
        super().__init__(scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
                         threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                         warmup_steps=warmup_steps, num_strata=num_strata,
                         min_tokens_per_sequence=min_tokens_per_sequence, base_loss=None,
                         ignore_index=ignore_index, ratio_schedule=ratio_schedule, config=config)
        reject_sampled_selection(self.config, "FusedLinearCGGRLoss")
        _check_chunk_args(row_chunk_size, vocab_chunk_size, memory_budget_bytes)
        self.row_chunk_size = row_chunk_size
        self.vocab_chunk_size = vocab_chunk_size
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.head_kernel = _check_head_kernel(head_kernel)
        if head_kernel == "gemm":
            _head_gemm_importable()  # imported now, so that a compiled forward never has to

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                bias: Optional[torch.Tensor] = None, reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selective loss of one batch (float32 scalar) from the LM head's inputs. Never synchronises.
        ``reference_nll``: as :meth:`cggr_torch.CGGRLoss.forward` (``scoring='excess'``, SPEC §3.1)."""
        _check_linear(hidden, weight, bias)
        _check_head_kernel(self.head_kernel, hidden.dtype)
        targets = _check_targets(targets, hidden, weight.shape[0], self.config.ignore_index)
        ref = check_reference_nll(reference_nll, self.config.scoring, tuple(targets.shape), device=hidden.device)
        step, base = self.base_ratio_on(hidden.device)
        out = _run(hidden, weight, targets, bias, step, base, self.config,
                   self.row_chunk_size, self.vocab_chunk_size, self.memory_budget_bytes, ref, self.head_kernel)
        self._metrics = out.metrics
        return out.loss

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, row_chunk_size={self.row_chunk_size}, "
                f"vocab_chunk_size={self.vocab_chunk_size}, memory_budget_bytes={self.memory_budget_bytes}, "
                f"head_kernel={self.head_kernel!r}")


# ================================================================================ forward-only scores
def fused_linear_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, *, scoring: str = CGGRConfig.scoring,
                        ignore_index: int = CGGRConfig.ignore_index, valid_mask: Optional[torch.Tensor] = None,
                        row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                        reference_nll: Optional[torch.Tensor] = None, head_kernel: str = "auto") -> TokenScores:
    """SPEC §2-§4 scores of the logits ``hidden · weightᵀ + bias`` without materialising them (router use).

    Equal to ``score_tokens(F.linear(hidden, weight, bias), targets, scoring=..., ...)`` up to the rounding of
    the chunked matmuls. No gradient flows through the result.

    Args:
        hidden: ``(N, d)`` or ``(B, T, d)`` floating tensor.
        weight: ``(V, d)``, same dtype/device.
        targets: optional integer tensor of the token shape (needed for ``nll``; ``scoring='loss'``).
        bias: optional ``(V,)``.
        scoring, ignore_index, valid_mask, reference_nll: as :func:`cggr_torch.score_tokens`.
        row_chunk_size, memory_budget_bytes: as :func:`fused_linear_cggr`.
        vocab_chunk_size: vocabulary columns per logits block (as :func:`fused_linear_cggr`'s forward).
        head_kernel: as :func:`fused_linear_cggr` (its forward statistics).
    """
    check_scoring(scoring)
    if scoring == "loss" and targets is None:
        raise ValueError("targets: scoring='loss' needs targets, got None")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
    _check_chunk_args(row_chunk_size, vocab_chunk_size, memory_budget_bytes)
    _check_linear(hidden, weight, bias)
    _check_head_kernel(head_kernel, hidden.dtype)
    token_shape = tuple(hidden.shape[:-1])
    if targets is not None:
        targets = _check_targets(targets, hidden, weight.shape[0], int(ignore_index))
    reference_nll = check_reference_nll(reference_nll, scoring, token_shape, has_targets=targets is not None,
                                        device=hidden.device)
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool \
                or tuple(valid_mask.shape) != token_shape:
            raise ValueError(f"valid_mask: expected a bool tensor of shape {token_shape}, got {describe(valid_mask)}")
        if valid_mask.device != hidden.device:
            raise ValueError(f"valid_mask: expected device {hidden.device}, got {valid_mask.device}")
    d = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, d)
    row_chunk, forward_cols = _forward_blocks(hidden, weight.shape[0], row_chunk_size, vocab_chunk_size,
                                              int(memory_budget_bytes))
    flat = _blockwise_statistics(hidden2d.detach(), weight.detach(), None if bias is None else bias.detach(),
                                 None if targets is None else targets.reshape(-1), int(ignore_index), row_chunk,
                                 forward_cols, _head_gemm_for(hidden, head_kernel))
    stats = TokenStatistics(*(x.reshape(token_shape) for x in flat))
    with torch.no_grad():
        return scores_from_statistics(stats, targets, scoring, int(ignore_index), valid_mask, reference_nll)


def score_next_tokens_fused(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], *,
                            scoring: str, ignore_index: int, shift: bool = True,
                            memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> tuple[TokenScores, torch.Tensor]:
    """:func:`score_next_tokens` of the logits ``hidden · weightᵀ + bias`` without materialising them.

    ``hidden`` ``(B, T, d)`` are the router's final (normed) hidden states; the logits are formed block by
    block by :func:`cggr_torch.fused_linear.fused_linear_scores` (row-chunked matmul, then the Triton scoring
    kernel on CUDA) and only the five float32 statistics per token are kept. Instead of slicing the hidden
    states (a copy of ``B·(T−1)·d`` values) the *labels* are shifted: position ``t`` is scored against
    ``labels[:, t+1]`` and the last position gets ``ignore_index``; its statistics and difficulty are then set
    to 0, so the result equals :func:`score_next_tokens` on ``F.linear(hidden, weight, bias)`` up to the
    rounding of the chunked matmul. Under ``torch.autocast`` the matmul runs in the autocast dtype, as
    ``nn.Linear`` would. No host synchronisation.

    Returns:
        ``(scores, nonfinite)`` as :func:`score_next_tokens`.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):  # the head would run in the autocast dtype: so do the blocks
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if labels is None:
        valid_mask = None if attention_mask is None else attention_mask != 0
        scores = fused_linear_scores(hidden, weight, None, bias, scoring=scoring, valid_mask=valid_mask,
                                     memory_budget_bytes=memory_budget_bytes)
    else:
        tgt = labels if attention_mask is None else labels.masked_fill(attention_mask == 0, ignore_index)
        if shift:
            tgt = torch.cat([tgt[:, 1:], tgt.new_full((tgt.shape[0], 1), ignore_index)], dim=1)
        # Same check (and message) as the logits path; a device assertion on CUDA, no synchronisation.
        check_target_range(tgt, weight.shape[0], ignore_index, name="labels")
        scores = fused_linear_scores(hidden, weight, tgt, bias, scoring=scoring, ignore_index=ignore_index,
                                     memory_budget_bytes=memory_budget_bytes)
        if shift:  # the last position has no target: 0 statistics and difficulty, as score_next_tokens
            for x in (*scores.stats, scores.difficulty):
                x[:, -1] = 0.0
    nonfinite = (scores.valid & ~scores.eligible).sum()
    return scores, nonfinite
