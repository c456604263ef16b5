"""The ratio of tokens kept: curriculum, dynamic threshold and the integer ``k`` (SPEC §5).

* :func:`linear_warmup_ratio` runs on the host in NumPy float32 from a Python-int step (no device work);
* :func:`dynamic_ratio` runs on the device (the mean confidence is a device tensor; no synchronisation);
* :func:`num_selected` computes ``k`` exactly in integers on the device (int64 arithmetic, an int32 result)
  or in Python for host numbers;
* :class:`Curriculum` is the curriculum *state* of every stateful entry point (``CGGRLoss``, the fused LM head
  and the distributed loss, which derive from it, ``CGGRScorer`` and ``CGGRModel``): the step counter, the
  ratio schedule, ``step()``/``set_step()`` and the ``state_dict`` extra state, in one place.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch

from .utils import check_ratio_value

__all__ = ["linear_warmup_ratio", "LinearWarmupSchedule", "dynamic_ratio", "num_selected", "RATIO_SCALE",
           "host_step", "base_ratio", "Curriculum", "Schedule"]

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
        self.warmup_steps = int(warmup_steps)

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


def _as_f32_tensor(x: Union[torch.Tensor, Number], device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(x.shape)}")
        return x.reshape(()).to(device=device, dtype=torch.float32)
    # torch.full writes the value in a kernel: no host-to-device copy, no synchronisation.
    return torch.full((), float(_F32(x)), dtype=torch.float32, device=device)


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
                or not np.isfinite(float(threshold_sensitivity)) or float(threshold_sensitivity) < 0:
            raise ValueError(f"threshold_sensitivity: expected a finite number >= 0, got {threshold_sensitivity!r}")
    dev = _device_of(mean_confidence, base_ratio, threshold_sensitivity)
    base = _as_f32_tensor(base_ratio, dev)
    conf = _as_f32_tensor(mean_confidence, dev)
    sens = _as_f32_tensor(threshold_sensitivity, dev)
    adj = (1.0 - conf) * sens          # float32 tensor ops (a Python scalar does not promote float32)
    return torch.clamp(base * (adj + 1.0), max=1.0)


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
        if r_t.device.type == "cuda":
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

    Holds the step (a host ``int``, never a device tensor: reading it costs no synchronisation) and the ratio
    schedule. The step is part of ``state_dict()`` as the module's extra state ``{'step': int}``, so resuming
    from a checkpoint restores the curriculum; :meth:`set_step` sets it (the Hugging Face callback of
    :mod:`cggr_torch.integrations` re-syncs it to the trainer's global step on a resume).
    """

    _step: int
    ratio_schedule: Schedule

    def _init_curriculum(self, min_tokens_ratio: float, warmup_steps: int,
                         ratio_schedule: Optional[Schedule]) -> None:
        if ratio_schedule is None:
            ratio_schedule = linear_warmup_ratio(min_tokens_ratio, warmup_steps)
        elif not callable(ratio_schedule):
            raise ValueError(f"ratio_schedule: expected None or a callable step -> ratio in (0, 1], got "
                             f"{type(ratio_schedule).__name__}")
        self.ratio_schedule = ratio_schedule
        self._step = 0

    @property
    def current_step(self) -> int:
        """The curriculum step the next forward uses (number of :meth:`step` calls, or as restored/set)."""
        return self._step

    def step(self) -> None:
        """Advance the curriculum by one; call once after each optimizer step."""
        self._step += 1

    def set_step(self, step: int) -> None:
        """Set the curriculum step (e.g. to the trainer's global step when resuming)."""
        self._step = host_step(step)

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"state_dict: expected {type(self).__name__} extra state {{'step': int}}, got "
                             f"{state!r}")
        self.set_step(state["step"])

    def base_ratio(self) -> np.float32:
        """``base(step)`` at the current step (SPEC §5.1, or the custom schedule's value, checked)."""
        return base_ratio(self.ratio_schedule, self._step)


for _name in ("scoring", "selection", "dynamic_threshold", "threshold_sensitivity", "min_tokens_ratio",
              "warmup_steps", "num_strata", "min_tokens_per_sequence", "ignore_index"):
    setattr(Curriculum, _name, _config_property(_name))
del _name
