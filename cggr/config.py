"""One configuration for every CGGR entry point of both packages (SPEC §3, §4, §5, §7, §9).

:class:`CGGRConfig` is a frozen, hashable dataclass of the settings the seed docs name plus ``ignore_index``.
It is validated once, in ``__post_init__``, with the same ``ValueError`` messages in PyTorch and JAX; the loss,
the fused LM head, the distributed loss, batch splitting and the scorer of both packages all build one and read
their settings from it, so a setting's name, default and rule are written here and nowhere else.

Pure Python: importing this module imports neither torch nor jax.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

__all__ = [
    "SCORING_MODES",
    "REFERENCE_SCORING_MODES",
    "check_reference_arguments",
    "check_sequence_reference_arguments",
    "reject_reference_scoring",
    "reject_sampled_selection",
    "check_sampling_parameters",
    "SAMPLED_SELECTIONS",
    "SELECTION_STRATEGIES",
    "SEQUENCE_SELECTIONS",
    "CONFIG_FIELDS",
    "CGGRConfig",
    "ROUTER_POSITIONS_ALL",
    "RouterPositions",
    "check_ratio_value",
    "is_int",
    "is_real",
]

#: SPEC §3: the difficulty of a token.
SCORING_MODES: tuple[str, ...] = ("entropy", "margin", "loss", "combined", "excess")
#: SPEC §3.1: the modes whose difficulty subtracts a caller-given per-token reference loss (``reference_nll``).
REFERENCE_SCORING_MODES: tuple[str, ...] = ("excess",)
#: SPEC §7: how the ``k`` hardest tokens are chosen.
SELECTION_STRATEGIES: tuple[str, ...] = ("topk", "stratified", "sequence_aware", "fixed_quota", "sampled")
#: SPEC §7.4: the strategies that draw tokens at random and weight their losses (Horvitz–Thompson).
SAMPLED_SELECTIONS: tuple[str, ...] = ("sampled",)
#: SPEC §9: batch splitting selects whole sequences; the per-token strategies have no meaning there. ``sampled``
#: draws whole sequences with Horvitz–Thompson weights (SPEC §9.2).
SEQUENCE_SELECTIONS: tuple[str, ...] = ("topk", "fixed_quota", "sampled")


def is_real(x: Any) -> bool:
    """A real Python/NumPy number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x: Any) -> bool:
    """An integral Python/NumPy number that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_ratio_value(name: str, value: Any) -> float:
    """A host number in ``(0, 1]`` (SPEC §5.1), returned as a Python float; ``ValueError`` naming ``name``."""
    if not is_real(value):
        raise ValueError(f"{name}: expected a number in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a number in (0, 1], got {value}")
    return value


def check_reference_arguments(scoring: str, reference_shape: Any, targets_shape: Any, *,
                              has_targets: bool = True, name: str = "reference_nll") -> None:
    """SPEC §3.1's static argument rules for ``reference_nll`` (``reference_shape``: its shape, or None when the
    caller passed none). Shared by both packages so that the messages are the same; ``ValueError`` naming
    ``name``. Dtype checks are the framework's (they need its dtypes)."""
    needs = scoring in REFERENCE_SCORING_MODES
    if needs and reference_shape is None:
        raise ValueError(f"{name}: scoring={scoring!r} needs a per-token reference loss of the targets' shape "
                         f"{tuple(targets_shape) if targets_shape is not None else '(targets)'}, got None")
    if not needs and reference_shape is not None:
        # A reference that no formula reads would be silently ignored: refuse it.
        raise ValueError(f"{name}: only scoring='excess' reads a reference loss; got one with scoring={scoring!r}")
    if needs and not has_targets:
        raise ValueError(f"targets: scoring={scoring!r} needs targets (nll − reference_nll), got None")
    if needs and tuple(reference_shape) != tuple(targets_shape):
        raise ValueError(f"{name}: expected shape {tuple(targets_shape)} (the targets' shape), got "
                         f"{tuple(reference_shape)}")


def check_sequence_reference_arguments(scoring: str, reference: Any, batch_shape: Any, *, array_type: type,
                                       kind: str = "tensor", hint: str = "") -> bool:
    """SPEC §9.1's static rules for batch splitting's ``reference_nll``, shared by both packages so that the messages
    are the same (``ValueError`` naming it). Returns whether a reference is to be read: False when none is given
    and none is needed. ``array_type``: the framework's array type(s); ``kind`` names it in the message; ``hint``
    is appended to the missing-reference error. Dtype, device and rounding are the framework's (SPEC §3.1)."""
    B, T = (int(s) for s in batch_shape)
    forms = f"(B, T) = {(B, T)} per token (aligned like the unshifted labels) or (B,) = {(B,)} per sequence"
    needs = scoring in REFERENCE_SCORING_MODES
    if reference is None:
        if needs:
            raise ValueError(f"reference_nll: scoring={scoring!r} needs the reference model's loss, {forms}; "
                             f"got None{hint}")
        return False
    if not needs:
        # A reference that no formula reads would be silently ignored: refuse it.
        raise ValueError(f"reference_nll: only scoring='excess' reads a reference loss; got one with "
                         f"scoring={scoring!r}")
    if not isinstance(reference, array_type):
        raise ValueError(f"reference_nll: expected a floating {kind}, {forms}; got {type(reference).__name__}")
    shape = tuple(reference.shape)
    if shape not in ((B, T), (B,)):
        raise ValueError(f"reference_nll: expected shape {forms}; got {shape}")
    return True


def reject_reference_scoring(config: "CGGRConfig", caller: str) -> None:
    """SPEC §3.1: the entry points that do not take ``reference_nll`` yet refuse ``scoring='excess'`` at once
    (instead of failing later, or scoring without the reference)."""
    if config.scoring in REFERENCE_SCORING_MODES:
        raise ValueError(f"scoring: {config.scoring!r} is not supported yet by {caller}; issue 14 (use "
                         f"CGGRLoss / cggr_loss / score_tokens with reference_nll=)")


def check_sampling_parameters(power: Any, uniform_mix: Any, floor: Any, seed: Any = 0, *,
                              prefix: str = "") -> tuple[float, float, float, int]:
    """SPEC §7.4's parameter rules, shared by ``CGGRConfig`` (``prefix='sample_'``) and the ``sample_tokens``
    functions of both packages (no prefix): ``power`` β finite ``>= 0``, ``uniform_mix`` λ in ``[0, 1]``,
    ``floor`` ε finite ``> 0``, ``seed`` an integer in ``[0, 2^32)``. Returns them as Python numbers."""
    if not is_real(power) or not math.isfinite(float(power)) or float(power) < 0:
        raise ValueError(f"{prefix}power: expected a finite number >= 0, got {power!r}")
    if not is_real(uniform_mix) or not (0.0 <= float(uniform_mix) <= 1.0):
        raise ValueError(f"{prefix}uniform_mix: expected a number in [0, 1], got {uniform_mix!r}")
    if not is_real(floor) or not math.isfinite(float(floor)) or float(floor) <= 0:
        raise ValueError(f"{prefix}floor: expected a finite number > 0, got {floor!r}")
    if not is_int(seed) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"{prefix}seed: expected an integer in [0, 2**32), got {seed!r}")
    return float(power), float(uniform_mix), float(floor), int(seed)


def reject_sampled_selection(config: "CGGRConfig", caller: str) -> None:
    """SPEC §7.4: the entry points whose loss has no per-token weights yet refuse ``selection='sampled'`` at
    once (an unweighted mean over a random sample would be a silently wrong loss)."""
    if config.selection in SAMPLED_SELECTIONS:
        raise ValueError(f"selection: {config.selection!r} is not supported yet by {caller} (use CGGRLoss / "
                         f"cggr_loss for it, SPEC §7.4)")


@dataclasses.dataclass(frozen=True)
class CGGRConfig:
    """The settings of CGGR (seed docs "Configuration Reference"; SPEC §3–§7).

    Attributes:
        scoring: the difficulty of SPEC §3, one of :data:`SCORING_MODES`.
        selection: the strategy of SPEC §7, one of :data:`SELECTION_STRATEGIES` (batch splitting accepts only
            :data:`SEQUENCE_SELECTIONS`; see :meth:`for_sequences`).
        dynamic_threshold: raise the kept ratio on low-confidence batches (SPEC §5.2).
        threshold_sensitivity: how strongly (``>= 0``).
        min_tokens_ratio: the curriculum's final ratio, in ``(0, 1]`` (SPEC §5.1).
        warmup_steps: steps from ratio 1 to ``min_tokens_ratio`` (``>= 0``; 0 = no curriculum).
        num_strata: strata of ``stratified`` (``>= 1``).
        min_tokens_per_sequence: the per-sequence floor of ``sequence_aware`` (``>= 0``).
        ignore_index: the target value that marks a position without a target (SPEC §4).
        sample_power: ``β >= 0`` of ``selection='sampled'`` (SPEC §7.4): inclusion ∝ ``(max(d, 0) + ε)^β``
            (0 = uniform sampling).
        sample_uniform_mix: ``λ ∈ [0, 1]``, the uniform share mixed into the sampling distribution (SPEC §7.4).
        sample_floor: ``ε > 0``, added to the difficulty before the power (SPEC §7.4).
        sample_seed: integer in ``[0, 2^32)``, the seed of the counter-based hash of SPEC §7.4.

    The default ``selection`` is ``"stratified"``, that of ``CGGRLoss``; batch splitting's default is ``"topk"``
    (:data:`DEFAULT_SEQUENCE_SELECTION`).
    """

    scoring: str = "combined"
    selection: str = "stratified"
    dynamic_threshold: bool = True
    threshold_sensitivity: float = 0.5
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    ignore_index: int = -100
    sample_power: float = 1.0
    sample_uniform_mix: float = 0.1
    sample_floor: float = 1e-6
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {SCORING_MODES}, got {self.scoring!r}")
        if self.selection not in SELECTION_STRATEGIES:
            raise ValueError(f"selection: expected one of {SELECTION_STRATEGIES}, got {self.selection!r}")
        if not isinstance(self.dynamic_threshold, bool):
            raise ValueError(f"dynamic_threshold: expected a bool, got {type(self.dynamic_threshold).__name__}")
        s = self.threshold_sensitivity
        if not is_real(s) or not math.isfinite(float(s)) or float(s) < 0:
            raise ValueError(f"threshold_sensitivity: expected a finite number >= 0, got {s!r}")
        check_ratio_value("min_tokens_ratio", self.min_tokens_ratio)
        if not is_int(self.warmup_steps) or int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if not is_int(self.num_strata) or int(self.num_strata) < 1:
            raise ValueError(f"num_strata: expected an integer >= 1, got {self.num_strata!r}")
        if not is_int(self.min_tokens_per_sequence) or int(self.min_tokens_per_sequence) < 0:
            raise ValueError(
                f"min_tokens_per_sequence: expected an integer >= 0, got {self.min_tokens_per_sequence!r}")
        if not is_int(self.ignore_index):
            raise ValueError(f"ignore_index: expected an integer, got {self.ignore_index!r}")
        check_sampling_parameters(self.sample_power, self.sample_uniform_mix, self.sample_floor,
                                  self.sample_seed, prefix="sample_")
        # Normalise NumPy scalars to Python numbers so that equal configs hash equal (jit static arguments).
        for name, kind in (("threshold_sensitivity", float), ("min_tokens_ratio", float), ("warmup_steps", int),
                           ("num_strata", int), ("min_tokens_per_sequence", int), ("ignore_index", int),
                           ("sample_power", float), ("sample_uniform_mix", float), ("sample_floor", float),
                           ("sample_seed", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def uses_dynamic_threshold(self) -> bool:
        """SPEC §5.2: the threshold applies unless it is off or the selection is ``fixed_quota``."""
        return self.dynamic_threshold and self.selection != "fixed_quota"

    def for_sequences(self) -> "CGGRConfig":
        """This config, checked for batch splitting (SPEC §9): ``selection`` must select whole sequences."""
        if self.selection not in SEQUENCE_SELECTIONS:
            raise ValueError(f"selection: batch splitting selects whole sequences and supports "
                             f"{SEQUENCE_SELECTIONS} (SPEC §9); {self.selection!r} selects tokens, use CGGRLoss "
                             f"for it")
        return self

    def replace(self, **changes: Any) -> "CGGRConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, caller: str = "config") -> "CGGRConfig":
        """Build from keyword settings; an unknown name is a ``ValueError`` naming it and the caller."""
        unknown = sorted(set(kwargs) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"{caller}: unknown setting(s) {unknown}; expected a subset of {CONFIG_FIELDS}")
        return cls(**kwargs)


#: The setting names, in the order of the dataclass (and of the seed docs' constructor).
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CGGRConfig))
#: Batch splitting's default selection (SPEC §9).
DEFAULT_SEQUENCE_SELECTION = "topk"


#: ``router_positions`` value that scores every router position (SPEC §9.3), the default.
ROUTER_POSITIONS_ALL = "all"


@dataclasses.dataclass(frozen=True)
class RouterPositions:
    """Which positions a batch-splitting router reads and scores (SPEC §9.3), validated once for both packages.

    Attributes:
        router_positions: ``"all"`` (default) or an integer stride ``s >= 1``: score the candidate positions
            ``t = 0, s, 2s, …``.
        router_samples: ``None`` (default) or an integer ``m >= 1``: score ``m`` positions evenly spaced over the
            candidates, ``t_j = ⌊j·L/m⌋`` (all ``L`` when ``m >= L``). Exclusive with a stride.
        router_prefix: ``None`` (default) or an integer ``P >= 1``: the router reads only the first ``min(P, T)``
            columns of the batch; the candidates are the positions it reads that have a target.

    The positions depend on the batch's ``T`` and these settings only (never on the data), so they are static
    under ``jit``/``torch.compile``. ``ValueError`` naming the argument on bad values.
    """

    router_positions: Any = ROUTER_POSITIONS_ALL
    router_samples: Any = None
    router_prefix: Any = None

    def __post_init__(self) -> None:
        stride = self.router_positions
        if not (stride == ROUTER_POSITIONS_ALL if isinstance(stride, str) else is_int(stride) and int(stride) >= 1):
            raise ValueError(f"router_positions: expected {ROUTER_POSITIONS_ALL!r} or an integer stride >= 1, "
                             f"got {stride!r}")
        for name in ("router_samples", "router_prefix"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or int(value) < 1):
                raise ValueError(f"{name}: expected None or an integer >= 1, got {value!r}")
        if self.router_samples is not None and stride != ROUTER_POSITIONS_ALL:
            raise ValueError(f"router_samples: a sample of positions and a stride (router_positions={stride!r}) "
                             f"exclude each other; give one of them")
        # Normalise NumPy integers so that equal settings hash equal (jit static arguments).
        for name in ("router_positions", "router_samples", "router_prefix"):
            value = getattr(self, name)
            if is_int(value):
                object.__setattr__(self, name, int(value))

    @property
    def is_full(self) -> bool:
        """True for the defaults: the router reads and scores every position (SPEC §9 unchanged)."""
        return (self.router_positions == ROUTER_POSITIONS_ALL and self.router_samples is None
                and self.router_prefix is None)

    def read_length(self, seq_len: int) -> int:
        """``R = min(P, T)``: the columns of a ``(B, T)`` batch that the router reads (``T`` without a prefix)."""
        return int(seq_len) if self.router_prefix is None else min(int(self.router_prefix), int(seq_len))

    def candidates(self, seq_len: int, shift: bool = True) -> int:
        """``L``: the router positions with a target, ``min(R, T − 1)`` for a causal router (``shift``), else
        ``R`` (SPEC §9.3)."""
        read = self.read_length(seq_len)
        return max(0, min(read, int(seq_len) - 1)) if shift else read

    def scored(self, seq_len: int, shift: bool = True) -> tuple[int, ...] | None:
        """The scored router positions ``t`` (ascending; position ``t`` predicts ``labels[:, t+1]`` when
        ``shift``, ``labels[:, t]`` otherwise), or None when they are all ``T`` input positions of SPEC §9
        (the defaults: nothing to gather)."""
        if self.is_full:
            return None
        L = self.candidates(seq_len, shift)
        if self.router_samples is not None:
            m = self.router_samples
            return tuple(range(L)) if m >= L else tuple(j * L // m for j in range(m))
        step = 1 if self.router_positions == ROUTER_POSITIONS_ALL else self.router_positions
        return tuple(range(0, L, step))
