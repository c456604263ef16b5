"""Data-parallel CGGR for PyTorch: token selection over the whole data-parallel batch (SPEC §13).

Two selection scopes, for a process group of ``W`` ranks (DDP, FSDP, any ``torch.distributed`` backend):

``scope="local"``
    Every rank runs the single-device loss of SPEC §5-§8 on its own shard; no communication. DDP then
    averages the ranks' gradients, i.e. the step uses the mean of ``W`` per-shard CGGR losses (each rank keeps
    its own hardest ``ratio`` of tokens and has its own dynamic threshold).

``scope="global"`` (default)
    The selection of SPEC §5-§7 runs on the *concatenation* of all ranks' tokens in rank order: rank ``r``'s
    flat index ``i`` is the global flat index ``r·N + i`` (``N`` tokens per rank); a ``(B, T, V)`` input is
    concatenated along the batch, so the sequences of ``sequence_aware`` are the ``W·B`` rows, and an
    ``(N, V)`` input along its token axis (one global sequence of ``W·N`` tokens, as a single device would see
    the concatenated 2-D batch). Then::

        n          = Σ_r n_r                                        (eligible tokens of all ranks)
        c̄          = (Σ_r Σ_{eligible on r} p1) / max(1, n)         (the global mean confidence)
        ratio, k   = §5 with this n and c̄                            (identical on every rank)
        selected   = §7 on the concatenated (difficulty, eligible)  (each rank keeps its slice)
        share_r    = W · Σ_{i selected on r} ce_i / max(1, |selected|)

    DDP and FSDP *average* gradients over the ``W`` ranks, so the averaged gradient is
    ``Σ_{i selected} ∇ce_i / |selected|`` — exactly the gradient of the single-device loss on the
    concatenated batch. The tensor returned on every rank has the *value* of the global loss
    ``Σ_{i selected} ce_i / max(1, |selected|)`` (identical on all ranks, what one device would report) and the
    *gradient* of ``share_r``: ``returned = share_r − share_r.detach() + global_loss``.

Communication per call (tensors only: no ``.item()``, asynchronous on CUDA): one all-gather of ``N + 4``
float32 per rank (the difficulties, with ``NaN`` marking tokens that are not eligible, plus the sums behind
the metrics), one ``all_reduce`` of one float32 (the selected cross-entropy sum, for the reported value),
and, with ``check_consistency=True``, one all-gather of 6 int64 per rank that checks that every rank passes
the same logits shape, curriculum step and base ratio. Every rank sorts the ``W·N`` difficulties (the same
exact integer/comparison logic as one device, so every rank derives the same cut-off). Logits are never
communicated.

Requirements: every rank of ``process_group`` calls the loss the same number of times with logits of the
same shape (pad a short batch with ``ignore_index`` targets: padding is never eligible and changes nothing
but the global flat indices, which keep their rank order), the same configuration and the same step. With
``check_consistency=True`` a mismatch raises :class:`ValueError` on every rank (CPU tensors) or trips a
device-side assertion (CUDA tensors, no host synchronisation). ``process_group`` must be the group over which
the gradients are *averaged* (the data-parallel group; with tensor or pipeline parallelism, the DP group).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from cggr import CGGRConfig
from cggr.config import reject_sampled_selection

from .curriculum import Schedule, base_ratio_tensor, host_step, step_tensor
from .loss import (
    CGGRLoss,
    check_base_loss,
    check_schedule,
    forward_reference,
    selected_cross_entropy,
    validate_inputs,
)
from .pipeline import as_ratio_tensor, as_step_tensor, effective_ratio
from .scoring import check_reference_nll, compute_statistics, row_finite, scores_from_statistics
from .selection import select_tokens
from .utils import resolve_config

__all__ = ["SCOPES", "DISTRIBUTED_METRIC_KEYS", "DistributedCGGRLoss", "cggr_loss", "group_info"]

#: The selection scopes of SPEC §13.
SCOPES: tuple[str, ...] = ("global", "local")

#: Extra metric keys of the distributed loss (besides :data:`cggr_torch.loss.METRIC_KEYS`).
DISTRIBUTED_METRIC_KEYS: tuple[str, ...] = ("tokens_selected_local", "world_size")

# Counts travel in the float32 payload as c // 4096 and c % 4096, both exact in float32 for c < 2**36.
_LIMB = 4096
_PAYLOAD_EXTRA = 4  # conf_sum, entropy_sum, nonfinite_hi, nonfinite_lo
_META_LEN = 6  # ndim, dim0, dim1, V, step, float32 bits of the base ratio

# ``all_gather_into_tensor`` was renamed ``all_gather_single`` (torch 2.13 deprecates the old name; older
# releases have only the old one). Same semantics: every rank's equally sized input, concatenated in rank order.
_all_gather_single: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    return scope


def group_info(process_group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``process_group`` (the default group when ``None``).

    Raises:
        ValueError: ``torch.distributed`` is unavailable or not initialised, or this process is not a member
            of ``process_group``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: scope='global' needs an initialised torch.distributed "
                         "(call torch.distributed.init_process_group first), or use scope='local'")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the given process group")
    return world, rank


def _device_vector(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small vector of host numbers on ``device`` written by fill kernels (no host-to-device copy/sync)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _check_consistency(logits: torch.Tensor, step: torch.Tensor, base: torch.Tensor, world: int,
                       group: Optional[dist.ProcessGroup]) -> None:
    """Every rank must pass the same logits shape, step and base ratio (one gather of 6 int64 per rank).
    ``step`` and ``base`` are 0-d device tensors (never read on the host)."""
    shape = list(logits.shape[:-1]) + ([-1] if logits.dim() == 2 else [])
    mine = [logits.dim(), shape[0], shape[1], logits.shape[-1]]
    dev = logits.device
    base_bits = base.reshape(1).to(device=dev, dtype=torch.float32).view(torch.int32).to(torch.int64)
    meta = torch.cat([_device_vector(mine, torch.int64, dev), step.reshape(1).to(device=dev, dtype=torch.int64),
                      base_bits])
    everyone = torch.empty(world * _META_LEN, dtype=torch.int64, device=dev)
    _all_gather_single(everyone, meta, group=group)
    everyone = everyone.view(world, _META_LEN)
    msg = ("cggr_torch.distributed: every rank of the process group must call the loss with logits of the same "
           "shape and at the same curriculum step (pad short batches with ignore_index targets; call step() on "
           "every rank)")
    if dev.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async((everyone == meta.unsqueeze(0)).all(), msg)
        return
    rows = everyone.cpu().tolist()  # CPU (gloo) or another non-CUDA device: checked eagerly
    if any(row != rows[0] for row in rows):
        def describe(row: list[int]) -> str:
            dims = row[1:3] if row[0] == 3 else row[1:2]
            b = float(np.asarray(row[5], dtype=np.int32).view(np.float32))
            return f"logits {tuple(dims) + (row[3],)}, step {row[4]}, base ratio {b}"
        detail = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        raise ValueError(f"logits: {msg}; got {detail}")


def _global_forward(logits: torch.Tensor, targets: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
                    cfg: CGGRConfig,
                    base_loss: Optional[Callable[..., torch.Tensor]], group: Optional[dist.ProcessGroup],
                    check_consistency: bool, reference_nll: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPEC §13 global scope on validated inputs: ``(loss, metrics)``; see the module docstring.
    ``reference_nll``: this rank's checked float32 reference (``scoring='excess'``); the gathered difficulties
    already include it (SPEC §3.1, §13.2)."""
    world, rank = group_info(group)
    dev = logits.device
    tok_shape = tuple(logits.shape[:-1])
    N = math.prod(tok_shape)
    if check_consistency:
        _check_consistency(logits, step, base, world, group)

    with torch.no_grad():
        # The stages of cggr_torch.pipeline, with one all-gather between eligibility and the ratio.
        stats = compute_statistics(logits.detach(), targets, cfg.ignore_index)
        scores = scores_from_statistics(stats, targets, cfg.scoring, cfg.ignore_index,
                                        reference_nll=reference_nll)
        elig = scores.eligible
        zero = torch.zeros((), dtype=torch.float32, device=dev)

        def eligible_sum(x: torch.Tensor) -> torch.Tensor:
            return torch.where(elig, x, zero).sum(dtype=torch.float32).reshape(1)

        nonfinite = (scores.valid & ~elig).sum()
        # Eligible difficulties are never NaN (SPEC §4), so NaN encodes "not eligible" losslessly.
        d_local = torch.where(elig, scores.difficulty.to(torch.float32), torch.full_like(zero, float("nan")))
        payload = torch.cat([
            d_local.reshape(-1),
            eligible_sum(stats.confidence),
            eligible_sum(stats.entropy),
            torch.div(nonfinite, _LIMB, rounding_mode="floor").to(torch.float32).reshape(1),
            torch.remainder(nonfinite, _LIMB).to(torch.float32).reshape(1),
        ])
        gathered = torch.empty(world * (N + _PAYLOAD_EXTRA), dtype=torch.float32, device=dev)
        _all_gather_single(gathered, payload, group=group)
        gathered = gathered.view(world, N + _PAYLOAD_EXTRA)

        global_shape = (world * tok_shape[0], tok_shape[1]) if len(tok_shape) == 2 else (world * N,)
        d_g = gathered[:, :N].reshape(global_shape)
        e_g = ~torch.isnan(d_g)
        n_g = e_g.sum()
        denom = torch.clamp(n_g, min=1).to(torch.float32)
        extra = gathered[:, N:]
        avg_conf = extra[:, 0].sum() / denom          # rank-order sum: bit-identical on every rank
        avg_entropy = extra[:, 1].sum() / denom
        nonfinite_g = (extra[:, 2].to(torch.int64) * _LIMB + extra[:, 3].to(torch.int64)).sum()
        avg_difficulty = torch.where(e_g, d_g, zero).sum(dtype=torch.float32) / denom

        base_t = as_ratio_tensor(base, dev)
        ratio = effective_ratio(base, avg_conf, cfg)
        mask_g, _k = select_tokens(d_g, e_g, ratio, selection=cfg.selection, num_strata=cfg.num_strata,
                                   min_tokens_per_sequence=cfg.min_tokens_per_sequence)
        count_g = mask_g.sum()
        mask = mask_g.reshape(world, N)[rank].reshape(tok_shape)
        row_ok = row_finite(stats, has_targets=True)

    total = selected_cross_entropy(logits, targets, mask, row_ok, scores.valid, base_loss)
    denom_sel = torch.clamp(count_g, min=1).to(torch.float32)
    share = total * float(world) / denom_sel
    with torch.no_grad():
        total_g = total.detach().clone()
        dist.all_reduce(total_g, op=dist.ReduceOp.SUM, group=group)
        global_loss = total_g / denom_sel
    loss = (share - share.detach()) + global_loss  # value: the global loss; gradient: this rank's share

    metrics = {
        "step": as_step_tensor(step, dev),
        "token_ratio": base_t,
        "effective_ratio": ratio.detach(),
        "tokens_selected": count_g,
        "tokens_total": n_g,
        "tokens_nonfinite": nonfinite_g,
        "tokens_out_of_range": torch.zeros((), dtype=torch.int64, device=dev),
        "avg_confidence": avg_conf,
        "avg_entropy": avg_entropy,
        "avg_difficulty": avg_difficulty,
        "sample_ess": count_g.to(torch.float32),   # SPEC §10: unweighted selection (sampled is refused)
        "tokens_selected_local": mask.sum(),
        "world_size": torch.full((), world, dtype=torch.int64, device=dev),
    }
    return loss, metrics


def _world_size_or_one(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _local_forward(logits: torch.Tensor, targets: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
                   cfg: CGGRConfig,
                   base_loss: Optional[Callable[..., torch.Tensor]],
                   group: Optional[dist.ProcessGroup], reference_nll: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPEC §13 local scope: the single-device loss of this rank's shard (no communication)."""
    loss, metrics = forward_reference(logits, targets, step, base, cfg, base_loss, reference_nll)
    dev = logits.device
    world = _world_size_or_one(group)
    metrics["tokens_selected_local"] = metrics["tokens_selected"]
    metrics["world_size"] = torch.full((), world, dtype=torch.int64, device=dev)
    return loss, metrics


def cggr_loss(logits: torch.Tensor, targets: torch.Tensor, step: Union[int, torch.Tensor], *, scope: str = "global",
              process_group: Optional[dist.ProcessGroup] = None, check_consistency: bool = True,
              scoring: str = CGGRConfig.scoring, selection: str = CGGRConfig.selection,
              dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
              threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
              min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
              num_strata: int = CGGRConfig.num_strata,
              min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
              base_loss: Optional[Callable[..., torch.Tensor]] = None, ignore_index: int = CGGRConfig.ignore_index,
              ratio_schedule: Optional[Schedule] = None, config: Optional[CGGRConfig] = None,
              reference_nll: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Data-parallel functional CGGR loss at curriculum ``step`` (a host integer, or a 0-d integer tensor on
    the logits' device - the form for torch.compile): ``(loss, metrics)``.

    Called by every rank of ``process_group`` with its own shard ``logits`` ``(B, T, V)`` / ``(N, V)`` and
    ``targets`` ``(B, T)`` / ``(N,)``. ``scope="global"`` selects over the concatenation of all ranks' tokens
    (see the module docstring for the formulas); the returned loss has the value of the global loss on every
    rank and the gradient ``W · Σ_{selected on this rank} ∇ce / |selected globally|``, so that the gradient
    average of DDP/FSDP equals the single-device gradient on the concatenated batch. ``scope="local"`` is
    :func:`cggr_torch.cggr_loss` on the shard (no communication). ``metrics`` maps the SPEC §10 numeric keys
    plus ``tokens_selected_local`` (this rank's selected tokens) and ``world_size`` to 0-d tensors; with
    ``scope="global"`` every key except ``tokens_selected_local`` is the global value, identical on all ranks.

    Args:
        scope: ``"global"`` or ``"local"``.
        process_group: the data-parallel group (default: the default group); needed for ``"global"``.
        check_consistency: gather 6 int64 per rank and check that all ranks pass the same logits shape, step
            and base ratio (``ValueError`` for CPU tensors, a device assertion for CUDA tensors).
        reference_nll: with ``scoring='excess'`` (and only then) this rank's reference per-token loss, of
            the local ``targets``' shape (SPEC §3.1).
        Other arguments: as :class:`cggr_torch.CGGRLoss`.

    Raises:
        ValueError: an unknown ``scope``, an uninitialised ``torch.distributed`` with ``scope="global"``, bad
            inputs (as :func:`cggr_torch.cggr_loss`), or (CPU) ranks whose shapes/steps differ.
    """
    _check_scope(scope)
    if not isinstance(check_consistency, bool):
        raise ValueError(f"check_consistency: expected a bool, got {type(check_consistency).__name__}")
    cfg = resolve_config(config, dict(
        scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
        threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
        num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index))
    reject_sampled_selection(cfg, "cggr_torch.distributed.cggr_loss")
    check_base_loss(base_loss)
    schedule = check_schedule(ratio_schedule, cfg)
    if not isinstance(step, torch.Tensor):
        host_step(step)
    targets = validate_inputs(logits, targets, cfg.ignore_index)
    ref = check_reference_nll(reference_nll, cfg.scoring, tuple(targets.shape), device=logits.device)
    s = step_tensor(step, logits.device)
    base = base_ratio_tensor(schedule, s, host=None if isinstance(step, torch.Tensor) else (lambda: int(step)))
    if scope == "local":
        return _local_forward(logits, targets, s, base, cfg, base_loss, process_group, ref)
    return _global_forward(logits, targets, s, base, cfg, base_loss, process_group, check_consistency, ref)


class DistributedCGGRLoss(CGGRLoss):
    """:class:`cggr_torch.CGGRLoss` for data-parallel training (DDP, FSDP; SPEC §13).

    Same constructor, ``forward``, ``step()``, ``get_metrics()`` and ``state_dict()`` as ``CGGRLoss``, plus:

    Args:
        scope: ``"global"`` (default): select over the whole data-parallel batch; ``"local"``: every rank
            selects within its own shard (exactly ``CGGRLoss``, no communication).
        process_group: the data-parallel process group (``None``: the default group).
        check_consistency: check on every call that all ranks pass the same shape and step (one tiny gather).
        **kwargs: the arguments of :class:`cggr_torch.CGGRLoss`.

    With ``scope="global"`` the returned loss has the value of the global loss (identical on every rank) and
    the gradient of ``W · Σ_{selected on this rank} ce / |selected globally|``; DDP/FSDP's gradient average is
    then the single-device gradient on the concatenated batch. ``get_metrics()`` reports global values plus
    ``tokens_selected_local``, ``world_size`` and ``scope``. Call ``step()`` on every rank.
    """

    def __init__(self, *args: Any, scope: str = "global", process_group: Optional[dist.ProcessGroup] = None,
                 check_consistency: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reject_sampled_selection(self.config, "DistributedCGGRLoss")
        self._scope = _check_scope(scope)
        if not isinstance(check_consistency, bool):
            raise ValueError(f"check_consistency: expected a bool, got {type(check_consistency).__name__}")
        self._check_consistency = check_consistency
        self.process_group = process_group

    @property
    def scope(self) -> str:
        return self._scope

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selective loss of this rank's shard (float32 scalar). Never synchronises with a CUDA device.
        ``reference_nll``: this rank's reference loss of the targets' shape (``scoring='excess'``, SPEC §3.1)."""
        targets = validate_inputs(logits, targets, self.config.ignore_index)
        ref = check_reference_nll(reference_nll, self.config.scoring, tuple(targets.shape), device=logits.device)
        step, base = self.base_ratio_on(logits.device)
        if self._scope == "local":
            loss, metrics = _local_forward(logits, targets, step, base, self.config, self.base_loss,
                                           self.process_group, ref)
        else:
            loss, metrics = _global_forward(logits, targets, step, base, self.config, self.base_loss,
                                            self.process_group, self._check_consistency, ref)
        self._metrics = metrics
        return loss

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last ``forward`` (global values with ``scope="global"``), plus
        ``tokens_selected_local``, ``world_size`` and ``scope``. This call synchronises."""
        out = super().get_metrics()
        if self._metrics is None:
            out["tokens_selected_local"] = 0
            out["world_size"] = _world_size_or_one(self.process_group)
        else:
            for key in DISTRIBUTED_METRIC_KEYS:
                out[key] = self._metrics[key].item()
        out["scope"] = self._scope
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scope={self._scope!r}"

