"""Tests of ``cggr_jax`` (run on CPU; Pallas kernels in interpreter mode)."""
