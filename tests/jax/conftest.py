"""JAX test settings: float32 matmuls at full precision on every backend.

The float32 tests compare against a float64 oracle with float32-tight tolerances. XLA on a GPU lowers a
float32 matmul to reduced-precision tensor-core passes by default (TF32-like), which is a different
computation, not a kernel error; ``highest`` makes the GPU compute what the CPU computes. (bf16/fp16 tests
are unaffected: their inputs are already at or below that precision.)
"""
from __future__ import annotations

import jax

jax.config.update("jax_default_matmul_precision", "highest")
