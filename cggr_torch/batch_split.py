"""Batch splitting: ``CGGRModel`` runs the full model only on the hardest sequences of each batch (SPEC §9).

One training step of ``CGGRModel(model)(input_ids, labels, attention_mask)``:

1. **Router pass** (``torch.no_grad()``): a cheap router (default: the model's first 4 layers sharing its
   weights, :func:`~cggr_torch.router.create_truncated_router`). On the **fused path** (the default whenever
   the router is a truncated router whose LM head is a plain linear map by the numeric rule of
   :func:`cggr_torch.router.check_linear_head`: no logit scaling, capping or soft-capping) it
   runs to its final normed hidden states and the head's logits are scored block by block
   (:func:`cggr_torch.fused_linear.fused_linear_scores`: row-chunked matmul + the Triton scoring kernel), so
   the ``(B, T, V)`` router logits never exist; otherwise (**logits path**: arbitrary router modules,
   passthrough routers, masked LMs, soft-capped heads) the router's logits are materialised and scored.
   ``get_metrics()['router_path']`` says which path ran and :attr:`CGGRModel.router_path_reason` why.
2. **Token scores**: causal shift (``logits[:, t]`` against ``labels[:, t+1]``,
   :func:`~cggr_torch.utils.shift_for_causal_lm`), SPEC §2-§4 per token; a target is ignored when it equals
   ``ignore_index`` or its position is padding (``attention_mask == 0``).
3. **Sequence difficulty** ``D_b = Σ_{t eligible} d_{b,t} / n_b`` (float32), ``n_b`` the eligible tokens of
   sequence ``b``; a sequence with ``n_b = 0`` is not eligible. ``n_seq`` = eligible sequences.
   With ``scoring='excess'`` (SPEC §9.1) the router scores ``nll`` and the caller's ``reference_nll`` (per token
   ``(B, T)`` aligned like the labels, or per sequence ``(B,)``) is subtracted first
   (:mod:`cggr_torch.sequence_reference`); a non-finite reference makes its tokens not eligible.
4. **How many**: ``ratio`` = SPEC §5 at the current step (curriculum, then the dynamic threshold with ``c̄`` the
   mean confidence over *all* eligible tokens of the batch); ``k_seq = num_selected(n_seq, ratio)`` (§5.3:
   ``k_seq = 0`` iff ``n_seq = 0``, else ``min(n_seq, max(1, round(ratio·n_seq)))``).
5. **Which**: the ``k_seq`` eligible sequences of highest ``D_b`` (§6 order: ``D`` descending, lower batch index
   first), kept in their original batch order. With ``selection='sampled'`` (SPEC §9.2) instead a random draw:
   sequence ``b`` is kept iff ``uniform_hash(sample_seed, step, b) < π_b`` (the §7.4 probabilities of the
   ``D_b`` with ``k_seq`` expected sequences, :func:`cggr_torch.selection.sample_tokens` on the ``(B,)``
   difficulties) and weighted ``w_b = 1/π_b``.
6. **Main pass**: ``input_ids``, ``labels``, ``attention_mask`` and every per-sequence keyword argument (a tensor
   whose first dimension is ``B``) are sliced to the kept rows; the model runs forward on them with
   ``labels`` (ignored positions set to ``-100``) and its own loss, the mean token cross-entropy over their
   valid shifted targets, is returned; a model that returns only logits gets that loss computed here
   (float32). Backward therefore costs ``k_seq / B`` of a full batch. With ``selection='sampled'`` the loss is
   the Horvitz–Thompson estimate ``Σ_{b kept} w_b · Σ_t ce_{b,t} / max(1, N_tok)`` (``N_tok``: the valid
   shifted targets of all eligible sequences), computed here from the kept rows' logits (a model's own
   ``.loss`` cannot take per-sequence weights, so the model gets no ``labels``); its expectation over the
   draws is the mean token cross-entropy of the whole batch's eligible sequences.

**Synchronisation.** Steps 1-5 run asynchronously on the device. Everything else (shape checks, curriculum) is
host-only, target range checks on CUDA are device-side assertions, and the metrics stay on the device until
:meth:`CGGRModel.get_metrics`. The main pass's number of rows must be a host number (PyTorch sizes tensors on
the host); ``kept_rows`` (SPEC §9.4) says where it comes from. ``'exact'``: slicing to the kept rows needs
``k_seq`` on the host, so ``torch.nonzero`` of the keep-mask is the step's one host synchronisation (the
curriculum's base ratio is a host number already, but the dynamic threshold's mean confidence is not).
``'bound'``: the main pass runs on ``k_max`` rows (:meth:`CGGRModel.kept_rows_bound`, an upper bound of
``k_seq`` computed from ``B``, the host step's ratio and, with the dynamic threshold, its largest value
``min(1, base·(1+σ))``): the kept rows first, then copies of the first kept row with no target, so the step has
no host synchronisation at all; the loss, gradients and metrics are those of ``'exact'``. ``'auto'`` (default)
takes ``'bound'`` where it costs no extra rows (no dynamic threshold, not ``sampled``). With **buckets**
(SPEC §9.4; the default ``'auto'`` for a compiled model) the kept rows are padded to a static size with copies
of the first kept row carrying no loss and no gradient, so a ``torch.compile``d model compiles at most once per
bucket as ``k_seq`` moves. **Cheaper routers** (SPEC §9.3): ``router_prefix``, ``router_positions`` (a stride)
and ``router_samples`` make the router read fewer columns and score fewer positions.

**Documented edge cases.**

* ``B = 1``: the single sequence is kept whenever it has an eligible token (``k_seq = max(1, ·)``), so the step
  equals a standard step plus the router's cost.
* A sequence that is all padding / all ``ignore_index`` (or whose router rows are all non-finite) is never kept.
  If no sequence is eligible (e.g. an all-padding batch, or ``T = 1``) the loss is a float32 ``0.0``: with
  ``kept_rows='exact'`` the main model does not run and the loss is a leaf tensor with ``requires_grad=True``
  (``backward()`` works and leaves every gradient untouched; under DistributedDataParallel that rank skips the
  model's forward, so avoid all-padding batches there); with ``'bound'`` the main pass still runs on its
  ``k_max`` rows (copies of row 0, every position attended, every target 0, so the model's own loss is finite)
  and the loss is ``torch.where(k = 0, 0, ·)``: exactly 0 with exactly-zero gradients.
* The router pass uses the model's current train/eval mode (dropout included), since it shares its modules.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from cggr import DEFAULT_SEQUENCE_SELECTION, METRIC_KEYS, SEQUENCE_SELECTIONS, CGGRConfig
from cggr.config import ROUTER_POSITIONS_ALL, SAMPLED_SELECTIONS, RouterPositions

from .curriculum import Curriculum, Schedule, num_selected
from .loss import check_schedule
from .main_pass import (
    HF_IGNORE_INDEX,
    check_buckets,
    default_buckets,
    effective_labels,
    forward_parameters,
    is_compiled_module,
    next_token_loss,
    output_logits,
    output_loss,
    weighted_next_token_loss,
)
from .pipeline import effective_ratio, eligible_mean, host_metrics
from .router import (
    ROUTER_INPUT_KEYS,
    ROUTER_MEMORY_BUDGET,
    ROUTER_PATHS,
    PassthroughRouter,
    TruncatedRouter,
    create_truncated_router,
    is_masked_lm,
    model_vocab_size,
    resolve_router_path,
)
from .scorer import (
    check_budget,
    reference_sequence_difficulty,
    router_token_scores,
    scored_index,
    select_sequences,
    sequence_difficulty,
    sequence_selection,
)
from .selection import sample_tokens, select_tokens
from .sequence_reference import check_sequence_reference, router_scoring
from .types import SequenceSelection, TokenScores
from .utils import check_batch, resolve_config, widen_labels

__all__ = ["CGGRModel", "BatchSplitOutput", "SEQUENCE_SELECTIONS", "MODEL_METRIC_KEYS", "SequenceSelection",
           "select_sequences", "sequence_difficulty", "effective_labels", "HF_IGNORE_INDEX", "default_buckets",
           "is_compiled_module"]

#: Keys of :meth:`CGGRModel.get_metrics`: SPEC §10 plus the sequence counts and the router path used
#: (``'fused'`` or ``'logits'``, a string like ``selection``/``scoring``).
MODEL_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS + ("sequences_selected", "sequences_total", "router_path")


class BatchSplitOutput(NamedTuple):
    """Result of :meth:`CGGRModel.forward_with`.

    ``loss``: mean cross-entropy over the kept sequences' valid targets (0-d); ``outputs``: the main model's
    output on the kept sequences (None when none was kept); ``kept``: int64 batch indices of the kept
    sequences, ascending; ``sequence_difficulty``: float32 ``(B,)`` ``D_b`` (0 where not eligible);
    ``sequence_eligible``: bool ``(B,)``; ``num_kept``: 0-d int64 device tensor, the number of kept sequences.
    With ``kept_rows='bound'`` (SPEC §9.4) ``kept`` has the host-known length ``k_max``
    (:meth:`CGGRModel.kept_rows_bound`): the kept indices ascending, then ``B`` (an out-of-range index) in the
    ``k_max − num_kept`` unused slots, and ``outputs`` is never None (the main pass always runs).
    """

    loss: torch.Tensor
    outputs: Any
    kept: torch.Tensor
    sequence_difficulty: torch.Tensor
    sequence_eligible: torch.Tensor
    num_kept: Optional[torch.Tensor] = None


#: ``CGGRModel(kept_rows=…)`` (SPEC §9.4): how the main pass learns its number of rows.
KEPT_ROWS: tuple[str, ...] = ("auto", "exact", "bound")


def _bound_rows(keep: torch.Tensor, num_kept: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §9.4 ``kept_rows='bound'``: ``size`` row indices of a ``(B,)`` keep-mask without reading it on the
    host: the kept rows in ascending batch order, then copies of the first kept row (of row 0 when none is
    kept); and the bool ``(size,)`` mask of the slots holding a kept row. ``size <= B``."""
    idx = torch.arange(keep.shape[0], device=keep.device)
    order = torch.argsort(torch.where(keep, idx, idx + keep.shape[0]))   # distinct keys: kept rows first
    real = torch.arange(size, device=keep.device) < num_kept
    return torch.where(real, order[:size], order[:1].expand(size)), real


def _shares_all_weights(router: nn.Module, model: nn.Module) -> bool:
    """True when every parameter and buffer of ``router`` is (the same object as) one of ``model``'s."""
    owned = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    return all(id(t) in owned for t in router.parameters()) and all(id(t) in owned for t in router.buffers())


class _Route(NamedTuple):
    """Everything the router pass of one step produced (device tensors, plus the host path and base ratio)."""

    path: str
    scores: TokenScores
    nonfinite: torch.Tensor
    n: torch.Tensor
    mean_conf: torch.Tensor
    base: Any
    ratio: torch.Tensor
    seq_d: torch.Tensor
    seq_elig: torch.Tensor
    keep: torch.Tensor
    k_seq: torch.Tensor
    weights: Optional[torch.Tensor]   # SPEC §9.2: (B,) float32 1/π_b of the kept sequences (sampled only)


class CGGRModel(Curriculum, nn.Module):
    """Batch splitting (SPEC §9): score with a cheap router, train the full model on the hardest sequences.

    See the module docstring for the algorithm, the single host synchronisation and the edge cases.

    Usage (everything after ``router`` is keyword-only, so no positional order can differ from ``CGGRLoss``'s)::

        cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=1000)
        loss = cggr(input_ids, labels=labels, attention_mask=attention_mask)
        loss.backward(); optimizer.step(); optimizer.zero_grad(); cggr.step()

    Args:
        model: the model to train (a Hugging Face ``…ForCausalLM``, or any module whose forward accepts
            ``input_ids``, ``attention_mask``, ``labels`` and per-sequence keyword arguments and returns its
            mean token cross-entropy as ``.loss`` / ``['loss']`` / a 0-d first tuple element, ignoring label
            ``-100`` and shifting internally when it is causal). A model that returns only logits (a
            ``(B, T, V)`` tensor, or an output with ``.logits`` and no loss, e.g. ``forward(self, input_ids)``)
            works too: ``CGGRModel`` then computes the mean float32 next-token cross-entropy of the kept rows
            itself (float32, SPEC §9 targets) and puts it into the output's ``loss`` field where
            it has one. ``labels`` / ``attention_mask`` go to the model only when its forward accepts them.
        router: a module ``(input_ids, attention_mask=..., **kw) -> (B, T, V)`` logits (or an output with
            ``.logits``) over the model's vocabulary. ``None``: ``create_truncated_router(model, router_layers)``.
            A router whose weights all belong to ``model`` (a truncated or passthrough router of ``model``, or
            any router built from its modules) is held by reference and *not* registered as a sub-module, so
            ``parameters()``/``state_dict()`` list each weight once; an independent router is registered as
            ``router`` (a truncated router of *another* model registers that model as ``router_model``).
        scoring: SPEC §3 difficulty (``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'``, or ``'excess'``
            with a ``reference_nll`` at every call, SPEC §9.1).
        min_tokens_ratio, warmup_steps: the curriculum of SPEC §5.1 (``0 < min_tokens_ratio <= 1``,
            ``warmup_steps >= 0``).
        dynamic_threshold, threshold_sensitivity: SPEC §5.2.
        selection: ``'topk'`` (default), ``'fixed_quota'`` (topk with the dynamic threshold off) or ``'sampled'``
            (SPEC §9.2: sequences drawn with probabilities ``π_b``, loss weighted by ``1/π_b``; the model must
            return logits). The token strategies ``'stratified'`` and ``'sequence_aware'`` are a
            ``ValueError`` at sequence level (§9).
        sample_power, sample_uniform_mix, sample_floor, sample_seed: SPEC §7.4's parameters of ``'sampled'``
            (``cggr.CGGRConfig``'s ``sample_*`` fields), applied to the sequence difficulties (§9.2).
        num_strata, min_tokens_per_sequence: validated as in ``CGGRLoss`` (§5.1) for a uniform constructor,
            but unused: they parametrise token strategies that do not apply to sequences.
        ignore_index: label value without a target (also every padding position is ignored).
        ratio_schedule: optional ``step -> ratio in (0, 1]`` replacing the linear warm-up.
        config: a ready :class:`cggr.CGGRConfig` instead of the settings (stored as ``.config``; checked with
            :meth:`cggr.CGGRConfig.for_sequences`).
        router_layers: layers of the default router (``router=None`` only).
        shift_labels: ``None`` = shift (causal LM) unless the model is a masked LM (no shift).
        router_batch_size: run the router and the scoring on chunks of this many sequences (bounds the memory
            of the ``(B, T, V)`` router logits on the logits path); ``None`` (default) = the whole batch at once,
            the fastest (the fused path never holds the full logits anyway).
        router_path: ``'auto'`` (default: ``'fused'`` when possible, else ``'logits'``), ``'fused'`` (a
            ``ValueError`` naming the reason when the router cannot take it) or ``'logits'``; see
            :func:`cggr_torch.router.resolve_router_path`.
        router_memory_budget_bytes: working memory of the fused path's logit blocks (default 1 GiB; the router
            pass runs before the main pass, so this does not raise the step's peak memory).
        router_positions, router_samples, router_prefix: SPEC §9.3, a cheaper router: score every
            ``router_positions``-th position (``'all'``: every one) or ``router_samples`` evenly spaced ones, of
            the first ``router_prefix`` columns (``None``: all), the sequence difficulty being the mean over the
            eligible scored positions; on the fused path the head runs on the scored rows only. Defaults: the
            router's own ``.positions`` (``create_truncated_router(..., router_samples=64)``), else every
            position; a router built with other non-default settings is a ``ValueError``.
        router_compile: the default router's layers under ``torch.compile``: ``False`` (default, eager),
            ``True`` or a dict of ``torch.compile`` keyword arguments (``{"mode": "reduce-overhead"}``: CUDA
            graphs); see :func:`cggr_torch.router.create_truncated_router`. Off by default (compile time, and
            one compile per distinct router input shape).
        buckets: SPEC §9.4, the main pass's batch sizes: ``'auto'`` (default: :func:`default_buckets` when
            ``model`` is compiled, :func:`is_compiled_module`, else exact slicing), ``None`` (exact slicing:
            ``k`` rows), a sequence of sizes in ``[1, B]`` (``B`` is added) or a callable ``B -> sizes``. The kept
            rows are padded to the smallest size ``>= k`` with copies of the first kept row that carry no loss
            and no gradient, so a compiled model sees at most ``len(buckets)`` shapes (one compile each).
            ``BatchSplitOutput.outputs`` then holds the padded batch, its first ``k`` rows the kept ones. A model
            that couples the rows of a batch (an MoE load-balancing loss, expert capacity) sees the copies too:
            pass ``buckets=None`` for it.
        kept_rows: SPEC §9.4, how the main pass learns its number of rows: ``'exact'`` (the kept count, read on
            the host: one host synchronisation per step), ``'bound'`` (``k_max`` rows,
            :meth:`kept_rows_bound`, no host synchronisation; the rows beyond the kept count are copies of the
            first kept row with no target, so loss, gradients and metrics are unchanged, at the cost of up to
            ``(1+σ)×`` the kept rows with the dynamic threshold, ``B`` rows with ``'sampled'``) or ``'auto'``
            (default: ``'bound'`` when the bound is the count of a fully eligible batch, i.e. no dynamic
            threshold and not ``'sampled'``; else ``'exact'``; :meth:`kept_rows_mode`). With buckets the main
            pass has the bucket of ``k_max`` rows. The padding rows couple into a model that couples its rows
            (as buckets do): use ``'exact'`` with ``buckets=None`` there.
    """

    def __init__(self, model: nn.Module, router: Optional[nn.Module] = None, *, scoring: str = CGGRConfig.scoring,
                 selection: str = DEFAULT_SEQUENCE_SELECTION,
                 dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                 threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                 min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
                 num_strata: int = CGGRConfig.num_strata,
                 min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                 ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None,
                 router_layers: int = 4, shift_labels: Optional[bool] = None,
                 router_batch_size: Optional[int] = None, router_path: str = "auto",
                 router_memory_budget_bytes: int = ROUTER_MEMORY_BUDGET,
                 sample_power: float = CGGRConfig.sample_power,
                 sample_uniform_mix: float = CGGRConfig.sample_uniform_mix,
                 sample_floor: float = CGGRConfig.sample_floor, sample_seed: int = CGGRConfig.sample_seed,
                 router_positions: Any = ROUTER_POSITIONS_ALL, router_samples: Optional[int] = None,
                 router_prefix: Optional[int] = None, router_compile: Any = False, buckets: Any = "auto",
                 kept_rows: str = "auto", config: Optional[CGGRConfig] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.config = resolve_config(config, dict(
            scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence,
            ignore_index=ignore_index, sample_power=sample_power, sample_uniform_mix=sample_uniform_mix,
            sample_floor=sample_floor, sample_seed=sample_seed),
            CGGRConfig(selection=DEFAULT_SEQUENCE_SELECTION)).for_sequences()
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise ValueError(f"shift_labels: expected None or a bool, got {shift_labels!r}")
        if router_batch_size is not None and (not isinstance(router_batch_size, numbers.Integral)
                                              or isinstance(router_batch_size, bool) or router_batch_size < 1):
            raise ValueError(f"router_batch_size: expected None or an integer >= 1, got {router_batch_size!r}")
        check_budget(router_memory_budget_bytes)
        if router_path not in ROUTER_PATHS:
            raise ValueError(f"router_path: expected one of {ROUTER_PATHS}, got {router_path!r}")
        self.model = model
        own = RouterPositions(router_positions, router_samples, router_prefix)   # validated (SPEC §9.3)
        self.buckets = check_buckets(buckets)
        if not isinstance(kept_rows, str) or kept_rows not in KEPT_ROWS:
            raise ValueError(f"kept_rows: expected one of {KEPT_ROWS}, got {kept_rows!r}")
        self.kept_rows = kept_rows
        if router is None:
            # The caller's argument is router_layers: its errors must say so, not num_layers.
            if not isinstance(router_layers, numbers.Integral) or isinstance(router_layers, bool) \
                    or router_layers < 1:
                raise ValueError(f"router_layers: expected an integer >= 1, got {router_layers!r}")
            try:
                router = create_truncated_router(model, router_layers, router_positions=own.router_positions,
                                                 router_samples=own.router_samples, router_prefix=own.router_prefix,
                                                 router_compile=router_compile)
            except ValueError as err:
                raise ValueError(str(err).replace("num_layers:", "router_layers:", 1)) from err
        elif router_compile is not False:
            raise ValueError("router_compile: applies to the default router (router=None); build a router with "
                             "create_truncated_router(model, n, router_compile=...) or pass torch.compile(router)")
        if not callable(router):
            raise ValueError(f"router: expected a module returning (B, T, V) logits, got {type(router).__name__}")
        # The router's own settings (create_truncated_router's), also through a torch.compile wrapper.
        built = getattr(router, "positions", None)
        built = built if isinstance(built, RouterPositions) else None
        if built is not None and not built.is_full and not own.is_full and built != own:
            raise ValueError(f"router_positions/router_samples/router_prefix: the router was built with {built} "
                             f"and CGGRModel was given {own}; set them in one place")
        #: SPEC §9.3: the positions the router reads and scores (a :class:`cggr.config.RouterPositions`).
        self.positions = built if own.is_full and built is not None else own
        if isinstance(router, (TruncatedRouter, PassthroughRouter)):
            object.__setattr__(self, "router", router)
            if router.source is not model:
                self.router_model = router.source
        elif isinstance(router, nn.Module) and not _shares_all_weights(router, model):
            self.router = router
        else:
            object.__setattr__(self, "router", router)
        self.shift_labels = (not is_masked_lm(model)) if shift_labels is None else shift_labels
        self.router_batch_size = None if router_batch_size is None else int(router_batch_size)
        self.vocab_size = model_vocab_size(model)
        self.router_path = router_path
        self.router_memory_budget_bytes = int(router_memory_budget_bytes)
        #: Why the last (or, before the first forward, the next) router pass takes its path.
        self.router_path_reason = resolve_router_path(router, router_path)[1]
        self._init_curriculum(self.config.min_tokens_ratio, self.config.warmup_steps,
                              check_schedule(ratio_schedule, self.config))
        self._forward_params = forward_parameters(model)
        self._last: Optional[dict[str, Any]] = None
        self.last_kept: Optional[torch.Tensor] = None
        #: The last forward's kept count, a 0-d int64 device tensor (read it outside the hot path).
        self.last_num_kept: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor],
               kwargs: dict[str, Any], reference_nll: Optional[torch.Tensor]) -> _Route:
        """Steps 1-5 of the module docstring under ``no_grad``: router pass, scores, ratio, keep-mask. Async.
        ``reference_nll`` as returned by :func:`check_sequence_reference` (SPEC §9.1)."""
        router_kwargs = {k: kwargs[k] for k in ROUTER_INPUT_KEYS if kwargs.get(k) is not None}
        path, self.router_path_reason = resolve_router_path(self.router, self.router_path)  # host only
        with torch.no_grad():
            scores, nonfinite = router_token_scores(
                self.router, path, input_ids, labels, attention_mask, router_kwargs,
                scoring=router_scoring(self.scoring), ignore_index=self.ignore_index, shift=self.shift_labels,
                vocab_size=self.vocab_size, batch_chunk=self.router_batch_size,
                memory_budget_bytes=self.router_memory_budget_bytes, positions=self.positions)
            index = scored_index(self.positions, input_ids.shape[1], shift=self.shift_labels,
                                 device=input_ids.device)
            scores, seq_d, seq_elig = reference_sequence_difficulty(scores, reference_nll, self.shift_labels,
                                                                     None if index is None else index[1])
            elig = scores.eligible
            if reference_nll is not None:   # SPEC §3.1: a non-finite reference counts as a non-finite token
                nonfinite = (scores.valid & ~elig).sum()
            n = elig.sum()
            mean_conf = eligible_mean(scores.stats.confidence, elig, n)
            base = self.base_ratio()
            ratio = effective_ratio(base, mean_conf, self.config)
            weights = None
            cfg = self.config
            if cfg.selection in SAMPLED_SELECTIONS:
                # SPEC §9.2: §7.4 over the (B,) sequence difficulties, so the draw's index is the batch index.
                keep, weights, k_seq = sample_tokens(
                    seq_d, seq_elig, ratio, step=self._step, seed=cfg.sample_seed, power=cfg.sample_power,
                    uniform_mix=cfg.sample_uniform_mix, floor=cfg.sample_floor)
            else:
                keep, k_seq = select_tokens(seq_d, seq_elig, ratio, selection="topk")
        return _Route(path, scores, nonfinite, n, mean_conf, base, ratio, seq_d, seq_elig, keep, k_seq, weights)

    def select(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               *, reference_nll: Optional[torch.Tensor] = None, **kwargs: Any) -> SequenceSelection:
        """The router pass and sequence selection of one batch alone (no main pass, no host synchronisation,
        no metrics recorded): the sequences :meth:`forward` would keep at the current step. Used to time the
        router separately (``benchmarks/bench_batch_split_torch.py``) and to compare router paths. ``reference_nll``
        as in :meth:`forward`."""
        check_batch(input_ids, labels, attention_mask)
        reference_nll = check_sequence_reference(reference_nll, self.scoring, tuple(input_ids.shape),
                                                 device=input_ids.device)
        labels = widen_labels(labels, self.config.ignore_index, name="labels")
        r = self._route(input_ids, labels, attention_mask, kwargs, reference_nll)
        return sequence_selection(r.scores, r.seq_d, r.seq_elig, r.keep, r.k_seq, r.ratio, r.base)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *, reference_nll: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """Batch-split training loss (0-d tensor) of ``(input_ids, labels)`` ``(B, T)``; see the module docs.

        ``kwargs`` go to the main model; tensors whose first dimension is ``B`` are sliced with the batch
        (``position_ids`` of shape ``(1, T)`` and non-tensors pass unchanged). ``position_ids`` and
        ``token_type_ids`` also go to the router.

        ``reference_nll`` (``scoring='excess'`` only, and required there; never passed to the model): the
        reference model's loss, per token ``(B, T)`` aligned like the unshifted ``labels`` (shifted with them)
        or per sequence ``(B,)`` (SPEC §9.1); a floating tensor on the device of ``input_ids``. A batch key
        ``reference_nll`` of the Hugging Face ``Trainer`` arrives here.

        Raises:
            ValueError: ``input_ids`` not 2-D integer, ``labels``/``attention_mask`` of another shape, labels
                out of ``[0, V)`` (CPU; a device assertion on CUDA), a router whose logits are not
                ``(B, T, V_model)``, a model that returns neither a loss nor ``(k, T, V_model)`` logits, or a
                ``reference_nll`` missing with ``scoring='excess'``, given with another scoring, of another shape
                than ``(B, T)`` / ``(B,)``, not floating or on another device.
        """
        return self.forward_with(self.model, input_ids, labels, attention_mask, reference_nll=reference_nll,
                                 **kwargs).loss

    def forward_with(self, model: Callable[..., Any], input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None, *, reference_nll: Optional[torch.Tensor] = None,
                     **kwargs: Any) -> BatchSplitOutput:
        """:meth:`forward` with ``model`` as the main pass (e.g. a DDP / accelerate wrapper of ``self.model``,
        as the Hugging Face ``Trainer`` hands it to ``compute_loss``); returns a :class:`BatchSplitOutput`.
        ``reference_nll`` as in :meth:`forward` (checked before the router runs)."""
        check_batch(input_ids, labels, attention_mask)
        reference_nll = check_sequence_reference(reference_nll, self.scoring, tuple(input_ids.shape),
                                                 device=input_ids.device)
        labels = widen_labels(labels, self.config.ignore_index, name="labels")
        B = input_ids.shape[0]
        r = self._route(input_ids, labels, attention_mask, kwargs, reference_nll)
        scores, elig, n, seq_elig = r.scores, r.scores.eligible, r.n, r.seq_elig
        sizes = self.bucket_sizes(B, model)
        bound = self.kept_rows_mode() == "bound"
        if bound:
            # SPEC §9.4 kept_rows='bound': no host synchronisation. The main pass has a host-known number of
            # rows (the bucket of the bound k_max); `real` marks the slots holding the realised kept rows.
            k_max = self.kept_rows_bound(B)
            size = k_max if sizes is None else min(b for b in sizes if b >= k_max)
            num_kept_t = r.keep.sum()
            rows, real = _bound_rows(r.keep, num_kept_t, size)
            kept = torch.where(real[:k_max], rows[:k_max], torch.full_like(rows[:k_max], B))
            num_kept: Any = num_kept_t
        else:
            kept = torch.nonzero(r.keep).reshape(-1)   # the step's one host synchronisation (dynamic slice size)
            num_kept = int(kept.numel())
            num_kept_t = torch.full((), num_kept, dtype=torch.int64, device=input_ids.device)
            # SPEC §9.4: pad the kept rows to a static bucket size with copies of the first kept row (no loss,
            # no gradient), so that a compiled model sees a bounded number of batch shapes.
            rows = kept
            if sizes is not None and num_kept > 0:
                size = min(b for b in sizes if b >= num_kept)
                if size > num_kept:
                    rows = torch.cat([kept, kept[:1].expand(size - num_kept)])
        sampled = r.weights is not None
        if sampled:
            # SPEC §9.2: the HT denominator N_tok = valid shifted targets of all eligible sequences (device).
            eff_all = effective_labels(labels, attention_mask, self.ignore_index)
            scored_all = eff_all[:, 1:] if self.shift_labels else eff_all
            n_tok = ((scored_all != HF_IGNORE_INDEX) & seq_elig[:, None]).sum()
            zero_f = torch.zeros((), dtype=torch.float32, device=input_ids.device)
            if bound:   # the same sums over the keep-mask, 0 when none is kept (no host branch)
                w_kept = torch.where(r.keep, r.weights, zero_f)
                w_sq = (w_kept * w_kept).sum()
                sample_ess = torch.where(w_sq > 0, w_kept.sum() ** 2 / torch.where(w_sq > 0, w_sq, 1.0), zero_f)
            else:
                w_kept = r.weights.index_select(0, kept)
                # SPEC §10: (Σw)² / Σw² over the kept sequences (w ≥ 1, so Σw² > 0 whenever one is kept).
                sample_ess = w_kept.sum() ** 2 / (w_kept * w_kept).sum() if num_kept > 0 else zero_f
        if not bound and num_kept == 0:
            loss = torch.zeros((), dtype=torch.float32, device=input_ids.device, requires_grad=True)
            outputs = None
            tokens_selected = torch.zeros((), dtype=torch.int64, device=input_ids.device)
        else:
            if not bound:   # the slots holding kept rows; the rest is bucket padding (host-known here)
                real = torch.arange(rows.shape[0], device=rows.device) < num_kept
            # kept_rows='bound' with no kept row (n_seq = 0): the main pass still runs (its shape is static), on
            # copies of row 0 with every position attended and every target 0, so that the model's own loss is
            # finite; the step's loss is then replaced by an exact 0, whose gradient is 0 (SPEC §9.4).
            empty = (num_kept_t == 0) if bound else None

            def take(t: Any) -> Any:
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == B:
                    return t.index_select(0, rows)
                return t

            am_k = None if attention_mask is None else attention_mask.index_select(0, rows)
            with torch.no_grad():   # only the kept rows' labels are needed
                eff_k = effective_labels(labels.index_select(0, rows), am_k, self.ignore_index).to(torch.int64)
                # bucket / bound padding (SPEC §9.4): no target, no loss
                eff_k = eff_k.masked_fill(~real[:, None], HF_IGNORE_INDEX)
                if empty is not None:
                    eff_k = torch.where(empty, torch.zeros_like(eff_k), eff_k)
                    if am_k is not None:
                        am_k = torch.where(empty, torch.ones_like(am_k), am_k)
            main_kwargs = {k: take(v) for k, v in kwargs.items()}
            ids_kw, takes_mask, takes_labels = self._forward_params
            if am_k is not None and takes_mask:
                # A model without an attention_mask parameter cannot use it; the padding targets are still
                # excluded from the loss through eff_k.
                main_kwargs["attention_mask"] = am_k
            if takes_labels and not sampled:   # sampled: the model's unweighted loss would be unused work
                main_kwargs["labels"] = eff_k
            ids_k = input_ids.index_select(0, rows)
            outputs = model(input_ids=ids_k, **main_kwargs) if ids_kw else model(ids_k, **main_kwargs)
            loss = None if sampled else output_loss(outputs)
            own = loss is None
            if own:
                row_weights = None
                if sampled:   # SPEC §9.2 / §8: ω_b = w_b ⊘ f32(max(1, N_tok)); padding rows 0 (§9.4)
                    w_rows = torch.where(real, r.weights.index_select(0, rows), 0.0)
                    row_weights = w_rows / torch.clamp(n_tok, min=1).to(torch.float32)
                loss = self._own_loss(outputs, eff_k, row_weights)
            if empty is not None:
                loss = torch.where(empty, torch.zeros((), dtype=loss.dtype, device=loss.device), loss)
            if own:
                # Hand the loss back inside the model's own output where it has a loss field (a Hugging Face
                # ModelOutput, a dict, an object with .loss = None), as a model given labels would.
                if isinstance(outputs, dict):
                    outputs["loss"] = loss
                elif not isinstance(outputs, (torch.Tensor, tuple, list)) and hasattr(outputs, "loss"):
                    try:
                        outputs.loss = loss
                    except AttributeError:   # a read-only loss (a property, a frozen dataclass): keep it as is
                        pass
            scored = eff_k[:, 1:] if self.shift_labels else eff_k
            tokens_selected = ((scored != HF_IGNORE_INDEX) & real[:, None]).sum()
        self.last_kept = kept
        self.last_num_kept = num_kept_t
        self._last = {
            "step": self._step,
            "token_ratio": float(r.base),
            "effective_ratio": r.ratio,
            "tokens_selected": tokens_selected,
            "tokens_total": n,
            "tokens_nonfinite": r.nonfinite,
            "tokens_out_of_range": 0,
            "avg_confidence": r.mean_conf,
            "avg_entropy": eligible_mean(scores.stats.entropy, elig, n),
            "avg_difficulty": eligible_mean(scores.difficulty, elig, n),
            # SPEC §10: the ESS of the HT weights for sampled (§9.2); an unweighted selection's is its count.
            "sample_ess": sample_ess if sampled else tokens_selected.to(torch.float32),
            "sequences_selected": num_kept,
            "sequences_total": seq_elig.sum(),
            "k_seq": r.k_seq,
            "router_path": r.path,
        }
        return BatchSplitOutput(loss, outputs, kept, r.seq_d, seq_elig, num_kept_t)

    def kept_rows_mode(self) -> str:
        """SPEC §9.4: ``'exact'`` or ``'bound'``, what ``kept_rows`` resolves to. ``'auto'`` is ``'bound'`` when
        the bound is the count of a batch whose sequences are all eligible (no dynamic threshold, or a
        sensitivity of 0, and not ``selection='sampled'``), else ``'exact'`` (DECISIONS.md
        ``sync-free-batch-split``)."""
        if self.kept_rows != "auto":
            return self.kept_rows
        cfg = self.config
        if cfg.selection in SAMPLED_SELECTIONS or (cfg.uses_dynamic_threshold and cfg.threshold_sensitivity > 0):
            return "exact"
        return "bound"

    def kept_rows_bound(self, batch_size: int) -> int:
        """SPEC §9.4: ``k_max``, a host upper bound of the kept count of a batch of ``batch_size`` sequences at the
        current step: ``num_selected(B, r_max)`` with ``r_max`` the curriculum ratio, raised to
        ``min(1, base ⊗ (1 ⊕ σ))`` (the dynamic threshold at ``c̄ = 0``) when the threshold is on; ``B`` with
        ``selection='sampled'`` (a Horvitz–Thompson draw may keep every eligible sequence)."""
        cfg = self.config
        if cfg.selection in SAMPLED_SELECTIONS:
            return int(batch_size)
        ratio = np.float32(self.base_ratio())
        if cfg.uses_dynamic_threshold:
            # SPEC §5.2's float32 operations at c̄ = 0: each is monotone in c̄, so no c̄ in [0, 1] exceeds it.
            one = np.float32(1.0)
            boost = np.float32(one + np.float32(one * np.float32(cfg.threshold_sensitivity)))
            ratio = min(one, np.float32(ratio * boost))
        return int(num_selected(int(batch_size), float(ratio)))

    def bucket_sizes(self, batch_size: int, model: Any = None) -> Optional[tuple[int, ...]]:
        """SPEC §9.4: the main pass's batch sizes for batches of ``batch_size`` sequences (ascending, ``B``
        included), or None for exact slicing; ``model``: the main pass's module (``'auto'`` buckets when it or
        :attr:`model` is compiled)."""
        buckets = self.buckets
        if isinstance(buckets, str):   # 'auto'
            compiled = is_compiled_module(self.model) or (model is not None and is_compiled_module(model))
            buckets = default_buckets if compiled else None
        if buckets is None:
            return None
        values = check_buckets(buckets(batch_size)) if callable(buckets) else buckets
        if not isinstance(values, tuple) or any(b > batch_size for b in values):
            raise ValueError(f"buckets: expected sizes in [1, {batch_size}] (the batch size), got {values!r}")
        return tuple(sorted(set(values) | {batch_size}))

    def _own_loss(self, outputs: Any, eff_k: torch.Tensor,
                  row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next-token loss of a model that returned logits but no loss (as the seed docs' wrapper did), or,
        with ``row_weights`` ``(k,)`` (``selection='sampled'``, SPEC §9.2), ``Σ_b ω_b Σ_t ce_{b,t}``."""
        logits = output_logits(outputs)
        name = type(self.model).__name__
        if logits is None:
            needs = ("selection='sampled' weights each sequence's loss and needs the model's logits"
                     if row_weights is not None else
                     "CGGRModel needs a (B, T, V) logits tensor, an output with .logits, or a .loss computed "
                     "from labels=")
            raise ValueError(f"model: {name} returned {type(outputs).__name__} with neither a loss nor logits; "
                             f"{needs}")
        want = (eff_k.shape[0], eff_k.shape[1])
        if logits.dim() != 3 or tuple(logits.shape[:2]) != want or not logits.is_floating_point() \
                or (self.vocab_size is not None and logits.shape[2] != self.vocab_size):
            vocab = "V" if self.vocab_size is None else str(self.vocab_size)
            raise ValueError(f"model: {name} returned logits of shape {tuple(logits.shape)} and dtype "
                             f"{logits.dtype}; expected floating (k, T, {vocab}) = ({want[0]}, {want[1]}, {vocab}) "
                             f"for the kept rows")
        if row_weights is not None:
            return weighted_next_token_loss(logits, eff_k, row_weights, shift=self.shift_labels)
        return next_token_loss(logits, eff_k, shift=self.shift_labels)

    # ------------------------------------------------------------------------------------------ metrics
    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last forward as Python scalars, plus ``sequences_selected`` (kept sequences)
        and ``sequences_total`` (eligible sequences, the denominator of the ratio), and ``router_path``
        (``'fused'`` or ``'logits'``, see :attr:`router_path_reason`). ``tokens_selected`` counts
        the valid targets in the main loss, ``tokens_total`` the router's eligible tokens of the whole batch.
        Reads the device: call it outside the training step's hot path. Before the first forward the counts
        and averages are 0 and both ratios are the current base ratio."""
        out = host_metrics(self._last, self._step, self.base_ratio(), self.config,
                           extra_keys=("sequences_selected", "sequences_total"))
        out["router_path"] = (self._last["router_path"] if self._last is not None
                              else resolve_router_path(self.router, self.router_path)[0])
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"scoring={c.scoring!r}, selection={c.selection!r}, min_tokens_ratio={c.min_tokens_ratio}, "
                f"warmup_steps={c.warmup_steps}, dynamic_threshold={c.dynamic_threshold}, step={self._step}")
