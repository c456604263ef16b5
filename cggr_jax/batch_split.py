r"""CGGR batch splitting in JAX (SPEC §9): a truncated router picks the hardest sequences of a batch, and only
those run the full model's forward and backward, inside one jit-compiled training step.

The scoring — :func:`cggr_jax.scorer.select_sequences` / :func:`cggr_jax.scorer.score_sequences` (the
counterpart of PyTorch's ``CGGRScorer``) — lives in :mod:`cggr_jax.scorer`; this module is the training step.

Training step (:func:`make_batch_split_train_step`)
----------------------------------------------------
One ``jax.jit``-compiled function ``(state, input_ids, labels, attention_mask) -> (state, metrics)``:

* the router is the model's own first ``router_layers`` blocks, final norm and head on
  ``stop_gradient(params)`` (no parameter copies, no gradient). On the **fused path** (default for a
  :class:`cggr_jax.models.DecoderLM`, ``config.router_path``) it stops at the final normed hidden states
  (``model.hidden_states(ids, mask, router_layers)``) and the head is scored block by block
  (:func:`cggr_jax.scorer.select_sequences_fused`), so the ``(B, T, V)`` float32 router logits are never
  materialised; on the
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
* ``selection="sampled"`` (SPEC §9.2): the kept sequences are a random draw (``k_seq`` expected, the realised
  count picks the bucket and is reported as ``sequences_selected``) and each kept row carries the loss weight
  ``ω_b = w_b / max(1, N_tok)`` (``w_b = 1/π_b``, ``N_tok`` the valid shifted targets of all eligible
  sequences; padding rows 0), so the loss ``Σ_b ω_b Σ_t ce_{b,t}`` is the Horvitz–Thompson estimate of the
  mean token cross-entropy of the whole batch's eligible sequences. ``sample_ess`` (in the curriculum's
  metrics) is the ESS of the kept sequences' ``w``;
* the gradient goes through ``optimizer`` — an optax transformation that must contain
  :func:`cggr_jax.integrations.advance_curriculum` (e.g. ``optax.chain(advance_curriculum(), optax.adamw(…))``)
  — and the curriculum step is read from the optimizer state with :func:`cggr_jax.integrations.current_step`,
  so checkpointing the optimizer state checkpoints the curriculum; the SPEC §10 metrics of the step are passed
  as ``cggr_metrics=`` and can be read back with :func:`cggr_jax.integrations.latest_metrics`.

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

A cheaper router (SPEC §9.3): ``BatchSplitConfig(router_prefix=P)`` runs the router on the first ``min(P, T)``
columns only, and ``router_positions=s`` (a stride) or ``router_samples=m`` (evenly spaced) score a subset of its
positions; on the fused path the head and the scoring run on the gathered hidden rows of those positions only.
The positions are static (they depend on ``T`` and the config), so they add no recompilation.

Buckets default to :func:`default_buckets` (``⌈B·f⌉`` for ``f ∈ {1/8, 1/4, 3/8, 1/2, 3/4, 1}``); ``B`` is
always added. More buckets waste less padding compute and cost more compile time (one model forward/backward
per bucket, compiled once).

Bad input: ``labels``/``attention_mask`` of another shape than ``input_ids``, non-2-D or non-integer
``input_ids``, ``seq_len < 2`` (no next-token target), or router logits whose vocabulary differs from the
model's (``vocab_size=``) raise :class:`ValueError`. A batch of one sequence is legal: it is kept whenever it
has an eligible target (``k_seq = 1``), so the step equals the standard step (plus the router's cost).
All-padding (or all-ignored) sequences are never eligible and never kept; a batch of only such sequences gives
loss 0 and zero gradients.

``scoring="excess"`` (SPEC §9.1): every call passes ``reference_nll=``, the reference model's loss per token
``(B, T)`` (aligned like the unshifted labels) or per sequence ``(B,)``; a missing one, one given with another
scoring, another shape or an integer dtype raises :class:`ValueError` before tracing. The modes without a
router check it but do not read it (as they do not read ``scoring``). A reference of each form is one trace.
"""
from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cggr import NUMERIC_METRIC_KEYS
from cggr.config import SAMPLED_SELECTIONS

from cggr_jax import causal_lm, curriculum, integrations, router, scorer, selection, utils
from cggr_jax.sequence_reference import check_sequence_reference
# The router paths the step takes (cggr_jax.router) and its configuration (with the scorer, cggr_jax.scorer).
from cggr_jax.router import ROUTER_MEMORY_BUDGET, ROUTER_PATHS
from cggr_jax.scorer import BatchSplitConfig
# The sequence selection of SPEC §9 lives in scorer.py; batch splitting re-exports it so that both packages'
# batch_split modules carry the same names (CONTRIBUTING.md).
from cggr_jax.scorer import select_sequences, sequence_difficulty
from cggr_jax.types import SequenceSelection

__all__ = [
    "select_sequences",
    "sequence_difficulty",
    "SequenceSelection",
    "BatchSplitConfig",
    "BatchSplitState",
    "BatchSplitTrainStep",
    "SEQUENCE_METRIC_KEYS",
    "ROUTER_PATHS",
    "ROUTER_MEMORY_BUDGET",
    "MODES",
    "default_buckets",
    "causal_lm_loss",
    "make_batch_split_train_step",
]

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


# ----------------------------------------------------------------------------------------------- checks
def _check_batch(input_ids: Any, labels: Any, attention_mask: Any) -> None:
    """Static checks of a ``(B, T)`` batch: 2-D integer ``input_ids`` with ``B ≥ 1`` and ``T ≥ 2``, then
    :func:`cggr_jax.scorer.check_labels_and_mask`."""
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
    scorer.check_labels_and_mask(tuple(shape), labels, attention_mask, "input_ids")


# ------------------------------------------------------------------------------------------------- loss
def causal_lm_loss(
    logits: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    *,
    ignore_index: int = utils.DEFAULT_CONFIG.ignore_index,
    weighted: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy ``Σ ce / max(1, count)`` over the valid shifted tokens and its count.

    ``ce_{b,t} = lse(z_{b,t}) − z_{b,t}[y_{b,t+1}]`` in float32. A pair is counted when
    ``labels[:, t+1] != ignore_index``, ``0 ≤ labels[:, t+1] < V``, ``attention_mask[:, t+1] != 0`` and
    ``weights[b] > 0`` (``weights`` ``(B,)`` excludes whole rows, e.g. a bucket's padding sequences). Excluded
    pairs read no target (index 0 is gathered) and get an exactly zero gradient; a non-finite excluded row
    cannot leak a NaN into the gradient because it is replaced by zeros first.

    ``weighted=True`` (SPEC §9.2, ``selection="sampled"``): the loss is ``Σ_{b,t} weights[b]·ce_{b,t}`` instead,
    the row weights already holding the normalisation (``w_b / max(1, N_tok)``); the count is unchanged.
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
    if weighted:
        if weights is None:
            raise ValueError("weights: weighted=True needs the (B,) row weights, got None")
        return jnp.sum(ce * weights.astype(jnp.float32)[:, None], dtype=jnp.float32), count
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
        #: ``None`` for the modes without a router or before either), and why
        #: (:func:`cggr_jax.router.resolve_router_path`).
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
        integrations.current_step(opt_state)  # raises ValueError when advance_curriculum() is missing
        layers = getattr(getattr(model, "config", None), "num_layers", None)
        if isinstance(layers, int) and not self.config.router_layers <= layers:
            raise ValueError(f"router_layers: expected an integer in [0, {layers}] (the model's layer count), "
                             f"got {self.config.router_layers}")
        if self.mode in ("cggr", "random_sequence_router"):
            # Eager, on the concrete model: the head-linearity rule is checked here, at first use.
            self.router_path, self.router_path_reason = router.resolve_router_path(model,
                                                                                   self.config.router_path)
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
        reference_nll: jax.Array | None = None,
    ) -> tuple[BatchSplitState, dict[str, jax.Array]]:
        _check_batch(input_ids, labels, attention_mask)
        # SPEC §9.1: required exactly with scoring='excess', per token (B, T) or per sequence (B,); checked
        # before tracing (a None and an array reference are two traces, an array of one shape one).
        reference_nll = check_sequence_reference(reference_nll, self.config.scoring, tuple(input_ids.shape))
        if self.vocab_size is not None:
            # SPEC §11 as in every entry point: concrete out-of-range labels raise here, before the jitted step
            # (under a trace the pair is not eligible and is counted in tokens_out_of_range instead).
            scorer.check_shifted_labels(labels, attention_mask, self.vocab_size, self.config.ignore_index)
        else:
            utils.check_label_dtype(labels.dtype, self.config.ignore_index, "labels")
        if not isinstance(state, BatchSplitState):
            raise ValueError(f"state: expected the BatchSplitState returned by init(), got {type(state).__name__}")
        return self._jitted(state, input_ids, labels, attention_mask, reference_nll)

    def bucket_sizes(self, batch_size: int) -> tuple[int, ...]:
        """The static gathered sizes used for batches of ``batch_size`` sequences."""
        return _resolve_buckets(self.buckets, batch_size)

    def _loss_and_grad(self, params: Any, rest: Any, ids: jax.Array, labels: jax.Array,
                       amask: jax.Array | None, weights: jax.Array | None,
                       weighted: bool = False) -> tuple[jax.Array, jax.Array, Any]:
        """``(loss, token count, d loss / d params)`` of :func:`causal_lm_loss` on the full model."""
        graphdef, ignore = self.graphdef, self.config.ignore_index

        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids, amask)
            return causal_lm_loss(logits, labels, amask, weights, ignore_index=ignore, weighted=weighted)

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, count, grads

    def route(self, params: Any, rest: Any, input_ids: jax.Array, labels: jax.Array,
              attention_mask: jax.Array | None, step: jax.Array,
              reference_nll: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """``(rank, k, metrics)`` of the kept sequences for the selecting modes (rank −1 = not eligible): the
        router's part of the step (traced inside it; public so that benchmarks can time the router alone).
        ``reference_nll``: SPEC §9.1 (checked like :meth:`__call__` does); the modes without a router
        (``"random_sequence"``) validate it but do not read it, as they do not read ``scoring``.

        ``selection="sampled"`` (SPEC §9.2, mode ``"cggr"``): ``rank`` numbers the drawn sequences ``0 … k−1`` in
        batch order (−1 for the others), ``k`` is the realised count, and ``metrics`` also holds
        ``"sequence_weights"`` (``(B,)`` float32 loss weights ``w_b / max(1, N_tok)``, 0 where not kept) and
        ``"sample_ess"``; the step takes both out of its own metrics."""
        cfg = self.config
        reference_nll = check_sequence_reference(reference_nll, cfg.scoring, tuple(input_ids.shape))
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
        path, self.router_path_reason = router.resolve_router_path(router_model, cfg.router_path)  # trace time
        self.router_path = path
        # SPEC §9.3: a prefix router reads the first R columns only (static); the scorers take its R columns.
        read = cfg.positions.read_length(input_ids.shape[1])
        ids_r = input_ids[:, :read]
        mask_r = None if attention_mask is None else attention_mask[:, :read]
        if path == "fused":
            hidden = router_model.hidden_states(ids_r, mask_r, cfg.router_layers)
            weight, layout = causal_lm.head_weight(router_model)
            sel = scorer.select_sequences_fused(hidden, weight, labels, attention_mask, step=step, config=cfg,
                                                vocab_size=self.vocab_size, weight_layout=layout,
                                                reference_nll=reference_nll)
        else:
            router_logits = router_model.router_logits(ids_r, cfg.router_layers, mask_r)
            sel = scorer.select_sequences(jax.lax.stop_gradient(router_logits), labels, attention_mask,
                                          step=step, config=cfg, vocab_size=self.vocab_size,
                                          reference_nll=reference_nll)
        rank = sel.rank
        if self.mode == "random_sequence_router":
            rank = selection.rank_tokens(jax.random.uniform(key, (B,), dtype=jnp.float32), sel.eligible)
        k = sel.k
        extra: dict[str, jax.Array] = {}
        if self.mode == "cggr" and cfg.config.selection in SAMPLED_SELECTIONS:
            # SPEC §9.2: the same draw as sel.mask (same D, ratio, step), plus its 1/π weights.
            c = cfg.config
            drawn, w, _ = selection.sample_tokens(sel.difficulty, sel.eligible, sel.ratio, step=step,
                                                  seed=c.sample_seed, power=c.sample_power,
                                                  uniform_mix=c.sample_uniform_mix, floor=c.sample_floor)
            valid = _shifted_valid(labels, attention_mask, cfg.ignore_index)
            if self.vocab_size is not None:   # an out-of-range (traced) target has no cross-entropy
                valid = valid & utils.target_masks(labels[:, 1:], self.vocab_size, cfg.ignore_index)[1]
            n_tok = jnp.sum(valid & sel.eligible[:, None], dtype=jnp.int32)
            k = jnp.sum(drawn, dtype=jnp.int32)
            rank = jnp.where(drawn, jnp.cumsum(drawn.astype(jnp.int32)) - 1, -1).astype(jnp.int32)
            w_sum, w_sq = jnp.sum(w), jnp.sum(w * w)
            extra = {"sequence_weights": w / jnp.maximum(n_tok, 1).astype(jnp.float32),
                     "sample_ess": jnp.where(w_sq > 0, w_sum * w_sum / jnp.where(w_sq > 0, w_sq, 1.0), zero_f)}
        kept = (rank >= 0) & (rank < k)
        n_kept = jnp.sum(kept, dtype=jnp.int32)
        info = scorer.selection_info(sel)
        metrics = {
            "token_ratio": sel.base_ratio, "effective_ratio": sel.ratio, "sequences_total": info["n"],
            "tokens_total": info["tokens_total"], "tokens_nonfinite": info["tokens_nonfinite"],
            "tokens_out_of_range": info["tokens_out_of_range"], "avg_confidence": info["avg_confidence"],
            "avg_entropy": info["avg_entropy"], "avg_difficulty": info["avg_difficulty"],
            "avg_sequence_difficulty_selected": jnp.where(
                n_kept > 0,
                jnp.sum(jnp.where(kept, sel.difficulty, 0.0)) / jnp.maximum(n_kept, 1).astype(jnp.float32),
                zero_f),
            **extra,
        }
        return rank, k, metrics

    def _step(self, state: BatchSplitState, input_ids: jax.Array, labels: jax.Array,
              attention_mask: jax.Array | None,
              reference_nll: jax.Array | None) -> tuple[BatchSplitState, dict[str, jax.Array]]:
        self.num_traces += 1  # runs at trace time only: counts compilations
        params, rest, opt_state = state
        B = input_ids.shape[0]
        step = integrations.current_step(opt_state)
        zero_f, zero_i = jnp.float32(0.0), jnp.int32(0)
        sample_ess = None

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
            rank, k, route_metrics = self.route(params, rest, input_ids, labels, attention_mask, step,
                                                reference_nll)
            seq_weights = route_metrics.pop("sequence_weights", None)   # SPEC §9.2 (sampled)
            sample_ess = route_metrics.pop("sample_ess", None)
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
                    if seq_weights is None:
                        weights = (jnp.arange(b, dtype=jnp.int32) < k).astype(jnp.float32)
                    else:   # the drawn rows come first; the others (padding) have weight 0
                        weights = jnp.take(seq_weights, idx, axis=0)
                    sub_mask = None if attention_mask is None else jnp.take(attention_mask, idx, axis=0)
                    return self._loss_and_grad(params, rest, jnp.take(input_ids, idx, axis=0),
                                               jnp.take(labels, idx, axis=0), sub_mask, weights,
                                               weighted=seq_weights is not None)
                return run

            loss, count, grads = jax.lax.switch(branch, [zero_branch] + [make_branch(b) for b in sizes], None)
            metrics = {"loss": loss, "step": step, "sequences_selected": k, "bucket_size": bounds[branch],
                       "tokens_selected": count, **route_metrics}

        # The SPEC §10 subset of the metrics goes to the curriculum state (``integrations.latest_metrics``).
        if self.mode == "standard" or sample_ess is None:   # SPEC §10: an unweighted selection's ESS is its count
            sample_ess = metrics["tokens_selected"].astype(jnp.float32)
        cggr_metrics = {key: metrics[key] if key != "sample_ess" else sample_ess for key in NUMERIC_METRIC_KEYS}
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
        optimizer: an optax transformation containing :func:`cggr_jax.integrations.advance_curriculum`, e.g.
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
