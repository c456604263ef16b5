r"""Fused LM head + CGGR selective cross-entropy for JAX: the ``(N, V)`` logits are never held in memory.

With hidden states ``h ∈ R^{N×d}``, an LM-head weight ``W`` (``(V, d)``, ``weight_layout="vd"``, the
PyTorch/tied-embedding layout; or ``(d, V)``, ``"dv"``, a Flax ``Dense`` kernel) and an optional bias
``b ∈ R^V``, the logits are ``z_i = W h_i + b``. CGGR (SPEC §2-§8)::

    loss = Σ_{i∈S} nll_i / max(1, |S|),     nll_i = lse_i − z_i[t_i]
    g_i  = (softmax(z_i) − onehot(t_i)) / max(1, |S|)   (i ∈ S; 0 otherwise)
    ∂h_i = g_i W,   ∂W = Σ_{i∈S} g_iᵀ h_i,   ∂b = Σ_{i∈S} g_i

**Forward** (under ``stop_gradient``): the logits are produced in blocks of ``R`` rows × ``C`` vocabulary
columns, ``Z_b = H_r W[v0:v1]ᵀ + b[v0:v1]`` (one XLA matmul, ``logits_dtype``, float32 accumulation), each
block's statistics are taken and the block is dropped; only the five float32 statistics per row survive.
``lax.scan`` runs over the row blocks (a static tail block for ``N mod R``). With the Pallas statistics
kernel (GPU backend) the plan keeps all rows in one block (``R = N``) and splits the vocabulary: a Python
loop over static column slices of ``W``/``b`` (either ``weight_layout``) feeds
:func:`cggr_jax.kernels.scoring.chunk_statistics`, which resumes each row's streaming state - running max
``m``, runner-up ``r``, the rescaled sums ``d = Σ e^{z−m}`` and ``s = Σ e^{z−m}(z − m)``, the target logit -
where the previous column block left it, the last block giving the statistics. Tall GEMMs, and a statistics
launch of one program per row (row blocks of a whole vocabulary starve the statistics pass: 896 rows cannot
fill 132 SMs; DECISIONS.md: fused-head-chunk-plan).
Each block's GEMM is ordered after the previous block's statistics (an ``optimization_barrier``), so the GEMMs
cannot all be scheduled ahead of the kernels and one block of logits at a time needs to be live. With
``C = V`` every row block goes whole to the dispatcher of :func:`cggr_jax.scoring.token_statistics`; the XLA
reference statistics (other backends) always take whole rows. Difficulty, eligibility, ratio, ``k``, the
selection and the metrics follow from the statistics through :mod:`cggr_jax.pipeline` (static shapes), and the
loss value is ``Σ_S nll / |S|`` — no extra matmul.

**Fixed-size selection buffer.** The selected rows are gathered into a buffer of static size ``capacity``
(default :func:`max_selected`: the largest number of tokens the configuration can select from ``N`` — ``N``
whenever the ratio can reach 1, e.g. during the linear warmup). The selected tokens are ordered by their rank
(SPEC §6, hardest first) and the first ``capacity`` enter the buffer; rows beyond the actual ``|S|`` are
padding with weight 0 (their hidden state is replaced by zeros, so even a non-finite padding row contributes
an exact 0). Should ``|S|`` exceed an explicit ``capacity``, the easiest selected tokens are dropped from the
loss, the metric ``tokens_selected`` reports the kept count and :attr:`FusedLinearCGGROutput.tokens_over_capacity`
the dropped one (concrete, non-traced inputs raise :class:`ValueError` instead). The default capacity never
overflows.

**Backward** (``jax.custom_vjp``, :mod:`cggr_jax.fused_linear_backward`): only the buffer's rows are
recomputed, one vocabulary chunk of ``C`` columns at a time (``lax.fori_loop`` over full chunks plus a static tail)::

    Z = H_S W[v0:v1]ᵀ + b[v0:v1];   G = (exp(Z − lse_S) − onehot)·w        (float32, saved lse)
    ∂H_S += G W[v0:v1]  (float32 accumulator);   ∂W[v0:v1] = Gᵀ H_S;   ∂b[v0:v1] = Σ G

with ``G`` cast to the inputs' dtype for the matmuls and float32 accumulation (``preferred_element_type``):
every GEMM, including ``∂W``'s over all buffered rows, accumulates in float32, and ``∂W`` is written once per
chunk (no ``V × d`` float32 buffer). Matmul work: ``1 + 3·capacity/N`` matmul equivalents (1.75 at a
capacity of ``N/4``) against 3 for a full-gradient fused kernel. Storing the selected rows' softmax during the
forward is not possible within the budget: the selection exists only after every row is scored, and the
``capacity × V`` buffer (1 GiB in bf16 at ``4096 × 128256``) is four times the default budget.

**Memory heuristic** (:func:`plan_chunks`, overridable by ``row_chunk_size`` / ``vocab_chunk_size``; ``e`` =
element size of the inputs, ``ℓ`` of ``logits_dtype``, ``B`` = ``memory_budget_bytes``, default 0.25 GiB):

* forward with the Pallas statistics kernel: a block of ``R × C`` logits holds ``R·C·ℓ`` bytes (the kernel
  reads them in place); ``R = N`` and ``C = V`` when ``N·V·ℓ ≤ 7/8·B``, else ``C = round_down_128(7/8·B /
  (N·ℓ))`` (and, should that be narrower than 4096 columns, ``C = 4096`` and ``R = round_down_128(7/8·B /
  (C·ℓ))``); a caller's ``row_chunk_size`` fixes ``R`` and the plan sizes ``C`` for it. At ``N = 16384,
  V = 128256`` bf16: ``C = 7168`` (18 blocks, 224 MiB of logits).
* forward with the XLA reference statistics: whole rows, ``R = round_down_128(7/8·B / (V·(ℓ + 16)))`` (16
  bytes of float32 temporaries per logit; at least 1, at most ``N``).
* backward: chunks of ``C = round_down_128((7/8·B − cap·d·(4 + e)) / (cap·(ℓ + 8 + e)))`` columns (at least
  128), the fixed part being the float32 ``∂H_S`` accumulator and ``H_S``.

The gradients are outputs, not working memory.

Everything is jit-safe with static shapes; the configuration (and the chunk sizes, ``capacity``,
``weight_layout``, ``logits_dtype``) are static.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cggr import CGGRConfig
from cggr.config import reject_sampled_selection

from cggr_jax import curriculum, dispatch, pipeline, utils
from cggr_jax import selection as selection_lib
from cggr_jax import scoring as scoring_lib
# The backward pass (the selected rows' gradient) lives in its own module.
from cggr_jax.fused_linear_backward import BackwardPlan, block_logits, selected_rows_loss
from cggr_jax.kernels.launch import DEFAULT_MEMORY_BUDGET, ChunkPlan, plan_chunks
from cggr_jax.types import TokenScores, TokenStatistics
from cggr_jax.loss import DEFAULT_CONFIG, CGGRLoss, resolve_config

__all__ = [
    "describe",
    "forward_blocks",
    "DEFAULT_MEMORY_BUDGET",
    "ChunkPlan",
    "FusedLinearCGGROutput",
    "plan_chunks",
    "max_selected",
    "fused_linear_cggr",
    "fused_linear_cggr_loss",
    "fused_linear_scores",
]

_WEIGHT_LAYOUTS = ("vd", "dv")


def _positive_int(value: Any, name: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    return utils.check_int(value, name, minimum=1)


def _num_selected_host(n: int, ratio: np.float32) -> int:
    """SPEC §5.3 on the host (exact integers)."""
    if n == 0:
        return 0
    r_q = int(np.round(np.float32(np.float32(ratio) * np.float32(65536.0))))
    return min(n, max(1, (r_q * n + 32768) // 65536))


def max_selected(num_tokens: int, num_sequences: int = 1, *, selection: str = DEFAULT_CONFIG.selection,
                 dynamic_threshold: bool = DEFAULT_CONFIG.dynamic_threshold,
                 threshold_sensitivity: float = DEFAULT_CONFIG.threshold_sensitivity,
                 min_tokens_ratio: float = DEFAULT_CONFIG.min_tokens_ratio,
                 warmup_steps: int = DEFAULT_CONFIG.warmup_steps,
                 min_tokens_per_sequence: int = DEFAULT_CONFIG.min_tokens_per_sequence,
                 ratio_schedule: Optional[Callable[[Any], Any]] = None) -> int:
    """The largest number of tokens the configuration can select from ``num_tokens`` (the default capacity).

    The ratio's maximum over all steps and batches: 1 with a ``ratio_schedule`` (unknown) or a linear warmup
    (``warmup_steps > 0`` starts at 1); otherwise ``min_tokens_ratio``, raised by the dynamic threshold to at
    most ``min(1, r·(1 + threshold_sensitivity))`` (``c̄ ≥ 0``). ``k`` is monotone in the ratio and in ``n``,
    so ``k_max = num_selected(N, r_max)``; ``sequence_aware`` adds up to ``min_tokens_per_sequence`` per
    sequence. Capped at ``num_tokens``.
    """
    num_tokens = utils.check_int(num_tokens, "num_tokens", minimum=0)
    num_sequences = utils.check_int(num_sequences, "num_sequences", minimum=1)
    config = CGGRConfig(selection=selection, dynamic_threshold=dynamic_threshold,
                        threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                        warmup_steps=warmup_steps, min_tokens_per_sequence=min_tokens_per_sequence)
    return _max_selected(num_tokens, num_sequences, config, ratio_schedule)


def _max_selected(num_tokens: int, num_sequences: int, config: CGGRConfig, ratio_schedule: Any) -> int:
    if ratio_schedule is not None or config.warmup_steps > 0:
        r_max = np.float32(1.0)
    else:
        r_max = np.float32(config.min_tokens_ratio)
        if config.uses_dynamic_threshold:
            f32 = np.float32   # SPEC §5.2 at c̄ = 0, in host float32 (callable while tracing)
            r_max = min(f32(1.0), f32(r_max * f32(f32(1.0) + f32(f32(1.0) * f32(config.threshold_sensitivity)))))
    k = _num_selected_host(num_tokens, r_max)
    if config.selection == "sequence_aware":
        k += num_sequences * int(config.min_tokens_per_sequence)
    return min(num_tokens, k)


# ============================================================================================ config
@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one fused call (hashable: a ``jit`` static argument)."""

    config: CGGRConfig
    ratio_schedule: Optional[Callable[[Any], Any]]
    capacity: int
    row_chunk: int
    vocab_chunk: int
    forward_vocab_chunk: int
    weight_layout: str
    logits_dtype: str
    statistics_kernel: bool


# ========================================================================================= input checks
def describe(x: Any) -> str:
    """``x`` described for an error message: its dtype and shape, or its type."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"an array of dtype {dtype} and shape {tuple(shape)}"


def _check_linear(hidden: Any, weight: Any, bias: Any, weight_layout: str) -> tuple[int, int]:
    """Static checks of ``hidden``, ``weight``, ``bias``; returns ``(d, V)``."""
    utils.check_choice(weight_layout, "weight_layout", _WEIGHT_LAYOUTS)
    h_dtype = getattr(hidden, "dtype", None)
    h_shape = getattr(hidden, "shape", None)
    if h_dtype is None or h_shape is None or len(h_shape) not in (2, 3) \
            or not jnp.issubdtype(h_dtype, jnp.floating):
        raise ValueError(f"hidden: expected a floating (N, d) or (B, T, d) array, got {describe(hidden)}")
    d = int(h_shape[-1])
    w_shape = getattr(weight, "shape", None)
    w_dtype = getattr(weight, "dtype", None)
    want = f"(V, {d})" if weight_layout == "vd" else f"({d}, V)"
    if w_shape is None or w_dtype is None or len(w_shape) != 2:
        raise ValueError(f"weight: expected the LM head weight of shape {want} (weight_layout="
                         f"{weight_layout!r}), got {describe(weight)}")
    w_d, V = (w_shape[1], w_shape[0]) if weight_layout == "vd" else (w_shape[0], w_shape[1])
    if w_d != d:
        raise ValueError(f"weight: expected shape {want} with d = hidden.shape[-1] = {d} (weight_layout="
                         f"{weight_layout!r}), got {tuple(w_shape)}")
    if V < 1:
        raise ValueError(f"weight: the vocabulary dimension V must be >= 1, got shape {tuple(w_shape)}")
    if w_dtype != h_dtype:
        raise ValueError(f"weight: expected dtype {h_dtype} (that of hidden), got {w_dtype}; cast one of them")
    if bias is not None:
        b_shape = getattr(bias, "shape", None)
        if b_shape is None or tuple(b_shape) != (V,):
            raise ValueError(f"bias: expected None or an array of shape ({V},), got {describe(bias)}")
        if bias.dtype != h_dtype:
            raise ValueError(f"bias: expected dtype {h_dtype} (that of hidden), got {bias.dtype}")
    return d, int(V)


def _check_targets(labels: Any, hidden_shape: tuple[int, ...], vocab_size: int, ignore_index: int,
                  name: str = "targets") -> jax.Array:
    return utils.as_targets(labels, tuple(hidden_shape[:-1]) + (vocab_size,), name, ignore_index=ignore_index)


def _resolve_logits_dtype(logits_dtype: Any, hidden_dtype: Any) -> str:
    dt = jnp.dtype(hidden_dtype if logits_dtype is None else logits_dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"logits_dtype: expected None or a floating dtype, got {logits_dtype!r}")
    return dt.name


def forward_blocks(num_rows: int, hidden_dim: int, vocab_size: int, dtype: Any, ldt: str, kernel: bool,
                    row_chunk_size: Optional[int], vocab_chunk_size: Optional[int], memory_budget_bytes: int,
                    selected_rows: Optional[int] = None) -> tuple[ChunkPlan, int, int]:
    """``(plan, rows, columns)``: the plan (its rows sized for the caller's ``row_chunk_size`` when given)
    and the forward's logits blocks - the caller's ``vocab_chunk_size`` where given, else the plan's, and
    always ``V`` without the statistics kernel (the XLA reference takes whole rows; a normalised value also
    keeps the static jit arguments, and so the compilations, the same)."""
    plan = plan_chunks(num_rows, hidden_dim, vocab_size, dtype, selected_rows=selected_rows,
                       memory_budget_bytes=memory_budget_bytes, statistics_kernel=kernel, logits_dtype=ldt,
                       row_chunk=row_chunk_size)
    cols = min(vocab_size, vocab_chunk_size or plan.forward_vocab_chunk) if kernel else vocab_size
    return plan, plan.row_chunk, cols


# ==================================================================================== blockwise scoring
def _vocab_chunked_statistics(h_c: jax.Array, w: jax.Array, b: Optional[jax.Array], t_c: Optional[jax.Array],
                              m_c: Optional[jax.Array], ignore_index: int, layout: str, ldt: Any,
                              cols: int) -> TokenStatistics:
    """Statistics of the rows ``h_c`` from vocabulary blocks ``Z = h_c W[v0:v1]ᵀ + b[v0:v1]`` of ``cols``
    columns (a ragged last block), each folded into the rows' carried state by the Pallas chunk kernel
    (:func:`cggr_jax.kernels.scoring.chunk_statistics`; the last block yields the statistics).

    ``t_c``/``m_c``: the safe targets and "has a valid target" mask of the rows (both None without labels).
    The blocks are a Python loop over static slices of the vocabulary axis (axis 0 of a ``"vd"`` weight, 1 of
    ``"dv"``), so every kernel launch has a static ``v0``.
    """
    from .kernels import launch as kernel_launch
    from .kernels import scoring as kernel_scoring

    V = w.shape[0] if layout == "vd" else w.shape[1]
    rows = h_c.shape[0]
    # The kernel sees in-range targets or ignore_index only (as dispatch_statistics gives the whole-row one).
    t_k = None if t_c is None else jnp.where(m_c, t_c, ignore_index)
    state: Any = None
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w_c = w[v0:v1] if layout == "vd" else w[:, v0:v1]
        b_c = None if b is None else b[v0:v1]
        h_in = h_c
        if state is not None:
            # Data dependence of this block's GEMM on the previous block's statistics: XLA cannot hoist the
            # GEMMs ahead of the kernels, so one block of logits at a time needs to be live (the plan's budget).
            h_in, state = jax.lax.optimization_barrier((h_c, state))
        z = block_logits(h_in, w_c, b_c, layout, ldt)
        itemsize = kernel_scoring.as_float32_input(z).dtype.itemsize      # the element size the kernel reads
        # Few rows (a row split): widen each row's program so that the statistics still stream at full rate.
        launch = kernel_launch.scoring_config_for_rows(rows, v1 - v0, itemsize, kernel_launch.num_sms())
        cfg = kernel_launch.kernel_config(v1 - v0, itemsize, **launch.kwargs())
        state = kernel_scoring.chunk_statistics(z, t_k, ignore_index=ignore_index, v0=v0, vocab_size=V, state=state,
                                     cfg=cfg)
    lse, entropy, p1, p2 = state[:4]
    nll = jnp.zeros((rows,), jnp.float32) if t_c is None else jnp.where(m_c, state[4], 0.0)
    return TokenStatistics(lse, entropy, p1, p2, nll)


def _blockwise_statistics(h2: jax.Array, w: jax.Array, b: Optional[jax.Array], safe: Optional[jax.Array],
                          has_target: Optional[jax.Array], ignore_index: int, row_chunk: int, layout: str,
                          ldt: Any, kernel: bool, vocab_chunk: Optional[int] = None) -> TokenStatistics:
    """Flat SPEC §2 statistics of ``h2 Wᵀ + b`` from logit blocks of ``row_chunk`` rows × ``vocab_chunk``
    columns (None = ``V``).

    With the Pallas kernel and ``vocab_chunk < V`` each row block is split into vocabulary blocks whose rows
    carry their streaming state from one block to the next (:func:`_vocab_chunked_statistics`); otherwise
    each row block's whole-row logits go to the statistics dispatcher (the XLA reference always takes whole
    rows: ``vocab_chunk`` is ignored without the kernel).
    """
    N = h2.shape[0]
    V = w.shape[0] if layout == "vd" else w.shape[1]
    R = max(1, min(row_chunk, N)) if N else 1
    n_full = N // R
    tail = N - n_full * R
    cols = V if (not kernel or vocab_chunk is None) else max(1, min(int(vocab_chunk), V))

    def block(h_c: jax.Array, t_c: Optional[jax.Array], m_c: Optional[jax.Array]) -> TokenStatistics:
        if cols < V:
            return _vocab_chunked_statistics(h_c, w, b, t_c, m_c, ignore_index, layout, ldt, cols)
        z = block_logits(h_c, w, b, layout, ldt)
        launch = None
        if kernel:  # a block has few rows: widen each row's program so the statistics stream at full rate
            from .kernels import launch as kernel_launch
            from .kernels import scoring as kernel_scoring
            launch = kernel_launch.scoring_config_for_rows(z.shape[0], z.shape[1],
                                                           kernel_scoring.as_float32_input(z).dtype.itemsize,
                                                           kernel_launch.num_sms())
        return scoring_lib.dispatch_statistics(z, t_c, m_c, ignore_index, kernel=kernel, launch=launch)

    parts: list[TokenStatistics] = []
    if n_full > 0:
        def body(carry: None, i: jax.Array) -> tuple[None, TokenStatistics]:
            r0 = i * R
            h_c = jax.lax.dynamic_slice_in_dim(h2, r0, R, 0)
            t_c = None if safe is None else jax.lax.dynamic_slice_in_dim(safe, r0, R, 0)
            m_c = None if has_target is None else jax.lax.dynamic_slice_in_dim(has_target, r0, R, 0)
            return carry, block(h_c, t_c, m_c)

        _, ys = jax.lax.scan(body, None, jnp.arange(n_full, dtype=jnp.int32))
        parts.append(TokenStatistics(*(y.reshape(-1) for y in ys)))
    if tail > 0:
        r0 = n_full * R
        parts.append(block(h2[r0:], None if safe is None else safe[r0:],
                           None if has_target is None else has_target[r0:]))
    if not parts:
        empty = jnp.zeros((0,), jnp.float32)
        return TokenStatistics(empty, empty, empty, empty, empty)
    if len(parts) == 1:
        return parts[0]
    return TokenStatistics(*(jnp.concatenate(xs) for xs in zip(*parts)))


# ================================================================================================ core
class FusedLinearCGGROutput(NamedTuple):
    """Result of :func:`fused_linear_cggr`.

    Attributes:
        loss: float32 scalar (differentiable w.r.t. ``hidden``, ``weight``, ``bias``).
        metrics: dict of scalar arrays, keys :data:`cggr_jax.loss.NUMERIC_METRIC_KEYS` (SPEC §10; usable with
            ``metrics_to_dict`` and ``advance_curriculum``).
        mask: bool selection actually in the loss (token shape).
        scores: :class:`cggr_jax.scoring.TokenScores` of every token.
        tokens_over_capacity: int32 scalar, selected tokens that did not fit in ``capacity`` (0 by default).
    """

    loss: jax.Array
    metrics: dict[str, jax.Array]
    mask: jax.Array
    scores: TokenScores
    tokens_over_capacity: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
def _fused(hidden: jax.Array, weight: jax.Array, bias: Optional[jax.Array], labels: jax.Array, step: jax.Array,
           reference_nll: Optional[jax.Array], cfg: _Config) -> FusedLinearCGGROutput:
    token_shape = labels.shape
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    N = h2.shape[0]
    V = weight.shape[0] if cfg.weight_layout == "vd" else weight.shape[1]
    ldt = jnp.dtype(cfg.logits_dtype)
    flat_labels = labels.reshape(-1)
    not_ignored, in_range, safe = utils.target_masks(flat_labels, V, cfg.config.ignore_index)
    has_t = not_ignored & in_range
    sg = jax.lax.stop_gradient
    flat = _blockwise_statistics(sg(h2), sg(weight), None if bias is None else sg(bias), safe, has_t,
                                 cfg.config.ignore_index, cfg.row_chunk, cfg.weight_layout, ldt, cfg.statistics_kernel,
                                 cfg.forward_vocab_chunk)
    stats = TokenStatistics(*(x.reshape(token_shape) for x in flat))
    config = cfg.config
    in_range2 = in_range.reshape(token_shape)
    # SPEC §3.1: excess subtracts the reference after the statistics (Pallas or XLA), never inside them.
    scores = scoring_lib.scores_from_statistics(stats, config.scoring, not_ignored=not_ignored.reshape(token_shape),
                                                in_range=in_range2, reference_nll=reference_nll)
    difficulty, elig = scores.difficulty, scores.eligible
    measured = pipeline.select_and_measure(scores, in_range2, step, config=config,
                                           schedule=curriculum.schedule_for(config, cfg.ratio_schedule))
    mask = measured.mask
    # The fixed-size buffer: selected tokens in rank order (hardest first), the first `capacity` kept.
    mask_f = mask.reshape(-1)
    rank = selection_lib.rank_tokens(difficulty, elig).reshape(-1)
    key = jnp.where(mask_f, rank, jnp.int32(N))
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    position = jnp.zeros((N,), jnp.int32).at[order].set(jnp.arange(N, dtype=jnp.int32))
    count = jnp.sum(mask_f, dtype=jnp.int32)
    cap = cfg.capacity
    kept_mask = mask_f & (position < cap)
    kept = jnp.minimum(count, cap)
    sel_denom = jnp.maximum(kept, 1).astype(jnp.float32)
    loss_value = jnp.sum(jnp.where(kept_mask, flat.nll, 0.0), dtype=jnp.float32) / sel_denom
    slot_live = jnp.arange(cap, dtype=jnp.int32) < kept
    rows = jnp.where(slot_live, order[:cap], 0)
    row_weight = jnp.where(slot_live, 1.0 / sel_denom, 0.0).astype(jnp.float32)
    row_target = jnp.where(slot_live, safe[rows], 0)
    row_lse = jnp.where(slot_live, flat.lse[rows], 0.0)
    plan = BackwardPlan(cfg.vocab_chunk, cfg.weight_layout, cfg.logits_dtype)
    loss = selected_rows_loss(plan, h2, weight, bias, sg(loss_value), rows, row_weight, row_target, row_lse)
    metrics = dict(measured.metrics, tokens_selected=kept, sample_ess=kept.astype(jnp.float32))
    return FusedLinearCGGROutput(loss, metrics, kept_mask.reshape(token_shape), scores, count - kept)


def fused_linear_cggr(hidden: jax.Array, weight: jax.Array, targets: jax.Array, step: Any, *,
                      bias: Optional[jax.Array] = None, reference_nll: Any = None, loss_fn: Any = None,
                      config: Optional[CGGRConfig] = None,
                      scoring: str = DEFAULT_CONFIG.scoring, selection: str = DEFAULT_CONFIG.selection,
                      dynamic_threshold: bool = DEFAULT_CONFIG.dynamic_threshold,
                      threshold_sensitivity: float = DEFAULT_CONFIG.threshold_sensitivity,
                      min_tokens_ratio: float = DEFAULT_CONFIG.min_tokens_ratio,
                      warmup_steps: int = DEFAULT_CONFIG.warmup_steps, num_strata: int = DEFAULT_CONFIG.num_strata,
                      min_tokens_per_sequence: int = DEFAULT_CONFIG.min_tokens_per_sequence,
                      ignore_index: int = DEFAULT_CONFIG.ignore_index,
                      ratio_schedule: Optional[Callable[[Any], Any]] = None, capacity: Optional[int] = None,
                      row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                      memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, weight_layout: str = "vd",
                      logits_dtype: Any = None) -> FusedLinearCGGROutput:
    """CGGR loss of the LM head ``z = hidden · Wᵀ + bias`` without materialising the logits (jit-safe).

    Equal (up to float rounding of the chunked matmuls) to the CGGR loss of the materialised logits with the
    default cross-entropy, in value, gradients and selection — as long as ``|S| ≤ capacity``.

    Args:
        hidden: ``(N, d)`` or ``(B, T, d)`` floating array, aligned with ``targets`` (a causal LM shifts first;
            a 3-D input's rows are the sequences of ``sequence_aware``).
        weight: the LM head, ``(V, d)`` (``weight_layout="vd"``) or ``(d, V)`` (``"dv"``), dtype of ``hidden``.
        targets: integer array of the token shape; values in ``[0, V)`` or ``ignore_index`` (concrete
            out-of-range values raise; traced ones make the token ineligible, metric ``tokens_out_of_range``).
        step: curriculum step (int or integer scalar array, may be traced).
        bias: optional ``(V,)`` bias, dtype of ``hidden``.
        reference_nll: with ``scoring='excess'`` (and only then) the reference model's per-token loss, a
            floating array of the targets' shape aligned like them (SPEC §3.1); no gradient, and an array
            argument of the compiled body (a new reference does not recompile).
        loss_fn: optional ``cggr_jax`` ``CGGRLoss`` whose configuration is used instead of the keyword
            arguments below (then they must keep their defaults).
        scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps,
        num_strata, min_tokens_per_sequence, ignore_index, ratio_schedule: the CGGR configuration (SPEC).
        capacity: static size of the selected-rows buffer (default :func:`max_selected`).
        row_chunk_size: rows per forward logits block (default: :func:`plan_chunks`, which then sizes the
            columns for these rows).
        vocab_chunk_size: vocabulary columns per forward logits block (Pallas statistics kernel only; the XLA
            reference statistics take whole rows) and per backward step (default: :func:`plan_chunks`, its
            ``forward_vocab_chunk`` and, with ``capacity`` rows, its ``vocab_chunk``).
        memory_budget_bytes: working-memory target of the default plan (bytes, default 0.25 GiB).
        weight_layout: ``"vd"`` or ``"dv"``.
        logits_dtype: dtype of the recomputed logits (default: that of ``hidden``; float32 matches a head
            computed with ``preferred_element_type=float32`` such as ``cggr_jax.models.DecoderLM``).

    Returns:
        :class:`FusedLinearCGGROutput`.

    Raises:
        ValueError: bad shapes/dtypes/configuration; concrete targets out of range; concrete inputs whose
            selection exceeds ``capacity``.
    """
    settings = dict(scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
                    threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                    warmup_steps=warmup_steps, num_strata=num_strata,
                    min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index)
    if loss_fn is not None:
        if not isinstance(loss_fn, CGGRLoss):
            raise ValueError(f"loss_fn: expected a cggr_jax CGGRLoss, got {type(loss_fn).__name__}")
        if config is not None or ratio_schedule is not None:
            raise ValueError("loss_fn: pass either loss_fn or config=/ratio_schedule=, not both")
        try:
            resolve_config(loss_fn.config, settings, caller="fused_linear_cggr")
        except ValueError as err:
            raise ValueError(f"loss_fn: pass either loss_fn or the configuration keywords, not both ({err})") from err
        config, ratio_schedule = loss_fn.config, loss_fn.ratio_schedule
    config = resolve_config(config, settings, caller="fused_linear_cggr")
    reject_sampled_selection(config, "fused_linear_cggr")
    curriculum.check_schedule(ratio_schedule)
    if config.num_strata > selection_lib.MAX_STRATA:
        raise ValueError(f"num_strata: expected an integer <= {selection_lib.MAX_STRATA}, got {config.num_strata}")
    _positive_int(row_chunk_size, "row_chunk_size")
    _positive_int(vocab_chunk_size, "vocab_chunk_size")
    utils.check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
    d, V = _check_linear(hidden, weight, bias, weight_layout)
    targets = _check_targets(targets, tuple(hidden.shape), V, config.ignore_index)
    ref = scoring_lib.check_reference_nll(reference_nll, config.scoring, tuple(targets.shape))
    step_arr = curriculum.check_step(step)
    token_shape = tuple(hidden.shape[:-1])
    N = int(np.prod(token_shape))
    num_seq = token_shape[0] if len(token_shape) == 2 else 1
    if capacity is None:
        cap = _max_selected(N, max(1, num_seq), config, ratio_schedule)
    else:
        cap = utils.check_int(capacity, "capacity", minimum=min(1, N), maximum=N)
    ldt = _resolve_logits_dtype(logits_dtype, hidden.dtype)
    kernel = dispatch.use_kernels(hidden)
    plan, rows, cols = forward_blocks(N, d, V, hidden.dtype, ldt, kernel, row_chunk_size, vocab_chunk_size,
                                       memory_budget_bytes, selected_rows=cap)
    cfg = _Config(capacity=cap, row_chunk=rows, vocab_chunk=vocab_chunk_size or plan.vocab_chunk,
                  forward_vocab_chunk=cols, weight_layout=weight_layout, logits_dtype=ldt,
                  statistics_kernel=kernel, config=config, ratio_schedule=ratio_schedule)
    out = _fused(hidden, weight, bias, targets, step_arr, ref, cfg)
    concrete = not any(utils.is_traced(x) for x in (hidden, weight, bias, targets, step_arr, ref) if x is not None)
    if concrete:
        over = int(out.tokens_over_capacity)
        if over > 0:
            raise ValueError(f"capacity: {cap} rows cannot hold the {cap + over} selected tokens; pass "
                             f"capacity >= {cap + over} or leave it None (max_selected)")
    return out


def fused_linear_cggr_loss(hidden: jax.Array, weight: jax.Array, targets: jax.Array, step: Any,
                           **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, metrics)`` of :func:`fused_linear_cggr` (same arguments), for ``jax.value_and_grad(...,
    has_aux=True)``."""
    out = fused_linear_cggr(hidden, weight, targets, step, **kwargs)
    return out.loss, out.metrics


# ================================================================================ forward-only scores
@functools.partial(jax.jit, static_argnames=("scoring_name", "ignore_index", "row_chunk", "vocab_chunk", "layout",
                                             "ldt", "kernel"))
def _scores(hidden: jax.Array, weight: jax.Array, bias: Optional[jax.Array], labels: Optional[jax.Array],
            valid_mask: Optional[jax.Array], reference_nll: Optional[jax.Array], scoring_name: str,
            ignore_index: int, row_chunk: int, vocab_chunk: int, layout: str, ldt: str, kernel: bool) -> TokenScores:
    token_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    V = weight.shape[0] if layout == "vd" else weight.shape[1]
    if labels is None:
        safe = has_t = not_ignored = in_range = None
    else:
        not_ignored, in_range, safe = utils.target_masks(labels.reshape(-1), V, ignore_index)
        has_t = not_ignored & in_range
        not_ignored, in_range = not_ignored.reshape(token_shape), in_range.reshape(token_shape)
    flat = _blockwise_statistics(h2, weight, bias, safe, has_t, ignore_index, row_chunk, layout, jnp.dtype(ldt),
                                 kernel, vocab_chunk)
    stats = TokenStatistics(*(x.reshape(token_shape) for x in flat))
    return scoring_lib.scores_from_statistics(stats, scoring_name, not_ignored=not_ignored, in_range=in_range,
                                              valid_mask=valid_mask, reference_nll=reference_nll)


def fused_linear_scores(hidden: jax.Array, weight: jax.Array, targets: Optional[jax.Array] = None,
                        bias: Optional[jax.Array] = None, *, scoring: str = DEFAULT_CONFIG.scoring,
                        ignore_index: int = DEFAULT_CONFIG.ignore_index,
                        valid_mask: Optional[jax.Array] = None, row_chunk_size: Optional[int] = None,
                        vocab_chunk_size: Optional[int] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                        weight_layout: str = "vd", logits_dtype: Any = None,
                        reference_nll: Any = None) -> TokenScores:
    """SPEC §2-§4 scores of ``hidden · Wᵀ + bias`` without materialising the logits (router use).

    Equal to ``cggr_jax.scoring.score_tokens(logits, targets, ...)`` up to the rounding of the chunked matmuls;
    arguments as :func:`fused_linear_cggr` and :func:`cggr_jax.scoring.score_tokens` (``row_chunk_size``,
    ``vocab_chunk_size``: the forward's logits blocks, default :func:`plan_chunks`; ``vocab_chunk_size``
    applies with the Pallas statistics kernel only; ``reference_nll`` as in :func:`cggr_jax.scoring.score_tokens`,
    SPEC §3.1). No gradient is defined (wrap the inputs in ``jax.lax.stop_gradient`` when used inside a
    differentiated function).
    """
    scoring_name = scoring
    utils.check_choice(scoring_name, "scoring", scoring_lib.SCORING_MODES)
    if scoring_name == "loss" and targets is None:
        raise ValueError("targets: scoring='loss' needs targets, got None")
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    _positive_int(row_chunk_size, "row_chunk_size")
    _positive_int(vocab_chunk_size, "vocab_chunk_size")
    utils.check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
    d, V = _check_linear(hidden, weight, bias, weight_layout)
    token_shape = tuple(hidden.shape[:-1])
    if targets is not None:
        targets = _check_targets(targets, tuple(hidden.shape), V, ignore_index)
    reference_nll = scoring_lib.check_reference_nll(reference_nll, scoring_name, token_shape,
                                                    has_targets=targets is not None)
    if valid_mask is not None:
        if getattr(valid_mask, "dtype", None) != jnp.bool_ or tuple(getattr(valid_mask, "shape", ())) != token_shape:
            raise ValueError(f"valid_mask: expected a bool array of shape {token_shape}, got {describe(valid_mask)}")
    ldt = _resolve_logits_dtype(logits_dtype, hidden.dtype)
    N = int(np.prod(token_shape))
    kernel = dispatch.use_kernels(hidden)
    _, row_chunk, cols = forward_blocks(N, d, V, hidden.dtype, ldt, kernel, row_chunk_size, vocab_chunk_size,
                                         memory_budget_bytes)
    return _scores(jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight),
                   None if bias is None else jax.lax.stop_gradient(bias), targets, valid_mask, reference_nll,
                   scoring_name=scoring_name, ignore_index=ignore_index, row_chunk=row_chunk, vocab_chunk=cols,
                   layout=weight_layout, ldt=ldt, kernel=kernel)
