r"""The ratio of kept tokens: curriculum, dynamic threshold and the exact integer ``k`` (SPEC §5).

All three are pure ``jax.numpy`` functions of traced values, so a jitted training step compiles once for the
whole run although the step, the ratio and the batch confidence change with every call.

* :func:`linear_warmup_ratio` — an ``optax.Schedule`` (SPEC §5.1), in float32:
  :math:`\mathrm{base}(t) = 1 - \min(1, t / W)\,(1 - r_{\min})` (``= r_min`` when ``W = 0``).
* :func:`dynamic_ratio` — SPEC §5.2:
  :math:`\min(1,\ \mathrm{base}\,(1 + (1 - \bar c)\,\sigma))`.
* :func:`num_selected` — SPEC §5.3: :math:`r_q = \mathrm{round\_half\_even}(r \cdot 2^{16})`,
  :math:`k = \lfloor (r_q n + 2^{15}) / 2^{16} \rfloor`, clamped to :math:`[1, n]` (0 when ``n = 0``), in
  ``uint32`` arithmetic on 16-bit limbs of ``n`` so that neither 64-bit integers nor ``jax_enable_x64`` are
  needed, and the answer is the same with x64 on.

The additions and the division of §5.1–§5.2 are exact IEEE float32 operations on every backend
(:func:`exact_add`, :func:`exact_div`; XLA would otherwise contract or rewrite them), so the ratio is
bit-identical to any implementation that evaluates SPEC's float32 sequence literally.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cggr_jax import utils

__all__ = ["linear_warmup_ratio", "dynamic_ratio", "num_selected", "check_step", "check_ratio_value",
           "exact_add", "exact_div", "schedule_for", "schedule_value", "check_schedule"]

_MAX_INT32 = 2**31 - 1


# ------------------------------------------------------------------------- exact float32 add and divide
# SPEC §5 prescribes each ⊕ ⊖ ⊘ as one correctly rounded float32 operation. XLA does not keep that promise
# for the two patterns of the curriculum: it rewrites ``x / w`` as ``x * (1/w)`` and contracts ``1 - t*s``
# into a fused multiply-add (both observed on CPU; GPU contracts as well). The additions and the division
# are therefore evaluated here in int32 arithmetic on the float32 bit patterns (round to nearest, ties to
# even, subnormals and overflow included), which no compiler can reassociate or fuse; a lone float
# multiplication followed by one of these is then exactly the two-rounding IEEE sequence.

def _f32_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(sign, M, e)`` of finite float32 ``x`` with ``|x| = M·2^e`` (``M < 2^24``; subnormals unnormalised)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    sign = (bits >> 31) & 1
    biased = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    mant = jnp.where(biased == 0, frac, frac | 0x800000)
    exp = jnp.where(biased == 0, 1, biased) - 150
    return sign, mant, exp


def _round_pack(sign: jax.Array, sig: jax.Array, exp: jax.Array, sticky: jax.Array) -> jax.Array:
    """The float32 nearest (ties to even) to ``(−1)^sign · (sig + ε)·2^exp``, ``0 ≤ ε < 1`` nonzero iff
    ``sticky``. ``0 ≤ sig < 2^31``; when ``sticky`` is set, ``sig`` must have at least 26 bits."""
    length = 32 - jax.lax.clz(sig)                                     # bit length (0 for sig = 0)
    shift = jnp.maximum(length - 24, -149 - exp)                       # drop this many bits (< 0: exact)
    sh = jnp.clip(shift, 1, 31)
    kept = sig >> sh
    rem = sig & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    up = (rem > half) | ((rem == half) & (sticky | ((kept & 1) == 1)))
    rounded = kept + up.astype(jnp.int32)
    mant = jnp.where(shift > 31, 0, jnp.where(shift > 0, rounded, sig << jnp.clip(-shift, 0, 31)))
    field = exp + shift + 149                                          # exponent field minus the implicit 1
    too_big = field >= 255
    bits = (jnp.clip(field, 0, 254) << 23) + mant                     # a carry into bit 23 bumps the exponent
    bits = jnp.where(too_big | (bits >= 0x7F800000), 0x7F800000, bits)
    bits = jnp.where(mant == 0, 0, bits) | (sign << 31)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exact_add(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x ⊕ y``: the correctly rounded float32 sum (ties to even), immune to compiler rewriting."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    x, y = jnp.broadcast_arrays(x, y)
    abs_x = jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
    abs_y = jax.lax.bitcast_convert_type(y, jnp.int32) & 0x7FFFFFFF
    swap = abs_y > abs_x                                               # a: the larger magnitude
    a, b = jnp.where(swap, y, x), jnp.where(swap, x, y)
    sa, ma, ea = _f32_parts(a)
    sb, mb, eb = _f32_parts(b)
    big = ma << 6
    full = mb << 6
    d = ea - eb
    dc = jnp.clip(d, 0, 31)
    small = jnp.where(d >= 31, 0, full >> dc)
    lost = jnp.where(d >= 31, full, full & ((1 << dc) - 1))
    sticky = lost != 0
    same = sa == sb
    sig = jnp.where(same, big + small, big - small - sticky.astype(jnp.int32))
    sign = jnp.where(same, sa, jnp.where(sig == 0, 0, sa))
    exact = _round_pack(sign, sig, ea - 6, sticky)
    return jnp.where(jnp.isfinite(x) & jnp.isfinite(y), exact, x + y)


def exact_div(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x ⊘ y`` for finite ``x ≥ 0`` and finite ``y > 0``: the correctly rounded float32 quotient."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    x, y = jnp.broadcast_arrays(x, y)
    _, mx, ex = _f32_parts(x)
    _, my, ey = _f32_parts(y)
    # normalise both significands to [2^23, 2^24) so the quotient has 26 or 27 bits
    nx = jnp.maximum(jax.lax.clz(mx) - 8, 0)
    ny = jnp.maximum(jax.lax.clz(my) - 8, 0)
    mx, ex = mx << nx, ex - nx
    my, ey = jnp.maximum(my << ny, 1), ey - ny
    q = (mx >= my).astype(jnp.int32)
    r = mx - q * my
    for _ in range(26):                                                # restoring division, 26 more bits
        r = r << 1
        bit = r >= my
        r = jnp.where(bit, r - my, r)
        q = (q << 1) | bit.astype(jnp.int32)
    out = _round_pack(jnp.zeros_like(q), q, ex - ey - 26, r != 0)
    x_is_zero = (jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF) == 0   # not `x == 0`: XLA CPU
    return jnp.where(x_is_zero, jnp.float32(0.0), out)                           # treats denormals as 0


def check_step(step: Any, name: str = "step") -> jax.Array:
    """``step`` as an int32 scalar array. It must be an integer scalar (Python int or integer array of
    shape ``()``); a concrete negative step is a :class:`ValueError` (a traced one cannot be checked)."""
    if isinstance(step, (bool, np.bool_)):
        raise ValueError(f"{name}: expected an integer scalar (the curriculum step), got {step!r}")
    if isinstance(step, (int, np.integer)):
        if not 0 <= int(step) <= _MAX_INT32:
            raise ValueError(f"{name}: expected an integer in [0, 2**31), got {int(step)}")
        return jnp.asarray(int(step), dtype=jnp.int32)
    dtype = getattr(step, "dtype", None)
    shape = getattr(step, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or tuple(shape) != ():
        raise ValueError(f"{name}: expected an integer scalar (Python int or integer array of shape ()), "
                         f"got {type(step).__name__} with dtype {dtype} and shape {shape}")
    if not utils.is_traced(step):
        value = int(np.asarray(step))
        if not 0 <= value <= _MAX_INT32:
            raise ValueError(f"{name}: expected an integer in [0, 2**31), got {value}")
    return jnp.asarray(step).astype(jnp.int32)


def check_ratio_value(ratio: Any, name: str = "ratio") -> jax.Array:
    """``ratio`` as a float32 scalar; a concrete value outside ``(0, 1]`` (or NaN) is a :class:`ValueError`.

    A traced ratio cannot be checked; :func:`num_selected` clamps it (documented there).
    """
    dtype = getattr(ratio, "dtype", None)
    if dtype is None:
        if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name}: expected a float scalar in (0, 1], got {ratio!r}")
    elif not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) \
            or tuple(getattr(ratio, "shape", ())) != ():
        raise ValueError(f"{name}: expected a float scalar in (0, 1], got dtype {dtype} and shape "
                         f"{getattr(ratio, 'shape', None)}")
    r = jnp.asarray(ratio).astype(jnp.float32)
    if not utils.is_traced(ratio):
        value = float(np.asarray(r))
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}: expected a value in (0, 1], got {value!r}")
    return r


def linear_warmup_ratio(min_tokens_ratio: float = utils.DEFAULT_CONFIG.min_tokens_ratio,
                        warmup_steps: int = utils.DEFAULT_CONFIG.warmup_steps) -> optax.Schedule:
    """The default curriculum (SPEC §5.1) as an ``optax.Schedule`` ``step -> float32 ratio``.

    ``base(step) = 1 ⊖ (min(1, f32(step) ⊘ f32(warmup_steps)) ⊗ (1 ⊖ min_tokens_ratio))`` in float32, and
    ``min_tokens_ratio`` when ``warmup_steps = 0``. Examples (0.25, 1000): step 0 → 1, 500 → 0.625,
    ≥ 1000 → 0.25. ``0 < min_tokens_ratio ≤ 1`` and integer ``warmup_steps ≥ 0``, else :class:`ValueError`.
    The step is any integer scalar or array (e.g. optax's int32 ``count``); a negative traced step (which
    cannot raise) counts as 0, i.e. ratio 1.
    """
    min_tokens_ratio = utils.check_real(min_tokens_ratio, "min_tokens_ratio", low=0.0, high=1.0,
                                        low_inclusive=False)
    warmup_steps = utils.check_int(warmup_steps, "warmup_steps", minimum=0)
    mn = np.float32(min_tokens_ratio)
    span = np.float32(np.float32(1.0) - mn)        # 1 ⊖ min_tokens_ratio, rounded once in float32
    w = np.float32(warmup_steps)

    def schedule(step: Any) -> jax.Array:
        s = jnp.asarray(step)
        if warmup_steps == 0:
            return jnp.full(s.shape, mn, dtype=jnp.float32)
        a = s.astype(jnp.float32)
        t = jnp.where(a >= w, jnp.float32(1.0), exact_div(jnp.maximum(a, 0.0), w))   # min(1, a ⊘ w)
        return exact_add(jnp.float32(1.0), -(t * span))                             # 1 ⊖ (t ⊗ span)

    return schedule


def dynamic_ratio(base_ratio: Any, mean_confidence: Any, threshold_sensitivity: Any) -> jax.Array:
    """SPEC §5.2 in float32: ``min(1, base ⊗ (1 ⊕ ((1 ⊖ c̄) ⊗ threshold_sensitivity)))``.

    The docs' table (base 0.25, sensitivity 0.5): c̄ = 0.3 / 0.7 / 0.9 → 0.3375 / 0.2875 / 0.2625.
    """
    if not utils.is_traced(threshold_sensitivity) and getattr(threshold_sensitivity, "dtype", None) is None:
        utils.check_real(threshold_sensitivity, "threshold_sensitivity", low=0.0)
    base = jnp.asarray(base_ratio).astype(jnp.float32)
    c = jnp.asarray(mean_confidence).astype(jnp.float32)
    sens = jnp.asarray(threshold_sensitivity).astype(jnp.float32)
    one = jnp.float32(1.0)
    adjust = exact_add(one, -c) * sens                                  # (1 ⊖ c̄) ⊗ sensitivity
    return jnp.minimum(one, base * exact_add(one, adjust))              # min(1, base ⊗ (1 ⊕ adjust))


def num_selected(n: Any, ratio: Any) -> jax.Array:
    """SPEC §5.3: the exact number of tokens to keep out of ``n`` eligible ones, as an int32 scalar.

    ``r_q = round_half_even(ratio ⊗ 65536)`` (exact: a power-of-two scale) and
    ``k = floor((r_q·n + 32768) / 65536)`` evaluated on 16-bit limbs ``n = a·2^16 + b`` in uint32:
    ``k = r_q·a + ((r_q·b + 32768) >> 16)`` (no intermediate exceeds 2^32). Then ``k = 0`` if ``n = 0``,
    else ``min(n, max(1, k))``. Examples: (256, 0.625) → 160; (10, 0.25) → 3; (1, any) → 1.

    ``0 ≤ n < 2^31``. A ratio outside ``(0, 1]`` can only arrive traced (concrete ones are rejected by the
    callers); ``r_q`` is clamped to ``[0, 65536]`` and a NaN ratio keeps every token (``r_q = 65536``), which
    the metric ``effective_ratio`` (NaN) makes visible.
    """
    n = jnp.asarray(n)
    if not jnp.issubdtype(n.dtype, jnp.integer) or n.ndim != 0:
        raise ValueError(f"n: expected an integer scalar, got dtype {n.dtype} and shape {n.shape}")
    r = jnp.asarray(ratio).astype(jnp.float32)
    scaled = jnp.round(r * jnp.float32(65536.0))                       # round half to even
    scaled = jnp.where(jnp.isnan(scaled), jnp.float32(65536.0), scaled)
    r_q = jnp.clip(scaled, 0.0, 65536.0).astype(jnp.uint32)
    n_u = jnp.maximum(n, 0).astype(jnp.uint32)
    a = n_u >> jnp.uint32(16)
    b = n_u & jnp.uint32(0xFFFF)
    k = r_q * a + ((r_q * b + jnp.uint32(32768)) >> jnp.uint32(16))
    k = jnp.minimum(n_u, jnp.maximum(jnp.uint32(1), k))
    k = jnp.where(n_u == 0, jnp.uint32(0), k)
    return k.astype(jnp.int32)


# ---------------------------------------------------------------------------------- the schedule in use
def check_schedule(ratio_schedule: Any) -> Any:
    """``ratio_schedule`` must be None or a callable ``step -> ratio`` (an ``optax.Schedule``)."""
    if ratio_schedule is not None and not callable(ratio_schedule):
        raise ValueError(f"ratio_schedule: expected None or an optax.Schedule (a callable step -> ratio), "
                         f"got {type(ratio_schedule).__name__}")
    return ratio_schedule


def schedule_for(config: Any, ratio_schedule: Any = None) -> optax.Schedule:
    """The curriculum of an entry point: ``ratio_schedule`` when given, else
    ``linear_warmup_ratio(config.min_tokens_ratio, config.warmup_steps)`` (``config`` a ``cggr.CGGRConfig``)."""
    if ratio_schedule is not None:
        return ratio_schedule
    return linear_warmup_ratio(config.min_tokens_ratio, config.warmup_steps)


def schedule_value(schedule: optax.Schedule, step: jax.Array, name: str = "ratio_schedule(step)") -> jax.Array:
    """``schedule(step)`` as a float32 scalar; a non-scalar or non-real value is a :class:`ValueError`."""
    value = jnp.asarray(schedule(step))
    if value.shape != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                 or jnp.issubdtype(value.dtype, jnp.integer)):
        raise ValueError(f"{name}: expected a real scalar in (0, 1], got dtype {value.dtype} and "
                         f"shape {value.shape}")
    return value.astype(jnp.float32)
