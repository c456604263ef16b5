"""The ratio of tokens kept: curriculum, dynamic threshold and the integer ``k`` (SPEC §5).

* :func:`linear_warmup_ratio` runs on the host in NumPy float32 from a Python-int step (no device work);
* :func:`dynamic_ratio` runs on the device (the mean confidence is a device tensor; no synchronisation);
* :func:`num_selected` computes ``k`` exactly in integers on the device (int64 arithmetic, an int32 result)
  or in Python for host numbers;
* :class:`Curriculum` is the curriculum *state* of every stateful entry point (``CGGRLoss``, the fused LM head
  and the distributed loss, which derive from it, ``CGGRScorer`` and ``CGGRModel``): the step counter, the
  ratio schedule, ``step()``/``set_step()`` and the ``state_dict`` extra state, in one place.

The compile contract (SPEC §12.1): the losses' forward reads the step only as a *tensor* (the module's
``curriculum_step`` buffer, advanced in place by :meth:`Curriculum.step`) and computes the default schedule's
ratio from it with :func:`base_ratio_tensor` - the custom op ``cggr::linear_warmup_ratio`` (and
``cggr::dynamic_ratio`` for SPEC §5.2), whose implementation is the float32 formula one torch op per
rounding. A custom op is opaque to the compiler, so ``torch.compile`` can neither contract ``1 − t·s`` into a
fused multiply-add nor rewrite ``s / w`` as ``s·(1/w)``: the compiled ratio is bit-identical to the NumPy
reference (:class:`LinearWarmupSchedule`), there is no host synchronisation and no recompilation as the step
moves. The NumPy form stays the documented reference and the host form (``get_metrics``, the scorer).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch

from . import dispatch
from .utils import check_ratio_value

__all__ = ["linear_warmup_ratio", "LinearWarmupSchedule", "dynamic_ratio", "num_selected", "RATIO_SCALE",
           "host_step", "base_ratio", "Curriculum", "Schedule", "step_tensor", "linear_warmup_ratio_tensor",
           "base_ratio_tensor"]

#: A ratio schedule: ``step -> ratio`` (a host number in ``(0, 1]``).
Schedule = Callable[[int], Any]

#: ``ratio`` is quantised to 16 fractional bits before ``k`` is computed (SPEC §5.3).
RATIO_SCALE = 65536

Number = Union[int, float, np.floating, np.integer]

_F32 = np.float32


def host_step(step: object) -> int:
    """A non-negative integer step from an int, a NumPy integer or a CPU integer 0-d tensor."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype == torch.bool:
            raise ValueError(f"step: expected an integer scalar, got a tensor of dtype {step.dtype} and shape "
                             f"{tuple(step.shape)}")
        if step.device.type != "cpu":
            raise ValueError(f"step: expected a host integer; reading a {step.device} tensor would synchronise")
        step = int(step)
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    if int(step) < 0:
        raise ValueError(f"step: expected an integer >= 0, got {int(step)}")
    return int(step)


class LinearWarmupSchedule:
    """The default curriculum of SPEC §5.1 as a picklable callable ``step -> np.float32``.

    ::

        base(step) = 1 ⊖ (min(1, f32(step) ⊘ f32(warmup_steps)) ⊗ (1 ⊖ min_tokens_ratio))
        base(step) = min_tokens_ratio                      if warmup_steps = 0

    in IEEE float32 (NumPy scalars, on the host).
    """

    def __init__(self, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000) -> None:
        check_ratio_value("min_tokens_ratio", min_tokens_ratio)
        if not isinstance(warmup_steps, numbers.Integral) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
        self.min_tokens_ratio = _F32(min_tokens_ratio)
        self.min_ratio = float(self.min_tokens_ratio)  # the same value as a Python float (the tensor form's)
        self.warmup_steps = int(warmup_steps)

    def __setstate__(self, state: dict) -> None:
        # Schedules pickled before the tensor form existed lack ``min_ratio``.
        self.__dict__.update(state)
        self.__dict__.setdefault("min_ratio", float(self.min_tokens_ratio))

    def __call__(self, step: int) -> np.float32:
        s = host_step(step)
        if self.warmup_steps == 0:
            return self.min_tokens_ratio
        one = _F32(1.0)
        frac = min(one, _F32(_F32(s) / _F32(self.warmup_steps)))
        return _F32(one - _F32(frac * _F32(one - self.min_tokens_ratio)))

    def __repr__(self) -> str:
        return (f"LinearWarmupSchedule(min_tokens_ratio={float(self.min_tokens_ratio)}, "
                f"warmup_steps={self.warmup_steps})")


def linear_warmup_ratio(min_tokens_ratio: float = 0.25, warmup_steps: int = 1000) -> LinearWarmupSchedule:
    """The default curriculum (SPEC §5.1) as a schedule ``step -> np.float32``::

        base(step) = 1 ⊖ (min(1, f32(step) ⊘ f32(warmup_steps)) ⊗ (1 ⊖ min_tokens_ratio))
        base(step) = min_tokens_ratio                      if warmup_steps = 0

    in IEEE float32 (NumPy scalars). Warmup 1000, min 0.25: step 0 → 1, step 500 → 0.625, ≥ 1000 → 0.25.

    Raises:
        ValueError: ``min_tokens_ratio`` outside ``(0, 1]`` or ``warmup_steps`` not an integer >= 0 (now);
            a negative or non-integer ``step`` (when the schedule is called).
    """
    return LinearWarmupSchedule(min_tokens_ratio, warmup_steps)


def step_tensor(step: Union[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The curriculum step as a 0-d int64 tensor on ``device`` (SPEC §5.4) without reading a device tensor.

    A host integer is checked (``>= 0``) and written by a fill kernel (no host-to-device copy); an integer
    0-d tensor is taken as it is (its value is not read: a CPU tensor is checked eagerly outside
    ``torch.compile``, a device tensor never). Pass a tensor already on ``device``: another device costs a copy.

    Raises:
        ValueError: a negative or non-integer host step, a floating/bool or non-scalar tensor, a negative CPU
            tensor (eager).
    """
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype == torch.bool or step.is_complex():
            raise ValueError(f"step: expected an integer scalar, got a tensor of dtype {step.dtype} and shape "
                             f"{tuple(step.shape)}")
        if step.device.type == "cpu" and not torch.compiler.is_compiling() and bool(step.reshape(()) < 0):
            raise ValueError(f"step: expected an integer >= 0, got {int(step)}")
        return step.reshape(()).to(device=device, dtype=torch.int64)
    return torch.full((), host_step(step), dtype=torch.int64, device=device)


@torch.library.custom_op("cggr::linear_warmup_ratio", mutates_args=())
def _linear_warmup_op(step: torch.Tensor, min_tokens_ratio: float, warmup_steps: int) -> torch.Tensor:
    # One torch op per rounding of SPEC §5.1, each a correctly rounded float32 operation (the op is opaque to
    # torch.compile, which would otherwise be free to contract or reorder them).
    f32 = torch.float32
    r_min = torch.full((), min_tokens_ratio, dtype=f32, device=step.device)   # rounded to float32
    if warmup_steps == 0:
        return r_min
    one = torch.ones((), dtype=f32, device=step.device)
    # f32(step): int64 → float32 rounds to nearest (exact below 2^24), as NumPy's float32(int).
    w = torch.full((), float(warmup_steps), dtype=f32, device=step.device)     # f32(warmup_steps)
    frac = torch.minimum(one, torch.div(step.to(f32), w))
    return torch.sub(one, torch.mul(frac, torch.sub(one, r_min)))


@_linear_warmup_op.register_fake
def _(step: torch.Tensor, min_tokens_ratio: float, warmup_steps: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=step.device)


@torch.library.custom_op("cggr::dynamic_ratio", mutates_args=())
def _dynamic_ratio_op(base: torch.Tensor, mean_confidence: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    # SPEC §5.2 one rounding per op (opaque to torch.compile: no fused multiply-add).
    one = torch.ones((), dtype=torch.float32, device=mean_confidence.device)
    adj = torch.mul(torch.sub(one, mean_confidence), sensitivity)
    return torch.clamp(torch.mul(base, torch.add(adj, one)), max=1.0)


@_dynamic_ratio_op.register_fake
def _(base: torch.Tensor, mean_confidence: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=mean_confidence.device)


def linear_warmup_ratio_tensor(step: torch.Tensor, min_tokens_ratio: float, warmup_steps: int) -> torch.Tensor:
    """SPEC §5.1 on a 0-d integer step tensor: a 0-d float32 tensor on the step's device, bit-identical to
    :func:`linear_warmup_ratio` (the NumPy reference) at the same step. No synchronisation; under
    ``torch.compile`` one graph serves every step (the custom op ``cggr::linear_warmup_ratio``)."""
    # The op rounds min_tokens_ratio to float32 itself (torch.full), as NumPy's float32() does: no NumPy here,
    # which torch.compile would trace.
    return _linear_warmup_op(step.reshape(()).to(torch.int64), float(min_tokens_ratio), int(warmup_steps))


@torch.compiler.disable
def _host_schedule_value(schedule: Schedule, step: torch.Tensor, host: Optional[Callable[[], int]]
                         ) -> torch.Tensor:
    # A user schedule maps a host step to a host number: it runs outside the graph (a graph break under
    # torch.compile, never a recompilation: the host step is read here and the value returns as a tensor,
    # so neither becomes a constant of a graph).
    s = host() if host is not None else host_step(step.cpu())
    return torch.full((), float(base_ratio(schedule, s)), dtype=torch.float32, device=step.device)


def base_ratio_tensor(schedule: Schedule, step: torch.Tensor, host: Optional[Callable[[], int]] = None
                      ) -> torch.Tensor:
    """``base(step)`` (SPEC §5.1) as a 0-d float32 tensor on the step tensor's device.

    The default schedule (:class:`LinearWarmupSchedule`) is computed from ``step`` with torch ops
    (:func:`linear_warmup_ratio_tensor`): no synchronisation, no graph break. Any other callable is a host
    function ``int -> number``: it is called with ``host()`` (the host step; ``int(step)`` when None, which
    reads the tensor) outside the compiled graph - a graph break under ``torch.compile`` - and checked to lie
    in ``(0, 1]``.
    """
    if type(schedule) is LinearWarmupSchedule:   # a subclass may override __call__: a host schedule then
        return linear_warmup_ratio_tensor(step, schedule.min_ratio, schedule.warmup_steps)
    return _host_schedule_value(schedule, step, host)


def _as_f32_tensor(x: Union[torch.Tensor, Number], device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(x.shape)}")
        return x.reshape(()).to(device=device, dtype=torch.float32)
    # torch.full writes the value in a kernel (no host-to-device copy, no synchronisation) and rounds it to
    # float32 to nearest, as NumPy's float32() does (no NumPy here: torch.compile would trace it).
    return torch.full((), float(x), dtype=torch.float32, device=device)


def _device_of(*xs: object) -> torch.device:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def dynamic_ratio(base_ratio: Union[torch.Tensor, Number], mean_confidence: Union[torch.Tensor, Number],
                  threshold_sensitivity: Union[torch.Tensor, Number]) -> torch.Tensor:
    """SPEC §5.2 in float32 on the device of the tensor arguments (CPU when there is none)::

        ratio = min(1, base ⊗ (1 ⊕ ((1 ⊖ c̄) ⊗ threshold_sensitivity)))

    Each operation is a separate float32 tensor op. Returns a 0-d float32 tensor. The docs' table
    (base 0.25, sensitivity 0.5): c̄ = 0.3 / 0.7 / 0.9 → 0.3375 / 0.2875 / 0.2625.

    Raises:
        ValueError: a host ``threshold_sensitivity`` that is negative or not finite, or a non-scalar tensor.
    """
    if not isinstance(threshold_sensitivity, torch.Tensor):
        if not isinstance(threshold_sensitivity, numbers.Real) or isinstance(threshold_sensitivity, bool) \
                or not math.isfinite(float(threshold_sensitivity)) or float(threshold_sensitivity) < 0:
            raise ValueError(f"threshold_sensitivity: expected a finite number >= 0, got {threshold_sensitivity!r}")
    dev = _device_of(mean_confidence, base_ratio, threshold_sensitivity)
    base = _as_f32_tensor(base_ratio, dev)
    conf = _as_f32_tensor(mean_confidence, dev)
    sens = _as_f32_tensor(threshold_sensitivity, dev)
    # One float32 op per rounding inside the custom op cggr::dynamic_ratio (opaque to torch.compile).
    return _dynamic_ratio_op(base, conf, sens)


def num_selected(n: Union[torch.Tensor, int], ratio: Union[torch.Tensor, Number]) -> Union[torch.Tensor, int]:
    """``k``, the number of tokens kept (SPEC §5.3), exactly in integers::

        r_q = round_half_even(f32(ratio) ⊗ 65536)
        k   = floor((r_q · n + 32768) / 65536)
        k   = 0 if n = 0,   min(n, max(1, k)) otherwise

    ``ratio = 0.625, n = 256 → 160``; ``ratio = 0.25, n = 10 → 3``.

    Returns a Python ``int`` when ``n`` and ``ratio`` are host numbers, otherwise a 0-d int32 tensor on the
    device of the tensor argument (no synchronisation; a CUDA ratio outside ``(0, 1]`` trips a device
    assertion).

    Raises:
        ValueError: host ``n`` negative or ``>= 2**31``; host (or CPU tensor) ``ratio`` outside ``(0, 1]``.
    """
    if not isinstance(n, torch.Tensor) and not isinstance(ratio, torch.Tensor):
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 0 <= int(n) < 2**31:
            raise ValueError(f"n: expected an integer in [0, 2**31), got {n!r}")
        r = check_ratio_value("ratio", ratio)
        n = int(n)
        if n == 0:
            return 0
        r_q = int(np.round(_F32(_F32(r) * _F32(RATIO_SCALE))))  # exact scaling, round half to even
        return min(n, max(1, (r_q * n + RATIO_SCALE // 2) // RATIO_SCALE))

    dev = _device_of(n, ratio)
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype.is_floating_point or n.dtype == torch.bool:
            raise ValueError(f"n: expected an integer scalar, got dtype {n.dtype} and shape {tuple(n.shape)}")
        n_t = n.reshape(()).to(device=dev, dtype=torch.int64)
    else:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 0 <= int(n) < 2**31:
            raise ValueError(f"n: expected an integer in [0, 2**31), got {n!r}")
        n_t = torch.full((), int(n), dtype=torch.int64, device=dev)
    if isinstance(ratio, torch.Tensor):
        if ratio.numel() != 1 or not ratio.dtype.is_floating_point:
            raise ValueError(f"ratio: expected a floating scalar in (0, 1], got dtype {ratio.dtype} and shape "
                             f"{tuple(ratio.shape)}")
        r_t = ratio.reshape(()).to(device=dev, dtype=torch.float32)
        ok = (r_t > 0) & (r_t <= 1)
        if r_t.device.type == "cuda" or torch.compiler.is_compiling():
            # A compiled graph cannot raise on a value: the check becomes an assertion (RuntimeError).
            torch._assert_async(ok, "ratio: expected a value in (0, 1]")
        elif r_t.device.type == "cpu" and not bool(ok):
            raise ValueError(f"ratio: expected a value in (0, 1], got {float(r_t)}")
    else:
        r_t = torch.full((), float(_F32(check_ratio_value("ratio", ratio))), dtype=torch.float32, device=dev)
    r_q = torch.round(r_t * float(RATIO_SCALE)).to(torch.int64)
    k = torch.div(r_q * n_t + RATIO_SCALE // 2, RATIO_SCALE, rounding_mode="floor")
    k = torch.minimum(n_t, torch.clamp(k, min=1))
    # int64 arithmetic above (r_q·n reaches 2**47); k <= n < 2**31 fits int32, the dtype of k in both packages.
    return torch.where(n_t > 0, k, torch.zeros_like(k)).to(torch.int32)


def base_ratio(schedule: Schedule, step: int) -> np.float32:
    """``base(step)`` of SPEC §5.1 from ``schedule`` as float32, checked to lie in ``(0, 1]`` (host only)."""
    return np.float32(check_ratio_value("ratio_schedule", schedule(step)))


def _config_property(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.config, name)

    get.__doc__ = f"``config.{name}`` (read-only; the configuration is a frozen :class:`cggr.CGGRConfig`)."
    return property(get)


class Curriculum:
    """The curriculum state of a stateful CGGR entry point (a mixin of ``nn.Module`` subclasses).

    The entry point stores its :class:`cggr.CGGRConfig` as ``self.config``; each setting is readable as an
    attribute of the same name (``loss.selection``, ``model.warmup_steps``, ...).

    Holds the step twice, kept equal by :meth:`step` and :meth:`set_step`: a host ``int`` (``current_step``,
    for the host readers - ``get_metrics``, the scorer, the Trainer callback - so reading it costs no
    synchronisation) and the 0-d int64 buffer ``curriculum_step`` that the losses' forward reads (SPEC §12.1:
    under ``torch.compile`` the graph takes the step as a tensor input, so it is compiled once for every
    step). :meth:`step` advances the buffer in place (one tiny kernel, no synchronisation). The buffer is not
    persistent: the step is part of ``state_dict()`` as the module's extra state ``{'step': int}``, so resuming
    from a checkpoint restores the curriculum; :meth:`set_step` sets it (the Hugging Face callback of
    :mod:`cggr_torch.integrations` re-syncs it to the trainer's global step on a resume).

    ``step()`` and ``set_step()`` run eagerly (``torch.compiler.disable``): called inside a compiled function
    they are a graph break, never a recompilation. Call them outside the compiled step (after the optimizer
    step) for a graph without breaks.
    """

    _step: int
    ratio_schedule: Schedule
    curriculum_step: torch.Tensor

    def _init_curriculum(self, min_tokens_ratio: float, warmup_steps: int,
                         ratio_schedule: Optional[Schedule]) -> None:
        if ratio_schedule is None:
            ratio_schedule = linear_warmup_ratio(min_tokens_ratio, warmup_steps)
        elif not callable(ratio_schedule):
            raise ValueError(f"ratio_schedule: expected None or a callable step -> ratio in (0, 1], got "
                             f"{type(ratio_schedule).__name__}")
        self.ratio_schedule = ratio_schedule
        self._step = 0
        if torch.cuda.is_available() and dispatch.kernels_enabled():
            dispatch.preload_kernels()   # torch.compile cannot trace the kernels' import (SPEC §12.1)
        self.register_buffer("curriculum_step", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def current_step(self) -> int:
        """The curriculum step the next forward uses (number of :meth:`step` calls, or as restored/set)."""
        return self._step

    @torch.compiler.disable
    def step(self) -> None:
        """Advance the curriculum by one; call once after each optimizer step."""
        self._step += 1
        with torch.no_grad():
            self.curriculum_step.add_(1)

    @torch.compiler.disable
    def set_step(self, step: int) -> None:
        """Set the curriculum step (e.g. to the trainer's global step when resuming)."""
        self._step = host_step(step)
        with torch.no_grad():
            self.curriculum_step.fill_(self._step)   # a fill kernel: no host-to-device copy

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"state_dict: expected {type(self).__name__} extra state {{'step': int}}, got "
                             f"{state!r}")
        self.set_step(state["step"])

    def base_ratio(self) -> np.float32:
        """``base(step)`` at the current step (SPEC §5.1, or the custom schedule's value, checked; host)."""
        return base_ratio(self.ratio_schedule, self._step)

    def step_on(self, device: torch.device) -> torch.Tensor:
        """The step buffer on ``device`` (0-d int64), for the forward. Outside ``torch.compile`` a buffer on
        another device is moved there once (the module then keeps it there); inside, it is copied per call -
        move the module (``loss.to(device)``) or run one eager call before compiling to avoid the copy."""
        buf = self.curriculum_step
        if buf.device != device:
            buf = buf.to(device)
            if not torch.compiler.is_compiling():
                self.curriculum_step = buf
        return buf

    def base_ratio_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step, base)``: the step buffer and ``base(step)`` (SPEC §5.1) as 0-d tensors on ``device``
        (:func:`base_ratio_tensor`; the default schedule never synchronises nor breaks a compiled graph)."""
        step = self.step_on(device)
        return step, base_ratio_tensor(self.ratio_schedule, step, host=self._host_step)

    def _host_step(self) -> int:
        return self._step


for _name in ("scoring", "selection", "dynamic_threshold", "threshold_sensitivity", "min_tokens_ratio",
              "warmup_steps", "num_strata", "min_tokens_per_sequence", "ignore_index"):
    setattr(Curriculum, _name, _config_property(_name))
del _name
