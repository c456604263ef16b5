r"""The scorer of JAX batch splitting (SPEC §9): sequence selection from a router's logits or from its hidden
states, and :class:`BatchSplitConfig`, the settings of the selection and of the router.

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

Label rules (SPEC §1.1, §11): a label dtype that cannot hold ``ignore_index`` raises; concrete out-of-range
labels raise ``ValueError("labels: ...")``; traced ones are valid but never eligible, and are counted in
``tokens_out_of_range``.

The routers themselves and the choice of the fused or the logits path are in :mod:`cggr_jax.router`, the
head-linearity rule in :mod:`cggr_jax.causal_lm`; ``cggr_jax.batch_split`` runs this scorer in its train step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from cggr import DEFAULT_SEQUENCE_SELECTION, CGGRConfig
from cggr.config import ROUTER_POSITIONS_ALL, SAMPLED_SELECTIONS, RouterPositions

from cggr_jax import curriculum, fused_linear, pipeline, scoring, selection, utils
from cggr_jax.loss import DEFAULT_CONFIG
from cggr_jax.router import ROUTER_MEMORY_BUDGET, ROUTER_PATHS
from cggr_jax.sequence_reference import apply_sequence_reference, check_sequence_reference, router_scoring
from cggr_jax.types import SequenceSelection, TokenScores

__all__ = [
    "BatchSplitConfig",
    "SequenceSelection",
    "check_labels_and_mask",
    "check_shifted_labels",
    "score_sequences",
    "select_from_scores",
    "select_sequences",
    "select_sequences_fused",
    "selection_info",
    "sequence_difficulty",
    "shifted_targets",
]


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
    pairs = _pairs_to_score("select_sequences", tuple(logits.shape), "router_logits", int(logits.shape[-1]),
                            "router_logits", labels, attention_mask, step, ratio, config, vocab_size, reference_nll)
    idx = pairs.columns
    z = logits[:, :pairs.T - 1] if idx is None else jnp.take(logits, idx, axis=1)   # SPEC §9.3: the pairs of S
    ts = scoring.score_tokens(z, pairs.targets, scoring=router_scoring(config.scoring),
                              ignore_index=config.ignore_index, valid_mask=pairs.valid_mask)
    return _select_pairs(ts, pairs, step, ratio, config)


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


class _Pairs(NamedTuple):
    """The shifted pairs a router scores (SPEC §9, §9.3), prepared by :func:`_pairs_to_score`."""

    T: int                          # the batch's columns (of labels)
    columns: Any                    # S, a static int32 array of router positions; None: every pair
    targets: jax.Array              # the targets of the scored pairs
    valid_mask: jax.Array | None    # their attention-mask validity (None without a mask)
    out_of_range: jax.Array         # the out-of-range count of the considered targets
    reference_nll: jax.Array | None  # checked (SPEC §9.1), still aligned like the labels


def _pairs_to_score(caller: str, shape: tuple[int, ...], name: str, V: int, vocab_name: str, labels: Any,
                    attention_mask: Any, step: Any, ratio: Any, config: BatchSplitConfig, vocab_size: int | None,
                    reference_nll: Any) -> _Pairs:
    """The checks and the targets shared by :func:`select_sequences` and :func:`select_sequences_fused`: the
    router output ``name`` of leading ``shape`` against the labels and mask, its vocabulary ``V`` (named
    ``vocab_name``) against ``vocab_size``, exactly one of ``step`` / ``ratio``, the reference; then the
    shifted targets of the scored pairs (SPEC §9.3)."""
    B, T = _router_columns(shape, labels, attention_mask, config, name)
    if vocab_size is not None and int(vocab_size) != V:
        raise ValueError(f"{vocab_name}: vocabulary size {V} differs from the model's vocab_size {int(vocab_size)}; "
                         f"the router must share the model's tokenizer and head")
    if (step is None) == (ratio is None):
        raise ValueError(f"{caller}: pass exactly one of step= (curriculum) or ratio= (effective ratio)")
    reference_nll = check_sequence_reference(reference_nll, config.scoring, (B, T))
    targets, valid_mask, out_of_range = shifted_targets(labels, attention_mask, V, config)
    idx, targets, valid_mask, out_of_range = _scored_pairs(config, T, targets, valid_mask, out_of_range, V)
    return _Pairs(T, idx, targets, valid_mask, out_of_range, reference_nll)


def _select_pairs(ts: TokenScores, pairs: _Pairs, step: Any, ratio: Any,
                  config: BatchSplitConfig) -> SequenceSelection:
    """The router's token scores of ``pairs`` → the selection: the reference (SPEC §9.1, at the target columns
    of the scored pairs), then :func:`select_from_scores`."""
    columns = None if pairs.columns is None else pairs.columns + 1
    ts, seq_ref = apply_sequence_reference(ts, pairs.reference_nll, columns=columns)
    return select_from_scores(ts, pairs.out_of_range, step, ratio, config, seq_ref)


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
    pairs = _pairs_to_score("select_sequences_fused", tuple(hshape), "hidden", V, "weight", labels,
                            attention_mask, step, ratio, config, vocab_size, reference_nll)
    idx = pairs.columns
    # SPEC §9.3: the head and the scoring run on the gathered hidden rows of S only (the saving).
    h = hidden[:, :pairs.T - 1] if idx is None else jnp.take(hidden, idx, axis=1)
    ts = fused_linear.fused_linear_scores(
        jax.lax.stop_gradient(h), jax.lax.stop_gradient(weight), pairs.targets,
        None if bias is None else jax.lax.stop_gradient(bias), scoring=router_scoring(config.scoring),
        ignore_index=config.ignore_index, valid_mask=pairs.valid_mask,
        memory_budget_bytes=config.router_memory_budget_bytes, weight_layout=weight_layout,
        logits_dtype=logits_dtype)
    return _select_pairs(ts, pairs, step, ratio, config)


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
