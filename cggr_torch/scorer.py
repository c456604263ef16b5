"""The router's token scores and the token scorer :class:`CGGRScorer` (SPEC §2-§7 over a router's output, §9).

:func:`router_token_scores` is the router pass shared by :class:`CGGRScorer` and ``CGGRModel``: it runs a
router (:mod:`cggr_torch.router`) on the path :func:`cggr_torch.router.resolve_router_path` chose (``'fused'``:
the final hidden states and :func:`cggr_torch.fused_linear.score_next_tokens_fused`; ``'logits'``: the
router's logits and :func:`cggr_torch.scoring.score_next_tokens`) and returns the token scores, at the
positions of SPEC §9.3 (:func:`scored_index`). From token scores to sequences (SPEC §9, §9.1):
:func:`sequence_difficulty`, :func:`reference_sequence_difficulty`, :func:`sequence_selection`, and the pure
:func:`select_sequences` of router logits (re-exported by :mod:`cggr_torch.batch_split`, where the seed docs'
users and the parity tests find it; JAX keeps its counterpart in :mod:`cggr_jax.scorer` too).

:class:`CGGRScorer` turns a router into ``(difficulty, mask, info)`` over the input positions: SPEC §2-§7
applied to the router's logits, with a fixed output shape ``(B, T)``, so the mask can drive static-shape
routing such as sending unselected tokens to a "null" expert in a mixture-of-experts layer
(``examples/moe_null_routing.py``).
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from cggr import DEFAULT_SEQUENCE_SELECTION, REFERENCE_SCORING_MODES, CGGRConfig
from cggr.config import ROUTER_POSITIONS_ALL, RouterPositions

from .curriculum import Curriculum, Schedule
from .fused_linear import score_next_tokens_fused
from .loss import check_schedule
from .pipeline import host_metrics, measure_scores
from .router import (ROUTER_MEMORY_BUDGET, PassthroughRouter, TruncatedRouter, is_masked_lm, resolve_router_path,
                     router_logits)
from .scoring import score_next_tokens
from .selection import rank_tokens, select_tokens
from .sequence_reference import apply_sequence_reference, check_sequence_reference, router_scoring
from .types import SequenceSelection, TokenScores, TokenStatistics
from .utils import check_batch, check_target_range, resolve_config, widen_labels

__all__ = [
    "CGGRScorer",
    "check_budget",
    "reference_sequence_difficulty",
    "router_token_scores",
    "scored_index",
    "select_sequences",
    "sequence_difficulty",
    "sequence_selection",
]


def check_budget(value: Any) -> None:
    """``router_memory_budget_bytes`` of :class:`CGGRScorer` and ``CGGRModel``: an integer ``>= 1`` (bytes)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"router_memory_budget_bytes: expected an integer >= 1 (bytes), got {value!r}")


def _cat_scores(parts: list[TokenScores]) -> TokenScores:
    stats = TokenStatistics(*(torch.cat([p.stats[i] for p in parts]) for i in range(len(TokenStatistics._fields))))
    return TokenScores(torch.cat([p.difficulty for p in parts]), torch.cat([p.eligible for p in parts]),
                       torch.cat([p.valid for p in parts]), stats)


@functools.lru_cache(maxsize=64)
def _index_on(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # One host-to-device copy per (positions, T, device), then reused: a fresh copy every step would make the
    # host wait for the device queue (a pageable host-to-device copy is synchronous).
    return torch.tensor(values, dtype=torch.int64, device=device)


def scored_index(positions: Optional[RouterPositions], seq_len: int, *, shift: bool,
                 device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """SPEC §9.3: ``(router positions S, their target columns)`` as int64 tensors on ``device`` (the target
    column of position ``t`` is ``t + 1`` when ``shift``, else ``t``), or None when every position is scored
    (``positions`` None or the defaults: SPEC §9 unchanged). Cached per shape: no host synchronisation."""
    scored = None if positions is None else positions.scored(seq_len, shift)
    if scored is None:
        return None
    targets = tuple(t + 1 for t in scored) if shift else scored
    return _index_on(scored, torch.device(device)), _index_on(targets, torch.device(device))


def _prefix(value: Any, seq_len: int, read: int) -> Any:
    """A per-token router input cut to the ``read`` columns the router reads (SPEC §9.3), else unchanged."""
    if read < seq_len and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == seq_len:
        return value[..., :read]
    return value


def _score_rows(router: Callable[..., Any], path: str, ids: torch.Tensor, am_read: Optional[torch.Tensor],
                kw: Mapping[str, Any], lab: Optional[torch.Tensor], am_scored: Optional[torch.Tensor],
                pos: Optional[torch.Tensor], *, scoring: str, ignore_index: int, shift: bool,
                vocab_size: Optional[int], memory_budget_bytes: int) -> tuple[TokenScores, torch.Tensor]:
    """One chunk of :func:`router_token_scores`: run the router on ``ids`` (the columns it reads), check its
    output, keep the positions ``pos`` (SPEC §9.3; None: all of them) and score them against ``lab``."""
    rows, read = ids.shape
    if path == "fused":
        head = router.lm_head()
        if vocab_size is not None and head.weight.shape[0] != vocab_size:
            raise ValueError(f"router: its LM head has {head.weight.shape[0]} rows but the model's vocabulary "
                             f"has {vocab_size} entries")
        hidden = router.hidden_states(ids, attention_mask=am_read, **kw)
        if tuple(hidden.shape[:2]) != (rows, read):
            raise ValueError(f"router: expected hidden states of shape ({rows}, {read}, d), got "
                             f"{tuple(hidden.shape)}")
        # the head and the scoring run on the scored rows only
        hidden = hidden if pos is None else hidden.index_select(1, pos)
        return score_next_tokens_fused(hidden, head.weight, head.bias, lab, am_scored, scoring=scoring,
                                       ignore_index=ignore_index, shift=shift,
                                       memory_budget_bytes=memory_budget_bytes)
    if path == "logits":
        logits = router_logits(router(ids, attention_mask=am_read, **kw))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (rows, read):
            raise ValueError(f"router: expected logits of shape ({rows}, {read}, V) for the {read} columns it "
                             f"reads, got {tuple(logits.shape)}")
        if vocab_size is not None and logits.shape[-1] != vocab_size:
            raise ValueError(f"router: its vocabulary has {logits.shape[-1]} entries but the model's has "
                             f"{vocab_size}; the router must score the model's own vocabulary (build it "
                             f"with create_truncated_router(model) or from a model with the same tokenizer)")
        logits = logits if pos is None else logits.index_select(1, pos)
        return score_next_tokens(logits, lab, am_scored, scoring=scoring, ignore_index=ignore_index, shift=shift)
    raise ValueError(f"path: expected 'fused' or 'logits' (a resolved router path), got {path!r}")


def router_token_scores(router: Callable[..., Any], path: str, input_ids: torch.Tensor,
                        labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                        router_kwargs: Mapping[str, Any], *, scoring: str, ignore_index: int, shift: bool,
                        vocab_size: Optional[int] = None, batch_chunk: Optional[int] = None,
                        memory_budget_bytes: int = ROUTER_MEMORY_BUDGET,
                        positions: Optional[RouterPositions] = None) -> tuple[TokenScores, torch.Tensor]:
    """The router pass: token scores ``(B, T)`` (SPEC §2-§4 at the input positions) and the non-finite count.

    With ``positions`` other than the defaults (SPEC §9.3) the router reads the first ``R`` columns only and
    the scores are ``(B, |S|)``: column ``j`` is the pair of router position ``S[j]`` and its target, already
    aligned (:func:`scored_index`); on the fused path the head and the scoring run on the gathered ``B·|S|``
    hidden rows only.

    ``path='fused'`` (a :class:`TruncatedRouter` accepted by :func:`resolve_router_path`): final hidden states
    then :func:`score_next_tokens_fused`; ``path='logits'``: the router's logits, checked to be
    ``(rows, T, V)`` with ``V = vocab_size`` when given, then :func:`score_next_tokens`. ``batch_chunk``: run
    the router on chunks of that many sequences (``None``: the whole batch, the caller's tensors themselves).
    Call under ``torch.no_grad()``; nothing here synchronises with the device.
    """
    B, T = input_ids.shape
    chunk = batch_chunk or B
    parts: list[TokenScores] = []
    nonfinite: Optional[torch.Tensor] = None
    index = scored_index(positions, T, shift=shift, device=input_ids.device)
    read = T if index is None else positions.read_length(T)
    if index is not None and labels is not None and vocab_size is not None:
        # Every label is checked, scored or not (the main pass reads them all), as on the full path.
        check_target_range(labels, vocab_size, ignore_index, name="labels")
    for start in range(0, B, chunk):
        if chunk >= B:
            ids, am, lab, kw = input_ids, attention_mask, labels, router_kwargs
        else:
            sl = slice(start, min(B, start + chunk))
            ids = input_ids[sl]
            am = None if attention_mask is None else attention_mask[sl]
            lab = None if labels is None else labels[sl]
            kw = {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
                  for k, v in router_kwargs.items()}
        pos, am_scored, shift_scored = None, am, shift
        if index is not None:   # SPEC §9.3: read R columns, score the pairs of S (targets already aligned)
            pos, cols = index
            lab = None if lab is None else lab.index_select(1, cols)
            am_scored = None if am is None else am.index_select(1, cols)
            ids, am, shift_scored = ids[:, :read], (None if am is None else am[:, :read]), False
            kw = {k: _prefix(v, T, read) for k, v in kw.items()}
        scores, nf = _score_rows(router, path, ids, am, kw, lab, am_scored, pos, scoring=scoring,
                                 ignore_index=ignore_index, shift=shift_scored, vocab_size=vocab_size,
                                 memory_budget_bytes=memory_budget_bytes)
        parts.append(scores)
        nonfinite = nf if nonfinite is None else nonfinite + nf
    assert nonfinite is not None  # B >= 1 (checked by check_batch)
    return (parts[0] if len(parts) == 1 else _cat_scores(parts)), nonfinite


# ---------------------------------------------------------------------------------------------- scorer
class CGGRScorer(Curriculum, nn.Module):
    """Score token difficulty with a router and pick the hard tokens: ``(difficulty, mask, info)``.

    ``forward(input_ids, labels=None, attention_mask=None, **router_kwargs)`` runs ``router`` under
    ``torch.no_grad()`` and applies SPEC §2-§7 to its logits:

    * difficulty ``d`` per §3 (``scoring``), eligibility per §4, the ratio per §5 (curriculum at the scorer's
      step, dynamic threshold from the mean confidence ``c̄`` of the eligible tokens), ``k`` per §5.3 and the
      selection per §7 (``selection``) over the batch's eligible tokens in flat order ``b·T + t``;
    * with ``labels`` (causal router): position ``t`` is scored against ``labels[:, t+1]``; the last position
      has no target and is never selected; padding (``attention_mask == 0``) and ``ignore_index`` targets are
      ignored. With ``shift_labels=False`` (masked LMs) position ``t`` is scored against ``labels[:, t]``.
      Without labels every non-padding position is scored by the target-free formula of §3.

    Every output has the static shape ``(B, T)`` of ``input_ids`` whatever ``k`` is, so ``mask`` can drive
    static-shape routing (e.g. mixture-of-experts "null routing": unselected tokens go to a no-op expert, see
    ``examples/moe_null_routing.py``). Nothing in ``forward`` synchronises with the device.

    Returns:
        ``difficulty`` (float32 ``(B, T)``; meaningful only where ``info['eligible']``: it is 0 at the last
        position of a shifted batch and may be NaN on non-finite router rows),
        ``mask`` (bool ``(B, T)``), and ``info``: a dict of tensors ``k``, ``ratio`` (effective, float32),
        ``eligible``, ``valid``, ``stats`` (:class:`~cggr_torch.scoring.TokenStatistics`, ``(B, T)``),
        ``tokens_selected``, ``tokens_total``, ``tokens_nonfinite``, ``avg_confidence``, ``avg_entropy``,
        ``avg_difficulty``, plus host values ``token_ratio`` and ``step``. :meth:`get_metrics` returns the last
        call's SPEC §10 metrics as Python scalars. Call :meth:`step` after each optimizer step.

    Args:
        router: a module mapping ``(input_ids, attention_mask=..., **router_kwargs)`` to logits ``(B, T, V)``
            (see :func:`router_logits` for the accepted output forms), e.g. :func:`create_truncated_router`.
        scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps,
        num_strata, min_tokens_per_sequence, ignore_index, ratio_schedule: as ``CGGRLoss`` (SPEC §3-§7)
            (keyword-only; ``selection`` defaults to ``'topk'``); or ``config``, a ready
            :class:`cggr.CGGRConfig` (stored as ``.config``).
        shift_labels: ``None`` to shift unless the router is a masked LM (:func:`is_masked_lm`).
        router_path: ``'auto'`` (default), ``'fused'`` or ``'logits'``: how the router's tokens are scored
            (:data:`ROUTER_PATHS`, :func:`resolve_router_path`). ``'auto'`` scores a truncated router with a
            plain linear head from its final hidden states without materialising the ``(B, T, V)`` logits and
            falls back to the logits otherwise; ``info['router_path']`` and :attr:`router_path_used` say which
            path ran, :attr:`router_path_reason` why.
        router_memory_budget_bytes: working memory of the fused path's logit blocks (default 1 GiB).
    """

    def __init__(self, router: nn.Module, *, scoring: str = CGGRConfig.scoring,
                 selection: str = DEFAULT_SEQUENCE_SELECTION,
                 dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                 threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                 min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
                 num_strata: int = CGGRConfig.num_strata,
                 min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                 ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None,
                 shift_labels: Optional[bool] = None, router_path: str = "auto",
                 router_memory_budget_bytes: int = ROUTER_MEMORY_BUDGET, config: Optional[CGGRConfig] = None) -> None:
        super().__init__()
        if not callable(router):
            raise ValueError(f"router: expected a callable module returning (B, T, V) logits, got "
                             f"{type(router).__name__}")
        check_budget(router_memory_budget_bytes)
        resolve_router_path(router, router_path)   # validates router_path; 'fused' must be possible
        self.config = resolve_config(config, dict(
            scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence,
            ignore_index=ignore_index), CGGRConfig(selection="topk"))
        if self.config.scoring in REFERENCE_SCORING_MODES:   # a routing mask has no reference loss (SPEC §9.1)
            raise ValueError(f"scoring: {self.config.scoring!r} is not supported by CGGRScorer (its routing mask has "
                             f"no reference loss); use CGGRModel(scoring='excess') or CGGRLoss with reference_nll=")
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise ValueError(f"shift_labels: expected None or a bool, got {shift_labels!r}")
        if isinstance(router, nn.Module) and not isinstance(router, (TruncatedRouter, PassthroughRouter)):
            self.router = router
        else:  # weights owned by another model: held by reference, not registered (no duplicate state)
            object.__setattr__(self, "router", router)
        self.shift_labels = (not is_masked_lm(router)) if shift_labels is None else shift_labels
        self.router_path = router_path
        self.router_memory_budget_bytes = int(router_memory_budget_bytes)
        self.router_path_reason = resolve_router_path(router, router_path)[1]
        self._init_curriculum(self.config.min_tokens_ratio, self.config.warmup_steps,
                              check_schedule(ratio_schedule, self.config))
        self._last: Optional[dict[str, Any]] = None

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                **router_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        check_batch(input_ids, labels, attention_mask, labels_required=False)
        if labels is None and self.scoring == "loss":
            raise ValueError("labels: scoring='loss' needs labels (the next-token targets), got None")
        if labels is not None:
            labels = widen_labels(labels, self.config.ignore_index, name="labels")
        # Host-only (a few attribute reads): the model may have changed since the last call (e.g. a LoRA head).
        path, self.router_path_reason = resolve_router_path(self.router, self.router_path)
        base = self.base_ratio()
        with torch.no_grad():
            scores, nonfinite = router_token_scores(self.router, path, input_ids, labels, attention_mask,
                                                    router_kwargs, scoring=self.scoring,
                                                    ignore_index=self.ignore_index, shift=self.shift_labels,
                                                    memory_budget_bytes=self.router_memory_budget_bytes)
            measured = measure_scores(scores, self._step, base, self.config)
        metrics = measured.metrics
        mask = measured.mask
        info: dict[str, Any] = {
            "k": measured.k,
            "ratio": metrics["effective_ratio"],
            "effective_ratio": metrics["effective_ratio"],
            "tokens_out_of_range": 0,
            "token_ratio": float(base),
            "step": self._step,
            "eligible": scores.eligible,
            "valid": scores.valid,
            "stats": scores.stats,
            "tokens_selected": metrics["tokens_selected"],
            "tokens_total": metrics["tokens_total"],
            "tokens_nonfinite": nonfinite,
            "avg_confidence": metrics["avg_confidence"],
            "avg_entropy": metrics["avg_entropy"],
            "avg_difficulty": metrics["avg_difficulty"],
            "sample_ess": metrics["sample_ess"],
            "router_path": path,
        }
        self._last = info
        return scores.difficulty, mask, info

    @property
    def router_path_used(self) -> str:
        """``'fused'`` or ``'logits'``: the path of the last forward (before the first one, of the next one);
        also ``info['router_path']``. :attr:`router_path_reason` says why."""
        if self._last is not None:
            return self._last["router_path"]
        return resolve_router_path(self.router, self.router_path)[0]

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last forward as Python scalars (reads the device: call outside the step).

        Before the first forward the counts and averages are 0 and both ratios are the current base ratio.
        The router path is :attr:`router_path_used` (kept out of this dict, whose keys are SPEC §10's)."""
        return host_metrics(self._last, self._step, self.base_ratio(), self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"scoring={c.scoring!r}, selection={c.selection!r}, min_tokens_ratio={c.min_tokens_ratio}, "
                f"warmup_steps={c.warmup_steps}, dynamic_threshold={c.dynamic_threshold}, step={self._step}")


def sequence_difficulty(difficulty: torch.Tensor, eligible: torch.Tensor,
                        sequence_reference: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §9: ``D_b`` = float32 mean token difficulty over the eligible tokens of row ``b``; a row with no
    eligible token is not eligible (its ``D_b`` is 0). With a float32 per-sequence ``sequence_reference``
    ``(B,)`` (SPEC §9.1; ``difficulty`` is then the router's ``nll``): ``D_b`` = that mean ``⊖ ref_b``."""
    count = eligible.sum(dim=1)
    zero = torch.zeros((), dtype=torch.float32, device=difficulty.device)
    total = torch.where(eligible, difficulty.to(torch.float32), zero).sum(dim=1)
    seq_d, seq_ok = total / torch.clamp(count, min=1).to(torch.float32), count > 0
    if sequence_reference is not None:
        seq_d = torch.where(seq_ok, seq_d - sequence_reference, zero)
    return seq_d, seq_ok


def reference_sequence_difficulty(scores: TokenScores, reference_nll: Optional[torch.Tensor], shift: bool,
                                  columns: Optional[torch.Tensor] = None
                                   ) -> tuple[TokenScores, torch.Tensor, torch.Tensor]:
    """SPEC §9/§9.1: the token scores after the reference (if any) and ``(D, sequence eligible)``; ``columns``:
    the target columns of a subset of scored positions (SPEC §9.3)."""
    scores, seq_ref = apply_sequence_reference(scores, reference_nll, shift=shift, columns=columns)
    values = scores.stats.nll if seq_ref is not None else scores.difficulty
    return (scores,) + sequence_difficulty(values, scores.eligible, seq_ref)


def sequence_selection(scores: TokenScores, seq_d: torch.Tensor, seq_elig: torch.Tensor, keep: torch.Tensor,
                       k: torch.Tensor, ratio: Any, base: Any) -> SequenceSelection:
    """SPEC §9: the :class:`~cggr_torch.types.SequenceSelection` of a step (ranks by ``seq_d``; ``ratio`` and
    ``base`` become float32 device scalars)."""
    dev = seq_d.device
    base_t = torch.full((), float(np.float32(base)), dtype=torch.float32, device=dev)
    return SequenceSelection(keep, k, rank_tokens(seq_d, seq_elig), seq_d, seq_elig,
                             torch.as_tensor(ratio, dtype=torch.float32, device=dev).reshape(()), base_t, scores,
                             torch.zeros((), dtype=torch.int32, device=dev))


def select_sequences(router_logits: torch.Tensor, labels: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None, *, ratio: Any, scoring: str = CGGRConfig.scoring,
                     ignore_index: int = CGGRConfig.ignore_index,
                     reference_nll: Optional[torch.Tensor] = None, router_positions: Any = ROUTER_POSITIONS_ALL,
                     router_samples: Optional[int] = None,
                     router_prefix: Optional[int] = None) -> SequenceSelection:
    """SPEC §9 sequence selection from router logits ``(B, T, V)`` and unshifted ``labels`` ``(B, T)`` at the
    float32 effective ``ratio`` — the pure form of what :meth:`CGGRModel.forward` does after its router pass,
    used by the cross-framework parity tests (``cggr_jax.batch_split.select_sequences(..., ratio=...)``).
    ``base_ratio`` of the result is NaN (the ratio was passed directly). ``reference_nll``: ``scoring='excess'``
    only, ``(B, T)`` per token aligned like ``labels`` or ``(B,)`` per sequence (SPEC §9.1).
    ``router_positions``, ``router_samples``, ``router_prefix``: SPEC §9.3, the scored subset of positions;
    ``router_logits`` may then hold the ``R`` columns a prefix router read instead of all ``T``."""
    positions = RouterPositions(router_positions, router_samples, router_prefix)
    labels = widen_labels(labels, ignore_index, name="labels")
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 3:
        got = tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits).__name__
        raise ValueError(f"router_logits: expected a (B, T, V) tensor, got {got}")
    B, T = tuple(router_logits.shape[:2])
    if not positions.is_full:   # the logits may cover the R columns a prefix router read (SPEC §9.3)
        if labels.dim() != 2:
            raise ValueError(f"labels: expected a (B, T) integer tensor, got shape {tuple(labels.shape)}")
        B, T = tuple(labels.shape)
        check_batch(labels, labels, attention_mask)
        allowed = sorted({T, positions.read_length(T)})
        if router_logits.shape[0] != B or router_logits.shape[1] not in allowed:
            raise ValueError(f"router_logits: expected shape ({B}, T', V) with T' in {allowed} (all columns or "
                             f"the router_prefix read), got {tuple(router_logits.shape)}")
    index = scored_index(positions, T, shift=True, device=router_logits.device)
    reference_nll = check_sequence_reference(reference_nll, scoring, (B, T), device=router_logits.device)
    if index is None:
        scores, _ = score_next_tokens(router_logits, labels, attention_mask, scoring=router_scoring(scoring),
                                      ignore_index=ignore_index, shift=True)
        columns = None
    else:   # SPEC §9.3: the pairs of S only (the logits of all T columns or of the R a prefix router read)
        pos, columns = index
        check_target_range(labels, router_logits.shape[-1], ignore_index, name="labels")
        scores, _ = score_next_tokens(router_logits.index_select(1, pos), labels.index_select(1, columns),
                                      None if attention_mask is None else attention_mask.index_select(1, columns),
                                      scoring=router_scoring(scoring), ignore_index=ignore_index, shift=False)
    scores, seq_d, seq_elig = reference_sequence_difficulty(scores, reference_nll, True, columns)
    mask, k = select_tokens(seq_d, seq_elig, ratio, selection="topk")
    return sequence_selection(scores, seq_d, seq_elig, mask, k, ratio, float("nan"))
