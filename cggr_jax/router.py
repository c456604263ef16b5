r"""Routers of CGGR batch splitting (SPEC §9): the truncated router, the scorer (sequence selection from router
logits or from the router's hidden states) and the one head-linearity rule.

Scoring (pure functions, eager or traced)
-----------------------------------------
:func:`select_sequences` / :func:`score_sequences` (the counterpart of PyTorch's ``CGGRScorer``) take the
router's logits ``z`` ``(B, T, V)`` and the ``labels`` ``(B, T)`` (unshifted):

1. shift (SPEC §1): position ``t`` pairs ``z[:, t]`` with ``labels[:, t+1]``; that pair is *valid* when
   ``labels[:, t+1] != ignore_index`` and ``attention_mask[:, t+1] != 0`` (a padding target is ignored);
2. score every pair (SPEC §2–§4) with :func:`cggr_jax.scoring.score_tokens` → difficulty ``d_{b,t}`` and
   eligibility ``e_{b,t}``; with ``scoring='excess'`` the pairs are scored as ``'loss'`` and the caller's
   ``reference_nll`` (per token ``(B, T)`` aligned like the labels, or per sequence ``(B,)``) is applied by
   :mod:`cggr_jax.sequence_reference` (SPEC §9.1);
3. sequence difficulty ``D_b = (Σ_t e_{b,t} d_{b,t}) / (Σ_t e_{b,t})`` (float32); a sequence with no eligible
   pair is not eligible; ``n_seq`` = eligible sequences;
4. ratio (SPEC §5, :func:`cggr_jax.pipeline.ratios`): ``base = schedule(step)`` (default
   :func:`cggr_jax.curriculum.linear_warmup_ratio`), ``ratio = min(1, base·(1 + (1 − c̄)·σ))`` with ``c̄`` the
   mean confidence over *all* eligible pairs (``ratio = base`` unless ``config.uses_dynamic_threshold``);
5. ``k_seq = num_selected(n_seq, ratio)`` and the kept sequences are the ``k_seq`` of lowest rank in the
   SPEC §6 order over sequences (``D`` descending, lower batch index first), i.e.
   ``cggr_jax.selection.select_tokens(D, eligible, ratio, selection="topk")``. With ``selection="sampled"``
   (SPEC §9.2) the mask is instead the draw of ``cggr_jax.selection.sample_tokens(D, eligible, ratio,
   step=step)`` (``k_seq`` expected sequences; the draw's index is the batch index), whose ``1/π_b`` weights
   the batch-split step applies to the loss.

The head-linearity rule (:func:`check_linear_head`): wherever CGGR derives logits from a model's head (the
fused router path of the batch-split step and :func:`decoder_lm_cggr_loss`), the model's own logits are first
compared numerically with ``hidden · Wᵀ (+ b)``; a post-head transform raises instead of silently scoring
other logits.

Label rules (SPEC §1.1, §11): a label dtype that cannot hold ``ignore_index`` raises; concrete out-of-range
labels raise ``ValueError("labels: ...")``; traced ones are valid but never eligible, and are counted in
``tokens_out_of_range``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from cggr import DEFAULT_SEQUENCE_SELECTION, CGGRConfig
from cggr.config import ROUTER_POSITIONS_ALL, SAMPLED_SELECTIONS, RouterPositions
from flax import nnx

from cggr_jax import curriculum, fused_linear, models, pipeline, scoring, selection, utils
from cggr_jax.sequence_reference import apply_sequence_reference, check_sequence_reference, router_scoring
from cggr_jax.loss import DEFAULT_CONFIG
from cggr_jax.types import SequenceSelection, TokenScores

__all__ = [
    "ROUTER_PATHS",
    "ROUTER_MEMORY_BUDGET",
    "HEAD_TOLERANCE",
    "BatchSplitConfig",
    "SequenceSelection",
    "TruncatedRouter",
    "create_truncated_router",
    "check_labels_and_mask",
    "check_linear_head",
    "forget_head_checks",
    "head_weight",
    "linear_head_logits",
    "sequence_difficulty",
    "check_shifted_labels",
    "shifted_targets",
    "select_sequences",
    "select_sequences_fused",
    "select_from_scores",
    "resolve_router_path",
    "score_sequences",
    "selection_info",
    "decoder_lm_hidden_states",
    "decoder_lm_cggr_loss",
]

#: How the router's tokens are scored (:attr:`BatchSplitConfig.router_path`): ``"fused"`` runs the router to
#: its final normed hidden states (``DecoderLM.hidden_states``) and scores the LM head block by block with
#: :func:`cggr_jax.fused_linear.fused_linear_scores` (the ``(B, T, V)`` float32 logits never exist);
#: ``"logits"`` scores ``model.router_logits(...)``; ``"auto"`` takes ``"fused"`` whenever
#: :func:`resolve_router_path` allows it.
ROUTER_PATHS: tuple[str, ...] = ("auto", "fused", "logits")

#: Default working memory (bytes) of the fused router's logit blocks: 1 GiB (the router runs before the main
#: pass, whose activations set the step's peak).
ROUTER_MEMORY_BUDGET: int = 2**30


@dataclasses.dataclass(frozen=True)
class BatchSplitConfig:
    """Configuration of sequence selection (SPEC §9): the ``cggr.CGGRConfig`` settings batch splitting uses
    (with their defaults, except ``selection="topk"``) plus the router's own.

    Attributes:
        router_layers: number of the model's blocks the router runs (``0 ≤ router_layers ≤ num_layers``).
        scoring, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps, ignore_index: as
            ``cggr.CGGRConfig`` (SPEC §3, §5).
        selection: ``"topk"``, ``"fixed_quota"`` (= topk without the dynamic threshold) or ``"sampled"``
            (SPEC §9.2). ``"stratified"`` and ``"sequence_aware"`` are token-level strategies and a
            :class:`ValueError` here (SPEC §9).
        ratio_schedule: optional ``step -> ratio`` (an ``optax.Schedule``, values in ``(0, 1]``) replacing the
            default curriculum.
        seed: PRNG seed of the random modes (the key of step ``s`` is ``fold_in(key(seed), s)``).
        router_path: ``"auto"`` (default), ``"fused"`` or ``"logits"`` (:data:`ROUTER_PATHS`): score the router
            from its final hidden states without materialising its logits (a :class:`cggr_jax.models.DecoderLM`
            whose head passes :func:`check_linear_head`), or from ``router_logits``. ``"fused"`` on a model
            that cannot take it is a :class:`ValueError`; ``"auto"`` falls back for a model without hidden
            states and the step reports it (``BatchSplitTrainStep.router_path``, ``router_path_reason``).
        router_memory_budget_bytes: working memory of the fused path's logit blocks (bytes, default 1 GiB).
        sample_power, sample_uniform_mix, sample_floor, sample_seed: SPEC §7.4's parameters of ``"sampled"``
            (``cggr.CGGRConfig``'s ``sample_*`` fields), applied to the sequence difficulties (§9.2).
        router_positions, router_samples, router_prefix: SPEC §9.3, a cheaper router: score every
            ``router_positions``-th position (``"all"``: every one) or ``router_samples`` evenly spaced ones, of
            the first ``router_prefix`` columns the router reads (``None``: all); the sequence difficulty is the
            mean over the eligible scored positions, and on the fused path the head runs on the scored rows
            only. Static: they fix shapes, never recompile with the data.

    :attr:`config` (set by the constructor) is the one validated ``cggr.CGGRConfig`` of these settings and
    :attr:`positions` the validated :class:`cggr.config.RouterPositions` of the last three.
    """

    router_layers: int = 4
    scoring: str = DEFAULT_CONFIG.scoring
    selection: str = DEFAULT_SEQUENCE_SELECTION
    dynamic_threshold: bool = DEFAULT_CONFIG.dynamic_threshold
    threshold_sensitivity: float = DEFAULT_CONFIG.threshold_sensitivity
    min_tokens_ratio: float = DEFAULT_CONFIG.min_tokens_ratio
    warmup_steps: int = DEFAULT_CONFIG.warmup_steps
    ignore_index: int = DEFAULT_CONFIG.ignore_index
    ratio_schedule: Callable[[Any], Any] | None = None
    seed: int = 0
    router_path: str = "auto"
    router_memory_budget_bytes: int = ROUTER_MEMORY_BUDGET
    sample_power: float = DEFAULT_CONFIG.sample_power
    sample_uniform_mix: float = DEFAULT_CONFIG.sample_uniform_mix
    sample_floor: float = DEFAULT_CONFIG.sample_floor
    sample_seed: int = DEFAULT_CONFIG.sample_seed
    router_positions: Any = ROUTER_POSITIONS_ALL
    router_samples: int | None = None
    router_prefix: int | None = None

    def __post_init__(self) -> None:
        utils.check_int(self.router_layers, "router_layers", minimum=0)
        config = CGGRConfig(scoring=self.scoring, selection=self.selection,
                            dynamic_threshold=self.dynamic_threshold,
                            threshold_sensitivity=self.threshold_sensitivity,
                            min_tokens_ratio=self.min_tokens_ratio, warmup_steps=self.warmup_steps,
                            ignore_index=self.ignore_index, sample_power=self.sample_power,
                            sample_uniform_mix=self.sample_uniform_mix, sample_floor=self.sample_floor,
                            sample_seed=self.sample_seed).for_sequences()
        object.__setattr__(self, "_config", config)   # not a field: the settings above are the fields
        object.__setattr__(self, "_positions", RouterPositions(self.router_positions, self.router_samples,
                                                               self.router_prefix))
        utils.check_int(self.seed, "seed")
        utils.check_choice(self.router_path, "router_path", ROUTER_PATHS)
        utils.check_int(self.router_memory_budget_bytes, "router_memory_budget_bytes", minimum=1)
        curriculum.check_schedule(self.ratio_schedule)

    @property
    def config(self) -> CGGRConfig:
        """The one validated ``cggr.CGGRConfig`` of these settings."""
        return self._config

    @property
    def positions(self) -> RouterPositions:
        """SPEC §9.3: the validated positions the router reads and scores."""
        return self._positions

    def schedule(self) -> Callable[[Any], jax.Array]:
        """The curriculum ``step -> base ratio`` (:func:`cggr_jax.curriculum.schedule_for`)."""
        return curriculum.schedule_for(self.config, self.ratio_schedule)

    @property
    def uses_dynamic_threshold(self) -> bool:
        """``config.uses_dynamic_threshold`` (SPEC §5.2)."""
        return self.config.uses_dynamic_threshold


def check_labels_and_mask(shape: tuple[int, ...], labels: Any, attention_mask: Any, against: str) -> None:
    """``B ≥ 1``, ``T ≥ 2``; ``labels`` integer of shape ``shape``; ``attention_mask`` integer or bool of
    shape ``shape`` or ``None``. ``against`` names the array ``shape`` comes from."""
    if shape[0] < 1:
        raise ValueError(f"{against}: expected at least one sequence, got batch shape {shape}")
    if shape[1] < 2:
        raise ValueError(f"{against}: expected seq_len >= 2 (next-token targets are labels[:, 1:]), got "
                         f"batch shape {shape}")
    lshape, ldtype = getattr(labels, "shape", None), getattr(labels, "dtype", None)
    if lshape is None or not jnp.issubdtype(ldtype, jnp.integer):
        raise ValueError(f"labels: expected an integer array of shape {shape}, got "
                         f"{ldtype if ldtype is not None else type(labels).__name__}")
    if tuple(lshape) != shape:
        raise ValueError(f"labels: expected shape {shape} (that of {against}), got {tuple(lshape)}")
    if attention_mask is not None:
        mshape, mdtype = getattr(attention_mask, "shape", None), getattr(attention_mask, "dtype", None)
        if mshape is None or not (jnp.issubdtype(mdtype, jnp.integer) or mdtype == jnp.bool_):
            raise ValueError(f"attention_mask: expected an integer or bool array of shape {shape} (1 = token, "
                             f"0 = padding), got {mdtype if mdtype is not None else type(attention_mask).__name__}")
        if tuple(mshape) != shape:
            raise ValueError(f"attention_mask: expected shape {shape} (that of {against}), got {tuple(mshape)}")


# ---------------------------------------------------------------------------------------------- scoring
def sequence_difficulty(difficulty: jax.Array, eligible: jax.Array,
                        sequence_reference: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``D_b = Σ_t e_{b,t} d_{b,t} / Σ_t e_{b,t}`` (float32; 0 where no token is eligible) and the sequence
    eligibility ``Σ_t e_{b,t} > 0``, for ``(B, T')`` token difficulties and eligibility. With a float32
    per-sequence ``sequence_reference`` ``(B,)`` (SPEC §9.1; ``difficulty`` is then the router's ``nll``):
    ``D_b`` = that mean ``⊖ ref_b``."""
    d = jnp.where(eligible, difficulty.astype(jnp.float32), jnp.float32(0.0))
    count = jnp.sum(eligible, axis=1, dtype=jnp.int32)
    total = jnp.sum(d, axis=1, dtype=jnp.float32)
    seq_ok = count > 0
    seq_d = total / jnp.maximum(count, 1).astype(jnp.float32)
    if sequence_reference is not None:
        seq_d = seq_d - sequence_reference
    seq_d = jnp.where(seq_ok, seq_d, jnp.float32(0.0))
    return seq_d, seq_ok


def select_sequences(
    router_logits: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    step: Any = None,
    ratio: Any = None,
    config: BatchSplitConfig = BatchSplitConfig(),
    vocab_size: int | None = None,
    reference_nll: jax.Array | None = None,
) -> SequenceSelection:
    """SPEC §9 sequence selection from router logits ``(B, T, V)`` and ``labels`` ``(B, T)`` (unshifted).

    Give exactly one of ``step`` (the curriculum step: ``ratio`` follows SPEC §5 with ``c̄`` the mean router
    confidence over all eligible shifted pairs) or ``ratio`` (the float32 effective ratio, used as is — the
    form for parity tests, matching ``tests.oracle.select_sequences``). ``vocab_size``, when given, must equal
    the router's ``V`` (a router with another vocabulary than the model cannot score the model's labels).
    Works eagerly (concrete out-of-range labels raise :class:`ValueError`) and under ``jit``.
    ``reference_nll``: ``config.scoring='excess'`` only (and required there), the reference model's loss per
    token ``(B, T)`` aligned like ``labels`` or per sequence ``(B,)`` (SPEC §9.1,
    :mod:`cggr_jax.sequence_reference`).
    """
    if not isinstance(config, BatchSplitConfig):
        raise ValueError(f"config: expected a BatchSplitConfig, got {type(config).__name__}")
    logits = utils.as_logits(router_logits, "router_logits")
    if logits.ndim != 3:
        raise ValueError(f"router_logits: expected shape (B, T, V), got {tuple(logits.shape)}")
    B, T = _router_columns(tuple(logits.shape), labels, attention_mask, config, "router_logits")
    V = logits.shape[-1]
    if vocab_size is not None and int(vocab_size) != V:
        raise ValueError(
            f"router_logits: vocabulary size {V} differs from the model's vocab_size {int(vocab_size)}; the "
            f"router must share the model's tokenizer and head"
        )
    if (step is None) == (ratio is None):
        raise ValueError("select_sequences: pass exactly one of step= (curriculum) or ratio= (effective ratio)")
    reference_nll = check_sequence_reference(reference_nll, config.scoring, (B, T))

    targets, valid_mask, out_of_range = shifted_targets(labels, attention_mask, V, config)
    idx, targets, valid_mask, out_of_range = _scored_pairs(config, T, targets, valid_mask, out_of_range, V)
    z = logits[:, :T - 1] if idx is None else jnp.take(logits, idx, axis=1)   # SPEC §9.3: the pairs of S
    ts = scoring.score_tokens(z, targets, scoring=router_scoring(config.scoring),
                              ignore_index=config.ignore_index, valid_mask=valid_mask)
    ts, seq_ref = apply_sequence_reference(ts, reference_nll, columns=None if idx is None else idx + 1)
    return select_from_scores(ts, out_of_range, step, ratio, config, seq_ref)


def check_shifted_labels(labels: Any, attention_mask: Any, vocab_size: int, ignore_index: int) -> None:
    """SPEC §1.1/§11 for unshifted ``labels`` ``(B, T)``: the dtype must hold ``ignore_index``; concrete shifted
    labels ``labels[:, 1:]`` outside ``[0, vocab_size)`` (neither ``ignore_index`` nor under padding) raise
    :class:`ValueError` naming ``labels``, checked on the caller's values before any conversion."""
    utils.check_label_dtype(labels.dtype, ignore_index, "labels")
    if utils.is_traced(labels) or utils.is_traced(attention_mask):
        return
    host = np.asarray(labels)[:, 1:]
    if attention_mask is not None:
        keep = np.asarray(attention_mask)[:, 1:] != 0
        host = np.where(keep, host, np.asarray(ignore_index).astype(host.dtype))
    utils.check_target_range(host, vocab_size, ignore_index, "labels")


def shifted_targets(labels: Any, attention_mask: Any, V: int,
                    config: BatchSplitConfig) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(labels[:, 1:], attention_mask[:, 1:] != 0 or None, out-of-range count)`` (SPEC §1, §9).

    The label rules of SPEC §1.1/§11 are checked on the caller's own values before any conversion: a dtype
    that cannot hold ``ignore_index`` raises, and so do concrete shifted labels outside ``[0, V)`` (not
    ``ignore_index``, not under padding). Traced labels cannot raise: the pair is valid but not eligible and
    is counted in ``tokens_out_of_range`` (the count is therefore always 0 for concrete input)."""
    ignore = config.ignore_index
    check_shifted_labels(labels, attention_mask, V, ignore)
    mask_next = None if attention_mask is None else attention_mask[:, 1:] != 0
    targets = jnp.asarray(labels)[:, 1:]
    valid_mask = None if mask_next is None else jnp.asarray(mask_next)
    not_ignored, in_range, _ = utils.target_masks(targets, V, ignore)
    considered = not_ignored if valid_mask is None else not_ignored & valid_mask
    out_of_range = jnp.sum(considered & ~in_range, dtype=jnp.int32)
    return targets, valid_mask, out_of_range


def _router_columns(shape: tuple[int, ...], labels: Any, attention_mask: Any, config: BatchSplitConfig,
                    name: str) -> tuple[int, int]:
    """``(B, T)`` of the batch whose router output (``name``, of leading shape ``shape``) is scored: with the
    default positions the router covers all ``T`` columns; with a prefix (SPEC §9.3) it may cover the ``R`` it
    read, ``T`` is then that of ``labels``."""
    pos = config.positions
    lshape = getattr(labels, "shape", None)
    if pos.is_full or lshape is None or len(lshape) != 2:
        check_labels_and_mask(tuple(shape[:2]), labels, attention_mask, f"{name}[:, :, 0]")
        return int(shape[0]), int(shape[1])
    B, T = (int(x) for x in lshape)
    check_labels_and_mask((B, T), labels, attention_mask, "labels")
    allowed = sorted({T, pos.read_length(T)})
    if int(shape[0]) != B or int(shape[1]) not in allowed:
        raise ValueError(f"{name}: expected leading shape ({B}, T') with T' in {allowed} (all columns or the "
                         f"router_prefix read), got {tuple(shape)}")
    return B, T


def _scored_pairs(config: BatchSplitConfig, T: int, targets: jax.Array, valid_mask: jax.Array | None,
                  out_of_range: jax.Array, V: int) -> tuple[Any, jax.Array, jax.Array | None, jax.Array]:
    """SPEC §9.3: ``(S, targets, valid mask, out-of-range count)`` of the scored pairs (``S`` a static int32
    array of router positions, None with the defaults: every pair, unchanged inputs)."""
    scored = config.positions.scored(T, shift=True)
    if scored is None:
        return None, targets, valid_mask, out_of_range
    idx = np.asarray(scored, dtype=np.int32)
    targets = jnp.take(targets, idx, axis=1)
    valid_mask = None if valid_mask is None else jnp.take(valid_mask, idx, axis=1)
    not_ignored, in_range, _ = utils.target_masks(targets, V, config.ignore_index)
    considered = not_ignored if valid_mask is None else not_ignored & valid_mask
    return idx, targets, valid_mask, jnp.sum(considered & ~in_range, dtype=jnp.int32)


def select_from_scores(ts: TokenScores, out_of_range: jax.Array, step: Any, ratio: Any,
                       config: BatchSplitConfig, sequence_reference: jax.Array | None = None) -> SequenceSelection:
    """Steps 3-5 of the module docstring from the ``(B, T−1)`` token scores of the shifted pairs: the
    sequence difficulties, the ratio of :func:`cggr_jax.pipeline.ratios` (or ``ratio`` as given) and the
    ``topk`` of SPEC §7.1 over sequences (``sampled``: the draw of SPEC §9.2 at ``step``, step 0 when
    ``ratio`` is given). ``sequence_reference``: the per-sequence reference of
    :func:`cggr_jax.sequence_reference.apply_sequence_reference` (``D_b`` = mean ``nll`` ``⊖ ref_b``)."""
    values = ts.difficulty if sequence_reference is None else ts.stats.nll
    seq_d, seq_ok = sequence_difficulty(values, ts.eligible, sequence_reference)
    if ratio is not None:
        eff = curriculum.check_ratio_value(ratio)
        base = jnp.float32(jnp.nan)
    else:
        step = curriculum.check_step(step)
        mean_conf = pipeline.eligible_mean(ts.stats.confidence, ts.eligible)
        base, eff = pipeline.ratios(config.config, config.schedule(), step, mean_conf)
    cfg = config.config
    if cfg.selection in SAMPLED_SELECTIONS:
        mask, _, k = selection.sample_tokens(seq_d, seq_ok, eff, step=0 if step is None else step,
                                             seed=cfg.sample_seed, power=cfg.sample_power,
                                             uniform_mix=cfg.sample_uniform_mix, floor=cfg.sample_floor)
    else:
        mask, k = selection.select_tokens(seq_d, seq_ok, eff, selection="topk")
    rank = selection.rank_tokens(seq_d, seq_ok)
    return SequenceSelection(mask, k, rank, seq_d, seq_ok, eff, base, ts, out_of_range)


def select_sequences_fused(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    step: Any = None,
    ratio: Any = None,
    config: BatchSplitConfig = BatchSplitConfig(),
    vocab_size: int | None = None,
    bias: jax.Array | None = None,
    weight_layout: str = "vd",
    logits_dtype: Any = jnp.float32,
    reference_nll: jax.Array | None = None,
) -> SequenceSelection:
    """:func:`select_sequences` of the logits ``z = hidden · Wᵀ + bias`` without materialising them.

    ``hidden`` ``(B, T, d)`` are the router's final normed hidden states (``DecoderLM.hidden_states``),
    ``weight`` the LM head (``(V, d)`` with ``weight_layout="vd"``, a tied embedding; ``(d, V)`` with ``"dv"``,
    a Flax kernel) in the dtype the head computes in. The shifted pairs ``hidden[:, t]`` / ``labels[:, t+1]``
    are scored by :func:`cggr_jax.fused_linear.fused_linear_scores` in row blocks of at most
    ``config.router_memory_budget_bytes`` of ``logits_dtype`` logits (float32 by default, like
    ``DecoderLM``'s head), so the result equals ``select_sequences(head(hidden), ...)`` up to the rounding of
    the blocked matmul; everything after the token scores is the same code. No gradient flows through it.
    """
    if not isinstance(config, BatchSplitConfig):
        raise ValueError(f"config: expected a BatchSplitConfig, got {type(config).__name__}")
    hshape = getattr(hidden, "shape", None)
    if hshape is None or len(hshape) != 3:
        raise ValueError(f"hidden: expected the router's final hidden states of shape (B, T, d), got "
                         f"{tuple(hshape) if hshape is not None else type(hidden).__name__}")
    wshape = getattr(weight, "shape", None)
    if wshape is None or len(wshape) != 2 or weight_layout not in ("vd", "dv"):
        raise ValueError(f"weight: expected a 2-D LM-head weight with weight_layout 'vd' or 'dv', got "
                         f"{tuple(wshape) if wshape is not None else type(weight).__name__} / {weight_layout!r}")
    V = int(wshape[0] if weight_layout == "vd" else wshape[1])
    B, T = _router_columns(tuple(hshape), labels, attention_mask, config, "hidden")
    if vocab_size is not None and int(vocab_size) != V:
        raise ValueError(f"weight: vocabulary size {V} differs from the model's vocab_size {int(vocab_size)}; the "
                         f"router must share the model's tokenizer and head")
    if (step is None) == (ratio is None):
        raise ValueError("select_sequences_fused: pass exactly one of step= (curriculum) or ratio= (effective "
                         "ratio)")
    reference_nll = check_sequence_reference(reference_nll, config.scoring, (B, T))
    targets, valid_mask, out_of_range = shifted_targets(labels, attention_mask, V, config)
    idx, targets, valid_mask, out_of_range = _scored_pairs(config, T, targets, valid_mask, out_of_range, V)
    # SPEC §9.3: the head and the scoring run on the gathered hidden rows of S only (the saving).
    h = hidden[:, :T - 1] if idx is None else jnp.take(hidden, idx, axis=1)
    ts = fused_linear.fused_linear_scores(
        jax.lax.stop_gradient(h), jax.lax.stop_gradient(weight), targets,
        None if bias is None else jax.lax.stop_gradient(bias), scoring=router_scoring(config.scoring),
        ignore_index=config.ignore_index, valid_mask=valid_mask,
        memory_budget_bytes=config.router_memory_budget_bytes, weight_layout=weight_layout,
        logits_dtype=logits_dtype)
    ts, seq_ref = apply_sequence_reference(ts, reference_nll, columns=None if idx is None else idx + 1)
    return select_from_scores(ts, out_of_range, step, ratio, config, seq_ref)


def head_weight(model: Any) -> tuple[jax.Array, str]:
    """``(weight, layout)`` of a ``DecoderLM``'s head, cast to the compute dtype exactly as its head does."""
    dtype = model.config.dtype
    if model.lm_head is not None:
        return model.lm_head.kernel[...].astype(dtype), "dv"
    return model.embed.embedding[...].astype(dtype), "vd"


def linear_head_logits(hidden: jax.Array, weight: jax.Array, layout: str,
                       bias: jax.Array | None = None) -> jax.Array:
    """``hidden · Wᵀ + b`` in float32 (``W`` ``(V, d)`` for ``"vd"``, ``(d, V)`` for ``"dv"``)."""
    contract = ((hidden.ndim - 1,), (1,)) if layout == "vd" else ((hidden.ndim - 1,), (0,))
    z = jax.lax.dot_general(hidden, weight, (contract, ((), ())), preferred_element_type=jnp.float32)
    return z if bias is None else z + bias.astype(jnp.float32)


#: Relative tolerance of the head-linearity check by compute dtype, against the largest logit: a plain head
#: agrees to rounding; a scaled, capped or soft-capped head differs by far more.
HEAD_TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
_HEAD_VERDICTS: dict[Any, Any] = {}


def _head_probe_model(model: Any) -> Any:
    """``model`` itself when its parameters are concrete; under a trace, a copy with concrete pseudo-random
    parameters of the same shapes (the linearity of the head is a property of the model's code)."""
    graphdef, state = nnx.split(model)
    if not any(utils.is_traced(x) for x in jax.tree_util.tree_leaves(state)):
        return model
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree_util.tree_leaves(state))))

    def fresh(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.floating):
            return (jax.random.normal(next(keys), x.shape, jnp.float32) * 0.5).astype(x.dtype)
        return jnp.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map(fresh, state))


def forget_head_checks() -> None:
    """Forget the cached verdicts of :func:`check_linear_head` (e.g. after redefining a model class)."""
    _HEAD_VERDICTS.clear()


def check_linear_head(model: Any, name: str = "model") -> None:
    """The head-linearity rule, one rule for the router and the fused LM head: the model's own logits must be
    ``hidden · Wᵀ (+ b)`` of its final hidden states and its head weight.

    Checked numerically at first use on a few positions (``min(4, max_seq_len)`` tokens): the model's
    ``__call__`` logits against :func:`linear_head_logits` of ``hidden_states``, within
    :data:`HEAD_TOLERANCE` of the compute dtype relative to the largest logit. A model that scales, caps or
    soft-caps its logits after the head fails (:class:`ValueError` naming ``name``) instead of training on a
    loss that is not its own. Under a trace the check runs eagerly on a copy with concrete pseudo-random
    parameters; the verdict is cached per model class and configuration.
    """
    key = (type(model), getattr(model, "config", None))
    try:
        verdict = _HEAD_VERDICTS.get(key, "unchecked")
    except TypeError:   # an unhashable configuration: check every time
        key, verdict = None, "unchecked"
    if verdict == "unchecked":
        with jax.ensure_compile_time_eval():
            probe = _head_probe_model(model)
            cfg = probe.config
            T = max(1, min(4, int(cfg.max_seq_len)))
            ids = (jnp.arange(T, dtype=jnp.int32) * 7919 % int(cfg.vocab_size)).reshape(1, T)
            logits = jnp.asarray(probe(ids), jnp.float32)
            weight, layout = head_weight(probe)
            linear = linear_head_logits(probe.hidden_states(ids).astype(cfg.dtype), weight, layout)
            tol = HEAD_TOLERANCE.get(jnp.dtype(cfg.dtype).name, 2e-2)
            scale = float(jnp.max(jnp.abs(linear))) + 1e-6
            err = float(jnp.max(jnp.abs(logits - linear)))
        verdict = None
        if not err <= tol * scale:
            verdict = (f"its logits are not hidden @ lm_head.weight.T (+ bias) (max difference {err:.3g} at a "
                       f"logit scale of {scale:.3g}): a post-head transform (scaling, capping, soft-capping) "
                       f"would make CGGR score and train other logits than the model's own; use CGGRLoss on the "
                       f"model's logits instead (router_path='logits' for batch splitting)")
        if key is not None:
            _HEAD_VERDICTS[key] = verdict
    if verdict is not None:
        raise ValueError(f"{name}: {verdict}")


def resolve_router_path(model: Any, router_path: str) -> tuple[str, str]:
    """``(path, reason)``: ``"fused"`` or ``"logits"`` for ``model`` under ``router_path`` (SPEC-neutral: both
    give the same scores up to matmul rounding) and a sentence saying why.

    ``"fused"`` needs a :class:`cggr_jax.models.DecoderLM` whose head passes :func:`check_linear_head` (its
    logits are a plain linear map of ``hidden_states``). Any other model only promises ``router_logits``.

    Raises:
        ValueError: an unknown ``router_path``; ``"fused"`` for a model that cannot take it; ``"fused"`` or
            ``"auto"`` for a ``DecoderLM`` whose logits are not its linear head's (the head-linearity rule).
    """
    utils.check_choice(router_path, "router_path", ROUTER_PATHS)
    if router_path == "logits":
        return "logits", "router_path='logits' was requested"
    if isinstance(model, models.DecoderLM) and callable(getattr(model, "hidden_states", None)):
        check_linear_head(model)
        return "fused", ("DecoderLM: plain linear head, scored from the router's final hidden states without "
                         "materialising its (B, T, V) logits")
    reason = (f"{type(model).__name__} is not a cggr_jax.models.DecoderLM: only its router_logits are known, "
              f"not a plain linear head over hidden states")
    if router_path == "fused":
        raise ValueError(f"router_path: 'fused' is not possible: {reason}; use 'auto' or 'logits'")
    return "logits", reason


def score_sequences(
    router_logits: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    step: Any = 0,
    config: BatchSplitConfig = BatchSplitConfig(),
    reference_nll: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The ``CGGRScorer`` form: ``(difficulty (B,), mask (B,), info)`` at curriculum ``step``.

    ``info`` holds ``k`` (``k_seq``), ``n`` (eligible sequences), ``rank``, ``eligible``, ``ratio`` (effective),
    ``token_ratio`` (curriculum), and the token averages ``avg_confidence``, ``avg_entropy``,
    ``avg_difficulty``, ``tokens_total``, ``tokens_nonfinite``, ``tokens_out_of_range`` (SPEC §10).
    """
    sel = select_sequences(router_logits, labels, attention_mask, step=step, config=config,
                           reference_nll=reference_nll)
    return sel.difficulty, sel.mask, selection_info(sel)


def selection_info(sel: SequenceSelection) -> dict[str, jax.Array]:
    """The scorer's ``info`` dict of a :class:`SequenceSelection` (see :func:`score_sequences`)."""
    ts = sel.token_scores
    averages = pipeline.token_averages(ts)
    return {
        "k": sel.k,
        "n": jnp.sum(sel.eligible, dtype=jnp.int32),
        "rank": sel.rank,
        "eligible": sel.eligible,
        "ratio": sel.ratio,
        "token_ratio": sel.base_ratio,
        "tokens_total": averages["tokens_total"],
        # valid, in range and not eligible: the out-of-range pairs are valid (SPEC §4) and counted apart
        "tokens_nonfinite": jnp.sum(ts.valid & ~ts.eligible, dtype=jnp.int32) - sel.tokens_out_of_range,
        "tokens_out_of_range": sel.tokens_out_of_range,
        "avg_confidence": averages["avg_confidence"],
        "avg_entropy": averages["avg_entropy"],
        "avg_difficulty": averages["avg_difficulty"],
    }


# ---------------------------------------------------------------------------------- DecoderLM fused head
def decoder_lm_hidden_states(model: Any, input_ids: jax.Array,
                             attention_mask: jax.Array | None = None) -> jax.Array:
    """Final (normed) hidden states ``(B, T, d)`` of a :class:`cggr_jax.models.DecoderLM`: the input of its
    LM head (``model.hidden_states(input_ids, attention_mask)``)."""
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model: expected a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    return model.hidden_states(input_ids, attention_mask)


def decoder_lm_cggr_loss(model: Any, input_ids: jax.Array, labels: jax.Array, step: Any, *,
                         attention_mask: Optional[jax.Array] = None, reference_nll: Any = None,
                         **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CGGR loss of a :class:`cggr_jax.models.DecoderLM` without materialising its ``(B, T, V)`` logits.

    ``hidden = decoder_lm_hidden_states(model, input_ids, attention_mask)``; the head weight is
    ``model.lm_head.kernel`` (``(d, V)``, ``weight_layout="dv"``) or, with tied embeddings,
    ``model.embed.embedding`` (``(V, d)``), cast to the model's compute dtype exactly as the model's head does;
    logits are float32 like the model's (``logits_dtype=float32`` unless given). Labels are shifted (SPEC §1):
    position ``t`` is scored against ``labels[:, t + 1]``, the last position and positions whose next token is
    padding (``attention_mask[:, t + 1] == 0``) get ``ignore_index`` (the convention of SPEC §9). ``kwargs``
    are those of :func:`cggr_jax.fused_linear.fused_linear_cggr` (configuration, capacity, chunking). The model's
    head must pass :func:`check_linear_head` (checked at first use). Differentiable w.r.t. the
    model's parameters (use inside ``nnx.value_and_grad`` with ``has_aux=True``).

    ``reference_nll`` (``scoring='excess'``, SPEC §3.1) is aligned like the *unshifted* ``labels``, shape
    ``(B, T)``: ``reference_nll[b, t]`` is the reference model's loss of predicting ``labels[b, t]``. It is shifted
    exactly like the labels (``reference_nll[:, 0]`` is never read), as PyTorch's ``hf_causal_lm_cggr_loss`` does.
    """
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model: expected a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    ids_shape = getattr(input_ids, "shape", None)
    if ids_shape is None or len(ids_shape) != 2:
        raise ValueError(f"input_ids: expected an integer (B, T) array, got {fused_linear.describe(input_ids)}")
    loss_fn, config = kwargs.get("loss_fn"), kwargs.get("config")
    source = loss_fn if loss_fn is not None else config
    ignore_index = kwargs.get("ignore_index", DEFAULT_CONFIG.ignore_index) if source is None \
        else getattr(source, "ignore_index", DEFAULT_CONFIG.ignore_index)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    labels = utils.as_targets(labels, tuple(ids_shape) + (model.config.vocab_size,), "labels",
                              ignore_index=ignore_index)
    check_linear_head(model)
    hidden = decoder_lm_hidden_states(model, input_ids, attention_mask).astype(model.config.dtype)
    weight, layout = head_weight(model)
    labels = jnp.asarray(labels)
    pad = jnp.full((labels.shape[0], 1), ignore_index, dtype=labels.dtype)
    shifted = jnp.concatenate([labels[:, 1:], pad], axis=1)
    if attention_mask is not None:
        nxt = jnp.concatenate([jnp.asarray(attention_mask)[:, 1:] != 0,
                               jnp.zeros((labels.shape[0], 1), bool)], axis=1)
        shifted = jnp.where(nxt, shifted, jnp.asarray(ignore_index, labels.dtype))
    if reference_nll is not None:
        if tuple(getattr(reference_nll, "shape", ())) != tuple(labels.shape):
            raise ValueError(f"reference_nll: expected shape {tuple(labels.shape)} (that of labels, unshifted), "
                             f"got {fused_linear.describe(reference_nll)}")
        ref = jnp.asarray(reference_nll)
        # Shifted like the labels; the last position has no target (ignore_index), so its value is never read.
        reference_nll = jnp.concatenate([ref[:, 1:], jnp.zeros_like(ref[:, :1])], axis=1)
    kwargs.setdefault("logits_dtype", jnp.float32)
    return fused_linear.fused_linear_cggr_loss(hidden, weight, shifted, step, weight_layout=layout,
                                               reference_nll=reference_nll, **kwargs)


# ---------------------------------------------------------------------------------------------- routers
class TruncatedRouter(nnx.Module):
    """A view of a :class:`DecoderLM`: its embedding, first ``num_layers`` blocks, final norm and head.

    The sub-modules are the model's own objects (NNX shared references), so the router holds no parameter
    copies and always sees the model's current weights; ``router(ids) == model.router_logits(ids, n)``.
    """

    def __init__(self, model: models.DecoderLM, num_layers: int) -> None:
        models.check_num_layers(num_layers, model.config)
        self.model = model
        self.num_layers = num_layers

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.model.router_logits(input_ids, self.num_layers, attention_mask)


def create_truncated_router(model: models.DecoderLM, num_layers: int = 4) -> TruncatedRouter:
    """The JAX counterpart of ``cggr_torch.create_truncated_router``: a router sharing ``model``'s weights."""
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model must be a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    return TruncatedRouter(model, num_layers)
