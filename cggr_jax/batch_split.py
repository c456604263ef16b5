r"""CGGR batch splitting in JAX (SPEC §9): a truncated router picks the hardest sequences of a batch, and only
those run the full model's forward and backward, inside one jit-compiled training step.

Scoring (pure functions, eager or traced)
-----------------------------------------
:func:`select_sequences` / :func:`score_sequences` (the counterpart of PyTorch's ``CGGRScorer``) take the
router's logits ``z`` ``(B, T, V)`` and the ``labels`` ``(B, T)``:

1. shift (SPEC §1): position ``t`` pairs ``z[:, t]`` with ``labels[:, t+1]``; that pair is *valid* when
   ``labels[:, t+1] != ignore_index`` and ``attention_mask[:, t+1] != 0`` (a padding target is ignored);
2. score every pair (SPEC §2–§4) with :func:`cggr_jax.scoring.score_tokens` → difficulty ``d_{b,t}`` and
   eligibility ``e_{b,t}``;
3. sequence difficulty ``D_b = (Σ_t e_{b,t} d_{b,t}) / (Σ_t e_{b,t})`` (float32); a sequence with no eligible
   pair is not eligible; ``n_seq`` = eligible sequences;
4. ratio (SPEC §5): ``base = schedule(step)`` (default :func:`cggr_jax.curriculum.linear_warmup_ratio`),
   ``ratio = min(1, base·(1 + (1 − c̄)·σ))`` with ``c̄`` the mean confidence over *all* eligible pairs
   (``ratio = base`` with ``dynamic_threshold=False`` or ``selection='fixed_quota'``);
5. ``k_seq = num_selected(n_seq, ratio)`` and the kept sequences are the ``k_seq`` of lowest rank in the
   SPEC §6 order over sequences (``D`` descending, lower batch index first), i.e.
   ``cggr_jax.selection.select_tokens(D, eligible, ratio, selection="topk")``.

Training step (:func:`make_batch_split_train_step`)
----------------------------------------------------
One ``jax.jit``-compiled function ``(state, input_ids, labels, attention_mask) -> (state, metrics)``:

* the router is the model's own first ``router_layers`` blocks, final norm and head on
  ``stop_gradient(params)`` (no parameter copies, no gradient). On the **fused path** (default for a
  :class:`cggr_jax.models.DecoderLM`, ``config.router_path``) it stops at the final normed hidden states
  (``model.hidden_states(ids, mask, router_layers)``) and the head is scored block by block
  (:func:`select_sequences_fused`), so the ``(B, T, V)`` float32 router logits are never materialised; on the
  **logits path** (any other model) ``model.router_logits(ids, router_layers)`` is scored. The step's
  :attr:`BatchSplitTrainStep.router_path` says which one runs;
* the ``k_seq`` kept sequences are gathered into a batch of **static** size ``b``, the smallest configured
  *bucket* ``≥ k_seq`` (hardest first); the ``b − k_seq`` extra rows are the next sequences in the order
  with loss weight 0, so the loss is exactly the mean token cross-entropy over the valid shifted tokens of
  the ``k_seq`` kept sequences (``Σ ce / max(1, #tokens)``) and the extra rows contribute exactly zero
  gradient;
* every bucket is one branch of a ``jax.lax.switch`` on the bucket index computed on the device, so the whole
  run compiles **once** per input shape, whatever ``k_seq`` does during the curriculum; at run time only the
  chosen branch executes, so the main forward/backward costs ``b/B`` of a full step. (A host-side bucket
  choice would need ``k_seq`` on the host, i.e. a device→host synchronisation in the middle of every step;
  the switch keeps the Python side asynchronous. On GPU the XLA runtime reads the branch index itself.)
  ``k_seq = 0`` (every sequence without an eligible target) takes a branch that runs no model at all: the
  loss is 0 and the gradient is exactly zero (the optimizer still makes its update from zero gradients);
* the gradient goes through ``optimizer`` — an optax transformation that must contain
  :func:`cggr_jax.transform.advance_curriculum` (e.g. ``optax.chain(advance_curriculum(), optax.adamw(…))``)
  — and the curriculum step is read from the optimizer state with :func:`cggr_jax.transform.current_step`,
  so checkpointing the optimizer state checkpoints the curriculum; the SPEC §10 metrics of the step are passed
  as ``cggr_metrics=`` and can be read back with :func:`cggr_jax.transform.latest_metrics`.

Modes:

* ``"cggr"`` — the above;
* ``"random_sequence"`` — no router: a sequence is eligible when it has a valid shifted target, and
  ``k_seq = num_selected(n_seq, base(step))`` (the curriculum ratio, no dynamic threshold since there are no
  router confidences) sequences are chosen uniformly at random. With ``dynamic_threshold=False`` this keeps
  exactly CGGR's count (unless router rows are non-finite): the cost of the main pass alone, the baseline of
  the throughput benchmark (as in ``benchmarks/bench_batch_split_torch.py``);
* ``"random_sequence_router"`` — runs the router like ``"cggr"`` and keeps exactly CGGR's ``k_seq`` (dynamic
  threshold included) among the same eligible sequences, but chosen uniformly at random: the ablation of the
  selection rule at equal compute;
* ``"standard"`` — no router, the whole batch, the ordinary mean token cross-entropy.

The random choice of step ``s`` uses the key ``fold_in(key(config.seed), s)`` (ranks of uniform priorities).

Buckets default to :func:`default_buckets` (``⌈B·f⌉`` for ``f ∈ {1/8, 1/4, 3/8, 1/2, 3/4, 1}``); ``B`` is
always added. More buckets waste less padding compute and cost more compile time (one model forward/backward
per bucket, compiled once).

Bad input: ``labels``/``attention_mask`` of another shape than ``input_ids``, non-2-D or non-integer
``input_ids``, ``seq_len < 2`` (no next-token target), or router logits whose vocabulary differs from the
model's (``vocab_size=``) raise :class:`ValueError`. A batch of one sequence is legal: it is kept whenever it
has an eligible target (``k_seq = 1``), so the step equals the standard step (plus the router's cost).
All-padding (or all-ignored) sequences are never eligible and never kept; a batch of only such sequences gives
loss 0 and zero gradients.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cggr_jax import curriculum, scoring, selection, transform, utils
from cggr_jax import loss as loss_lib

__all__ = [
    "BatchSplitConfig",
    "SequenceSelection",
    "BatchSplitState",
    "BatchSplitTrainStep",
    "SEQUENCE_METRIC_KEYS",
    "ROUTER_PATHS",
    "ROUTER_MEMORY_BUDGET",
    "select_sequences",
    "select_sequences_fused",
    "resolve_router_path",
    "score_sequences",
    "sequence_difficulty",
    "default_buckets",
    "causal_lm_loss",
    "make_batch_split_train_step",
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

Mode = Literal["cggr", "random_sequence", "random_sequence_router", "standard"]
MODES: tuple[str, ...] = ("cggr", "random_sequence", "random_sequence_router", "standard")

#: Keys of the metrics dict returned by the training step (every value a scalar array).
SEQUENCE_METRIC_KEYS: tuple[str, ...] = (
    "loss",
    "step",
    "token_ratio",
    "effective_ratio",
    "sequences_selected",
    "sequences_total",
    "bucket_size",
    "tokens_selected",
    "tokens_total",
    "tokens_nonfinite",
    "tokens_out_of_range",
    "avg_confidence",
    "avg_entropy",
    "avg_difficulty",
    "avg_sequence_difficulty_selected",
)


@dataclasses.dataclass(frozen=True)
class BatchSplitConfig:
    """Configuration of sequence selection (SPEC §9); the field names follow ``CGGRLoss``.

    Attributes:
        router_layers: number of the model's blocks the router runs (``0 ≤ router_layers ≤ num_layers``).
        scoring: token difficulty (SPEC §3): ``"entropy"``, ``"margin"``, ``"loss"`` or ``"combined"``.
        selection: ``"topk"`` or ``"fixed_quota"`` (= topk without the dynamic threshold). ``"stratified"``
            and ``"sequence_aware"`` are token-level strategies and a :class:`ValueError` here (SPEC §9).
        dynamic_threshold, threshold_sensitivity: SPEC §5.2.
        min_tokens_ratio, warmup_steps: the default curriculum (SPEC §5.1).
        ignore_index: label value without a target.
        ratio_schedule: optional ``step -> ratio`` (an ``optax.Schedule``, values in ``(0, 1]``) replacing the
            default curriculum.
        seed: PRNG seed of the random modes (the key of step ``s`` is ``fold_in(key(seed), s)``).
        router_path: ``"auto"`` (default), ``"fused"`` or ``"logits"`` (:data:`ROUTER_PATHS`): score the router
            from its final hidden states without materialising its logits (a :class:`cggr_jax.models.DecoderLM`,
            whose head is a plain linear map), or from ``router_logits``. ``"fused"`` on a model that cannot
            take it is a :class:`ValueError`; ``"auto"`` falls back and the step reports it
            (:attr:`BatchSplitTrainStep.router_path`, :attr:`BatchSplitTrainStep.router_path_reason`).
        router_memory_budget_bytes: working memory of the fused path's logit blocks (bytes, default 1 GiB).
    """

    router_layers: int = 4
    scoring: str = "combined"
    selection: str = "topk"
    dynamic_threshold: bool = True
    threshold_sensitivity: float = 0.5
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    ignore_index: int = -100
    ratio_schedule: Callable[[Any], Any] | None = None
    seed: int = 0
    router_path: str = "auto"
    router_memory_budget_bytes: int = ROUTER_MEMORY_BUDGET

    def __post_init__(self) -> None:
        utils.check_int(self.router_layers, "router_layers", minimum=0)
        utils.check_choice(self.scoring, "scoring", scoring.SCORING_MODES)
        if self.selection not in ("topk", "fixed_quota"):
            raise ValueError(
                f"selection: sequence selection supports 'topk' and 'fixed_quota' only (SPEC §9: "
                f"'stratified' and 'sequence_aware' are token-level strategies), got {self.selection!r}"
            )
        if not isinstance(self.dynamic_threshold, bool):
            raise ValueError(f"dynamic_threshold: expected a bool, got {self.dynamic_threshold!r}")
        utils.check_real(self.threshold_sensitivity, "threshold_sensitivity", low=0.0)
        utils.check_real(self.min_tokens_ratio, "min_tokens_ratio", low=0.0, high=1.0, low_inclusive=False)
        utils.check_int(self.warmup_steps, "warmup_steps", minimum=0)
        utils.check_int(self.ignore_index, "ignore_index")
        utils.check_int(self.seed, "seed")
        utils.check_choice(self.router_path, "router_path", ROUTER_PATHS)
        utils.check_int(self.router_memory_budget_bytes, "router_memory_budget_bytes", minimum=1)
        if self.ratio_schedule is not None and not callable(self.ratio_schedule):
            raise ValueError(f"ratio_schedule: expected a callable step -> ratio, got {self.ratio_schedule!r}")

    def schedule(self) -> Callable[[Any], jax.Array]:
        """The curriculum ``step -> base ratio`` (float32)."""
        if self.ratio_schedule is not None:
            fn = self.ratio_schedule
            return lambda step: jnp.asarray(fn(step)).astype(jnp.float32)
        return curriculum.linear_warmup_ratio(self.min_tokens_ratio, self.warmup_steps)

    @property
    def uses_dynamic_threshold(self) -> bool:
        return self.dynamic_threshold and self.selection != "fixed_quota"


class SequenceSelection(NamedTuple):
    """Result of :func:`select_sequences` (all arrays; ``B`` = batch size).

    Attributes:
        mask: ``(B,)`` bool, the kept sequences (exactly ``k`` of them).
        k: int32 scalar ``k_seq``.
        rank: ``(B,)`` int32 SPEC §6 rank of each eligible sequence, −1 for ineligible ones.
        difficulty: ``(B,)`` float32 ``D_b`` (0 for ineligible sequences).
        eligible: ``(B,)`` bool, sequences with at least one eligible shifted target.
        ratio: float32 effective ratio (after the dynamic threshold) that produced ``k``.
        base_ratio: float32 curriculum ratio ``base(step)`` (NaN when ``ratio`` was passed directly).
        token_scores: the :class:`cggr_jax.scoring.TokenScores` of the shifted pairs, shape ``(B, T−1)``.
        tokens_out_of_range: int32 count of non-ignored shifted targets outside ``[0, V)`` (traced input only;
            concrete input raises instead).
    """

    mask: jax.Array
    k: jax.Array
    rank: jax.Array
    difficulty: jax.Array
    eligible: jax.Array
    ratio: jax.Array
    base_ratio: jax.Array
    token_scores: scoring.TokenScores
    tokens_out_of_range: jax.Array


# ----------------------------------------------------------------------------------------------- checks
def _check_batch(input_ids: Any, labels: Any, attention_mask: Any) -> None:
    """Static checks of a ``(B, T)`` batch: 2-D integer ``input_ids`` with ``B ≥ 1`` and ``T ≥ 2``, then
    :func:`_check_labels_and_mask`."""
    shape = getattr(input_ids, "shape", None)
    dtype = getattr(input_ids, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"input_ids: expected a 2-D integer array of shape (batch, seq_len), got "
            f"{tuple(shape) if shape is not None else type(input_ids).__name__} "
            f"(a single sequence must be given as shape (1, T))"
        )
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids: expected an integer dtype (token ids), got {dtype}")
    _check_labels_and_mask(tuple(shape), labels, attention_mask, "input_ids")


def _check_labels_and_mask(shape: tuple[int, ...], labels: Any, attention_mask: Any, against: str) -> None:
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
def sequence_difficulty(difficulty: jax.Array, eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``D_b = Σ_t e_{b,t} d_{b,t} / Σ_t e_{b,t}`` (float32; 0 where no token is eligible) and the sequence
    eligibility ``Σ_t e_{b,t} > 0``, for ``(B, T')`` token difficulties and eligibility."""
    d = jnp.where(eligible, difficulty.astype(jnp.float32), jnp.float32(0.0))
    count = jnp.sum(eligible, axis=1, dtype=jnp.int32)
    total = jnp.sum(d, axis=1, dtype=jnp.float32)
    seq_ok = count > 0
    seq_d = jnp.where(seq_ok, total / jnp.maximum(count, 1).astype(jnp.float32), jnp.float32(0.0))
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
) -> SequenceSelection:
    """SPEC §9 sequence selection from router logits ``(B, T, V)`` and ``labels`` ``(B, T)`` (unshifted).

    Give exactly one of ``step`` (the curriculum step: ``ratio`` follows SPEC §5 with ``c̄`` the mean router
    confidence over all eligible shifted pairs) or ``ratio`` (the float32 effective ratio, used as is — the
    form for parity tests, matching ``tests.oracle.select_sequences``). ``vocab_size``, when given, must equal
    the router's ``V`` (a router with another vocabulary than the model cannot score the model's labels).
    Works eagerly (concrete out-of-range labels raise :class:`ValueError`) and under ``jit``.
    """
    if not isinstance(config, BatchSplitConfig):
        raise ValueError(f"config: expected a BatchSplitConfig, got {type(config).__name__}")
    logits = utils.as_logits(router_logits, "router_logits")
    if logits.ndim != 3:
        raise ValueError(f"router_logits: expected shape (B, T, V), got {tuple(logits.shape)}")
    _check_labels_and_mask(tuple(logits.shape[:2]), labels, attention_mask, "router_logits[:, :, 0]")
    V = logits.shape[-1]
    if vocab_size is not None and int(vocab_size) != V:
        raise ValueError(
            f"router_logits: vocabulary size {V} differs from the model's vocab_size {int(vocab_size)}; the "
            f"router must share the model's tokenizer and head"
        )
    if (step is None) == (ratio is None):
        raise ValueError("select_sequences: pass exactly one of step= (curriculum) or ratio= (effective ratio)")

    targets, valid_mask, out_of_range = _shifted_targets(labels, attention_mask, V, config)
    ts = scoring.score_tokens(logits[:, :-1], targets, scoring=config.scoring, ignore_index=config.ignore_index,
                              valid_mask=valid_mask)
    return _select_from_scores(ts, out_of_range, step, ratio, config)


def _shifted_targets(labels: Any, attention_mask: Any, V: int,
                     config: BatchSplitConfig) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(labels[:, 1:], attention_mask[:, 1:] != 0 or None, out-of-range count)``; concrete out-of-range
    labels raise :class:`ValueError` (SPEC §11)."""
    labels = jnp.asarray(labels)
    targets = labels[:, 1:]
    valid_mask = None
    if attention_mask is not None:
        valid_mask = jnp.asarray(attention_mask)[:, 1:] != 0
    utils.check_target_range(targets if valid_mask is None else jnp.where(valid_mask, targets, config.ignore_index),
                             V, config.ignore_index, "labels")
    not_ignored, in_range, _ = utils.target_masks(targets, V, config.ignore_index)
    considered = not_ignored if valid_mask is None else not_ignored & valid_mask
    out_of_range = jnp.sum(considered & ~in_range, dtype=jnp.int32)
    return targets, valid_mask, out_of_range


def _select_from_scores(ts: scoring.TokenScores, out_of_range: jax.Array, step: Any, ratio: Any,
                        config: BatchSplitConfig) -> SequenceSelection:
    """Steps 3-5 of the module docstring from the ``(B, T−1)`` token scores of the shifted pairs."""
    seq_d, seq_ok = sequence_difficulty(ts.difficulty, ts.eligible)
    if ratio is not None:
        eff = curriculum.check_ratio_value(ratio)
        base = jnp.float32(jnp.nan)
    else:
        step = curriculum.check_step(step)
        base = config.schedule()(step)
        if config.uses_dynamic_threshold:
            n_tok = jnp.sum(ts.eligible, dtype=jnp.int32)
            conf_sum = jnp.sum(jnp.where(ts.eligible, ts.stats.confidence, 0.0), dtype=jnp.float32)
            mean_conf = jnp.where(n_tok > 0, conf_sum / jnp.maximum(n_tok, 1).astype(jnp.float32), 0.0)
            eff = curriculum.dynamic_ratio(base, mean_conf, config.threshold_sensitivity)
        else:
            eff = base
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
    from cggr_jax import fused_linear

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
    _check_labels_and_mask(tuple(hshape[:2]), labels, attention_mask, "hidden[:, :, 0]")
    if vocab_size is not None and int(vocab_size) != V:
        raise ValueError(f"weight: vocabulary size {V} differs from the model's vocab_size {int(vocab_size)}; the "
                         f"router must share the model's tokenizer and head")
    if (step is None) == (ratio is None):
        raise ValueError("select_sequences_fused: pass exactly one of step= (curriculum) or ratio= (effective "
                         "ratio)")
    targets, valid_mask, out_of_range = _shifted_targets(labels, attention_mask, V, config)
    ts = fused_linear.fused_linear_scores(
        jax.lax.stop_gradient(hidden[:, :-1]), jax.lax.stop_gradient(weight), targets,
        None if bias is None else jax.lax.stop_gradient(bias), scoring=config.scoring,
        ignore_index=config.ignore_index, valid_mask=valid_mask,
        memory_budget_bytes=config.router_memory_budget_bytes, weight_layout=weight_layout,
        logits_dtype=logits_dtype)
    return _select_from_scores(ts, out_of_range, step, ratio, config)


def _decoder_head(model: Any) -> tuple[jax.Array, str]:
    """``(weight, layout)`` of a ``DecoderLM``'s head, cast to the compute dtype exactly as its head does."""
    dtype = model.config.dtype
    if model.lm_head is not None:
        return model.lm_head.kernel[...].astype(dtype), "dv"
    return model.embed.embedding[...].astype(dtype), "vd"


def resolve_router_path(model: Any, router_path: str) -> tuple[str, str]:
    """``(path, reason)``: ``"fused"`` or ``"logits"`` for ``model`` under ``router_path`` (SPEC-neutral: both
    give the same scores up to matmul rounding) and a sentence saying why.

    ``"fused"`` needs a :class:`cggr_jax.models.DecoderLM` (its head is a plain linear map of
    ``hidden_states``; no logit soft-capping or scaling). Any other model only promises ``router_logits``.

    Raises:
        ValueError: an unknown ``router_path``, or ``"fused"`` for a model that cannot take it.
    """
    from cggr_jax import models

    utils.check_choice(router_path, "router_path", ROUTER_PATHS)
    if router_path == "logits":
        return "logits", "router_path='logits' was requested"
    if isinstance(model, models.DecoderLM) and callable(getattr(model, "hidden_states", None)):
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
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The ``CGGRScorer`` form: ``(difficulty (B,), mask (B,), info)`` at curriculum ``step``.

    ``info`` holds ``k`` (``k_seq``), ``n`` (eligible sequences), ``rank``, ``eligible``, ``ratio`` (effective),
    ``token_ratio`` (curriculum), and the token averages ``avg_confidence``, ``avg_entropy``,
    ``avg_difficulty``, ``tokens_total``, ``tokens_nonfinite``, ``tokens_out_of_range`` (SPEC §10).
    """
    sel = select_sequences(router_logits, labels, attention_mask, step=step, config=config)
    return sel.difficulty, sel.mask, _selection_info(sel)


def _selection_info(sel: SequenceSelection) -> dict[str, jax.Array]:
    ts = sel.token_scores
    e = ts.eligible
    n_tok = jnp.sum(e, dtype=jnp.int32)
    denom = jnp.maximum(n_tok, 1).astype(jnp.float32)

    def avg(x: jax.Array) -> jax.Array:
        return jnp.where(n_tok > 0, jnp.sum(jnp.where(e, x, 0.0), dtype=jnp.float32) / denom, 0.0)

    return {
        "k": sel.k,
        "n": jnp.sum(sel.eligible, dtype=jnp.int32),
        "rank": sel.rank,
        "eligible": sel.eligible,
        "ratio": sel.ratio,
        "token_ratio": sel.base_ratio,
        "tokens_total": n_tok,
        "tokens_nonfinite": jnp.sum(ts.valid & ~e, dtype=jnp.int32),
        "tokens_out_of_range": sel.tokens_out_of_range,
        "avg_confidence": avg(ts.stats.confidence),
        "avg_entropy": avg(ts.stats.entropy),
        "avg_difficulty": avg(ts.difficulty),
    }


# ------------------------------------------------------------------------------------------------- loss
def causal_lm_loss(
    logits: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    *,
    ignore_index: int = -100,
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy ``Σ ce / max(1, count)`` over the valid shifted tokens and its count.

    ``ce_{b,t} = lse(z_{b,t}) − z_{b,t}[y_{b,t+1}]`` in float32. A pair is counted when
    ``labels[:, t+1] != ignore_index``, ``0 ≤ labels[:, t+1] < V``, ``attention_mask[:, t+1] != 0`` and
    ``weights[b] > 0`` (``weights`` ``(B,)`` excludes whole rows, e.g. a bucket's padding sequences). Excluded
    pairs read no target (index 0 is gathered) and get an exactly zero gradient; a non-finite excluded row
    cannot leak a NaN into the gradient because it is replaced by zeros first.
    """
    z = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    V = z.shape[-1]
    not_ignored, in_range, safe = utils.target_masks(targets, V, ignore_index)
    valid = not_ignored & in_range
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0)
    if weights is not None:
        valid = valid & (weights[:, None] > 0)
    z = jnp.where(valid[..., None], z, 0.0)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, lse - picked, 0.0)
    count = jnp.sum(valid, dtype=jnp.int32)
    return jnp.sum(ce, dtype=jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32), count


# -------------------------------------------------------------------------------------------- buckets
_DEFAULT_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


def default_buckets(batch_size: int) -> tuple[int, ...]:
    """``sorted{⌈B·f⌉ : f ∈ (1/8, 1/4, 3/8, 1/2, 3/4, 1)}`` (each ≥ 1): at most 6 static gathered sizes."""
    batch_size = utils.check_int(batch_size, "batch_size", minimum=1)
    return tuple(sorted({max(1, math.ceil(batch_size * f)) for f in _DEFAULT_FRACTIONS}))


def _resolve_buckets(buckets: Any, batch_size: int) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(batch_size)
    if callable(buckets):
        buckets = buckets(batch_size)
    try:
        values = [utils.check_int(b, "buckets[i]", minimum=1, maximum=batch_size) for b in buckets]
    except TypeError as err:
        raise ValueError(f"buckets: expected a sequence of ints in [1, {batch_size}] or a callable "
                         f"batch_size -> sequence, got {buckets!r}") from err
    return tuple(sorted(set(values) | {batch_size}))


# ---------------------------------------------------------------------------------------- train step
class BatchSplitState(NamedTuple):
    """The training state threaded through the step: ``nnx.Param`` state, the rest of the model's state
    (empty for :class:`cggr_jax.models.DecoderLM`), and the optax state (which holds the curriculum step)."""

    params: Any
    rest: Any
    opt_state: Any


class BatchSplitTrainStep:
    """The jitted batch-split training step (see the module docstring); build it with
    :func:`make_batch_split_train_step`.

    ``state = step.init(model)``; ``state, metrics = step(state, input_ids, labels, attention_mask=None)``;
    ``step.model(state)`` rebuilds an ``nnx`` model (for evaluation). ``metrics`` is a dict of scalar arrays
    with the keys :data:`SEQUENCE_METRIC_KEYS` (reading them synchronises; the step itself does not).
    ``num_traces`` counts how many times the step was traced (= compiled): one per distinct input shape.
    The state passed in is donated (its buffers are reused), as usual for a training loop.
    """

    def __init__(
        self,
        graphdef: Any,
        config: BatchSplitConfig,
        optimizer: optax.GradientTransformation,
        *,
        mode: Mode = "cggr",
        buckets: Any = None,
        vocab_size: int | None = None,
        donate: bool = True,
        compiler_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, BatchSplitConfig):
            raise ValueError(f"config: expected a BatchSplitConfig, got {type(config).__name__}")
        utils.check_choice(mode, "mode", MODES)
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ValueError(f"optimizer: expected an optax GradientTransformation, got {type(optimizer).__name__}")
        if buckets is not None and not callable(buckets):
            # Validate the values early; the upper bound (the batch size) is checked at the first call.
            try:
                buckets = tuple(buckets)
            except TypeError as err:
                raise ValueError(f"buckets: expected a sequence of positive ints or a callable batch_size -> "
                                 f"sequence, got {buckets!r}") from err
            for b in buckets:
                utils.check_int(b, "buckets[i]", minimum=1)
        self.graphdef = graphdef
        self.config = config
        self.optimizer = optax.with_extra_args_support(optimizer)
        self.mode = mode
        self.buckets = buckets
        self.vocab_size = vocab_size
        #: ``"fused"`` / ``"logits"``: how the router is scored (resolved by :meth:`init` and at trace time;
        #: ``None`` for the modes without a router or before either), and why (:func:`resolve_router_path`).
        self.router_path: str | None = None
        self.router_path_reason: str | None = None
        self.num_traces = 0
        jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
        if compiler_options:
            jit_kwargs["compiler_options"] = dict(compiler_options)
        self._jitted = jax.jit(self._step, **jit_kwargs)

    # -- state ---------------------------------------------------------------------------------------------
    def init(self, model: nnx.Module) -> BatchSplitState:
        """Split ``model`` (which must have this step's graph) and initialise the optimizer state.

        The parameters are copied, so donating the state to the step never invalidates ``model``'s own
        arrays (``model`` keeps its initial weights; use :meth:`model` for the trained one)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if graphdef != self.graphdef:
            raise ValueError("model: its graph differs from the graphdef this train step was built with")
        params, rest = jax.tree_util.tree_map(jnp.copy, (params, rest))
        if self.vocab_size is None:
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            self.vocab_size = int(vocab) if isinstance(vocab, int) else None
        opt_state = self.optimizer.init(params)
        transform.current_step(opt_state)  # raises ValueError when advance_curriculum() is missing
        if self.mode in ("cggr", "random_sequence_router"):
            self.router_path, self.router_path_reason = resolve_router_path(model, self.config.router_path)
        return BatchSplitState(params, rest, opt_state)

    def model(self, state: BatchSplitState) -> nnx.Module:
        """The ``nnx`` model with the state's parameters."""
        return nnx.merge(self.graphdef, state.params, state.rest)

    # -- the step ------------------------------------------------------------------------------------------
    def __call__(
        self,
        state: BatchSplitState,
        input_ids: jax.Array,
        labels: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> tuple[BatchSplitState, dict[str, jax.Array]]:
        _check_batch(input_ids, labels, attention_mask)
        if not isinstance(state, BatchSplitState):
            raise ValueError(f"state: expected the BatchSplitState returned by init(), got {type(state).__name__}")
        return self._jitted(state, input_ids, labels, attention_mask)

    def bucket_sizes(self, batch_size: int) -> tuple[int, ...]:
        """The static gathered sizes used for batches of ``batch_size`` sequences."""
        return _resolve_buckets(self.buckets, batch_size)

    def _loss_and_grad(self, params: Any, rest: Any, ids: jax.Array, labels: jax.Array,
                       amask: jax.Array | None, weights: jax.Array | None) -> tuple[jax.Array, jax.Array, Any]:
        """``(loss, token count, d loss / d params)`` of :func:`causal_lm_loss` on the full model."""
        graphdef, ignore = self.graphdef, self.config.ignore_index

        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids, amask)
            return causal_lm_loss(logits, labels, amask, weights, ignore_index=ignore)

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, count, grads

    def _route(self, params: Any, rest: Any, input_ids: jax.Array, labels: jax.Array,
               attention_mask: jax.Array | None, step: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """``(rank, k, metrics)`` of the kept sequences for the selecting modes (rank −1 = not eligible)."""
        cfg = self.config
        B = input_ids.shape[0]
        zero_f, zero_i = jnp.float32(0.0), jnp.int32(0)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        if self.mode == "random_sequence":
            # No router: eligibility from the labels alone, the curriculum ratio without the dynamic threshold.
            V = self.vocab_size
            valid = _shifted_valid(labels, attention_mask, cfg.ignore_index)
            if V is not None:
                valid = valid & utils.target_masks(labels[:, 1:], V, cfg.ignore_index)[1]
            seq_ok = jnp.any(valid, axis=1)
            base = cfg.schedule()(step)
            k = curriculum.num_selected(jnp.sum(seq_ok, dtype=jnp.int32), base)
            rank = selection.rank_tokens(jax.random.uniform(key, (B,), dtype=jnp.float32), seq_ok)
            metrics = {
                "token_ratio": base, "effective_ratio": base, "sequences_total": jnp.sum(seq_ok, dtype=jnp.int32),
                "tokens_total": jnp.sum(valid, dtype=jnp.int32), "tokens_nonfinite": zero_i,
                "tokens_out_of_range": zero_i, "avg_confidence": zero_f, "avg_entropy": zero_f,
                "avg_difficulty": zero_f, "avg_sequence_difficulty_selected": zero_f,
            }
            return rank, k, metrics

        router_model = nnx.merge(self.graphdef, jax.lax.stop_gradient(params), rest)
        path, self.router_path_reason = resolve_router_path(router_model, cfg.router_path)  # trace time
        self.router_path = path
        if path == "fused":
            hidden = router_model.hidden_states(input_ids, attention_mask, cfg.router_layers)
            weight, layout = _decoder_head(router_model)
            sel = select_sequences_fused(hidden, weight, labels, attention_mask, step=step, config=cfg,
                                         vocab_size=self.vocab_size, weight_layout=layout)
        else:
            router_logits = router_model.router_logits(input_ids, cfg.router_layers, attention_mask)
            sel = select_sequences(jax.lax.stop_gradient(router_logits), labels, attention_mask, step=step,
                                   config=cfg, vocab_size=self.vocab_size)
        rank = sel.rank
        if self.mode == "random_sequence_router":
            rank = selection.rank_tokens(jax.random.uniform(key, (B,), dtype=jnp.float32), sel.eligible)
        kept = (rank >= 0) & (rank < sel.k)
        n_kept = jnp.sum(kept, dtype=jnp.int32)
        info = _selection_info(sel)
        metrics = {
            "token_ratio": sel.base_ratio, "effective_ratio": sel.ratio, "sequences_total": info["n"],
            "tokens_total": info["tokens_total"], "tokens_nonfinite": info["tokens_nonfinite"],
            "tokens_out_of_range": info["tokens_out_of_range"], "avg_confidence": info["avg_confidence"],
            "avg_entropy": info["avg_entropy"], "avg_difficulty": info["avg_difficulty"],
            "avg_sequence_difficulty_selected": jnp.where(
                n_kept > 0,
                jnp.sum(jnp.where(kept, sel.difficulty, 0.0)) / jnp.maximum(n_kept, 1).astype(jnp.float32),
                zero_f),
        }
        return rank, sel.k, metrics

    def _step(self, state: BatchSplitState, input_ids: jax.Array, labels: jax.Array,
              attention_mask: jax.Array | None) -> tuple[BatchSplitState, dict[str, jax.Array]]:
        self.num_traces += 1  # runs at trace time only: counts compilations
        params, rest, opt_state = state
        B = input_ids.shape[0]
        step = transform.current_step(opt_state)
        zero_f, zero_i = jnp.float32(0.0), jnp.int32(0)

        if self.mode == "standard":
            loss, count, grads = self._loss_and_grad(params, rest, input_ids, labels, attention_mask, None)
            has_target = jnp.any(_shifted_valid(labels, attention_mask, self.config.ignore_index), axis=1)
            n_seq = jnp.sum(has_target, dtype=jnp.int32)
            metrics = {
                "loss": loss, "step": step, "token_ratio": jnp.float32(1.0), "effective_ratio": jnp.float32(1.0),
                "sequences_selected": n_seq, "sequences_total": n_seq, "bucket_size": jnp.int32(B),
                "tokens_selected": count, "tokens_total": count, "tokens_nonfinite": zero_i,
                "tokens_out_of_range": zero_i, "avg_confidence": zero_f, "avg_entropy": zero_f,
                "avg_difficulty": zero_f, "avg_sequence_difficulty_selected": zero_f,
            }
        else:
            rank, k, route_metrics = self._route(params, rest, input_ids, labels, attention_mask, step)
            # Kept sequences first (by rank), then the other eligible ones, then the ineligible ones.
            order_key = jnp.where(rank >= 0, rank, B + jnp.arange(B, dtype=jnp.int32))
            order = jnp.argsort(order_key).astype(jnp.int32)
            sizes = self.bucket_sizes(B)
            bounds = jnp.asarray((0,) + sizes, dtype=jnp.int32)
            branch = jnp.searchsorted(bounds, k, side="left").astype(jnp.int32)  # k = 0 → branch 0

            def zero_branch(_):
                return zero_f, zero_i, jax.tree_util.tree_map(jnp.zeros_like, params)

            def make_branch(b: int):
                def run(_):
                    idx = order[:b]
                    weights = (jnp.arange(b, dtype=jnp.int32) < k).astype(jnp.float32)
                    sub_mask = None if attention_mask is None else jnp.take(attention_mask, idx, axis=0)
                    return self._loss_and_grad(params, rest, jnp.take(input_ids, idx, axis=0),
                                               jnp.take(labels, idx, axis=0), sub_mask, weights)
                return run

            loss, count, grads = jax.lax.switch(branch, [zero_branch] + [make_branch(b) for b in sizes], None)
            metrics = {"loss": loss, "step": step, "sequences_selected": k, "bucket_size": bounds[branch],
                       "tokens_selected": count, **route_metrics}

        # The SPEC §10 subset of the metrics goes to the curriculum state (``transform.latest_metrics``).
        cggr_metrics = {key: metrics[key] for key in loss_lib.NUMERIC_METRIC_KEYS}
        updates, opt_state = self.optimizer.update(grads, opt_state, params, cggr_metrics=cggr_metrics)
        params = optax.apply_updates(params, updates)
        return BatchSplitState(params, rest, opt_state), metrics


def _shifted_valid(labels: jax.Array, attention_mask: jax.Array | None, ignore_index: int) -> jax.Array:
    valid = labels[:, 1:] != ignore_index
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0)
    return valid


def make_batch_split_train_step(
    graphdef: Any,
    config: BatchSplitConfig,
    optimizer: optax.GradientTransformation,
    *,
    mode: Mode = "cggr",
    buckets: Any = None,
    vocab_size: int | None = None,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> BatchSplitTrainStep:
    """Build the jitted batch-split training step.

    Args:
        graphdef: the model's graph, ``nnx.split(model, nnx.Param, ...)[0]``; the model must provide
            ``__call__(input_ids, attention_mask)`` and ``router_logits(input_ids, num_layers, attention_mask)``
            (as :class:`cggr_jax.models.DecoderLM` does).
        config: :class:`BatchSplitConfig`.
        optimizer: an optax transformation containing :func:`cggr_jax.transform.advance_curriculum`, e.g.
            ``optax.chain(advance_curriculum(), optax.adamw(3e-4))``.
        mode: ``"cggr"``, ``"random_sequence"``, ``"random_sequence_router"`` or ``"standard"`` (module
            docstring).
        buckets: static gathered sizes (ints in ``[1, B]``; ``B`` is added), a callable ``B -> sizes``, or
            ``None`` for :func:`default_buckets`.
        vocab_size: the model's vocabulary, checked against the router's logits; by default
            ``model.config.vocab_size`` of the model given to :meth:`BatchSplitTrainStep.init`, if any.
        donate: donate the input state's buffers to the step.
        compiler_options: XLA options passed to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": 0}``
            to compile faster in CPU tests).

    Example::

        model = DecoderLM(DecoderConfig(vocab_size=V), rngs=nnx.Rngs(0))
        graphdef = nnx.split(model, nnx.Param, ...)[0]
        tx = optax.chain(advance_curriculum(), optax.adamw(3e-4))
        train_step = make_batch_split_train_step(graphdef, BatchSplitConfig(router_layers=2), tx)
        state = train_step.init(model)
        for ids in batches:
            state, metrics = train_step(state, ids, ids)
    """
    return BatchSplitTrainStep(graphdef, config, optimizer, mode=mode, buckets=buckets, vocab_size=vocab_size,
                               donate=donate, compiler_options=compiler_options)
