"""Parity test settings: JAX float32 matmuls at full precision on every backend (as tests/jax/conftest.py).

The parity tests compare PyTorch on the CPU with JAX on its default backend under float32-tight SPEC §11
bounds. On a GPU, XLA lowers a float32 matmul (the fused LM head's ``hidden · Wᵀ``) to TF32-like tensor-core
passes by default, a different computation; ``highest`` makes it compute what the CPU computes.
"""
from __future__ import annotations

import jax

jax.config.update("jax_default_matmul_precision", "highest")
