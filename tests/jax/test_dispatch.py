"""``cggr_jax.dispatch``: the one kernel-vs-reference decision, forced by tests instead of monkeypatching,
and part of every trace (a forced mode is never ignored by an already-compiled function)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cggr_jax
from cggr_jax import dispatch, scoring


def test_modes_env_and_restore(monkeypatch):
    monkeypatch.delenv("CGGR_DISABLE_KERNELS", raising=False)
    assert dispatch.mode() == "auto" and dispatch.kernels_enabled()
    assert dispatch.use_kernels(jnp.zeros(3)) == (jax.default_backend() in dispatch.GPU_PLATFORMS)
    with dispatch.force("kernel"):
        assert dispatch.use_kernels(jnp.zeros(3)) and dispatch.mode() == "kernel"
        with dispatch.force("reference"):
            assert not dispatch.use_kernels(jnp.zeros(3)) and not dispatch.kernels_enabled()
        assert dispatch.mode() == "kernel"
    assert dispatch.mode() == "auto"
    with pytest.raises(RuntimeError), dispatch.force("reference"):
        raise RuntimeError("the mode is restored on error too")
    assert dispatch.mode() == "auto"
    monkeypatch.setenv("CGGR_DISABLE_KERNELS", "1")
    assert not dispatch.kernels_enabled() and not dispatch.use_kernels(jnp.zeros(3))
    with pytest.raises(ValueError, match="mode"), dispatch.force("gpu"):
        pass


def test_forced_mode_is_part_of_the_trace(monkeypatch):
    """The package's jitted implementations take the decision as a static argument: the same call traced in
    another mode gets its own compilation (no stale cache hides the forced path)."""
    from cggr_jax import kernels

    calls = []
    real = kernels.token_statistics_pallas

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "token_statistics_pallas", spy)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 9)), jnp.float32)
    t = jnp.asarray([1, 2, -100])
    with dispatch.force("reference"):
        ref = scoring.token_statistics(z, t)
    assert not calls
    with dispatch.force("kernel"):
        got = scoring.token_statistics(z, t)             # same shapes: a new trace, not the cached one
    assert calls
    np.testing.assert_allclose(np.asarray(got.lse), np.asarray(ref.lse), rtol=1e-6)
    n = len(calls)
    with dispatch.force("reference"):
        scoring.token_statistics(z, t)
    assert len(calls) == n                               # and back: the reference compilation again


def test_package_reexports_config_and_dispatch():
    assert cggr_jax.CGGRConfig is __import__("cggr").CGGRConfig and cggr_jax.dispatch is dispatch
    loss = cggr_jax.CGGRLoss(selection="fixed_quota", warmup_steps=5)
    assert loss.config == cggr_jax.CGGRConfig(selection="fixed_quota", warmup_steps=5)
    assert not loss.config.uses_dynamic_threshold
    assert cggr_jax.CGGRLoss.from_config(loss.config) == loss and hash(cggr_jax.CGGRLoss.from_config(loss.config))
