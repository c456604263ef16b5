r"""FLOPs accounting of one training step, per mode (the "6·params·tokens" convention, made explicit).

For a Llama-style decoder with width ``d``, ``L`` layers, ``h`` query heads and ``h_kv`` key/value heads
(``d_kv = d·h_kv/h``), SwiGLU width ``f`` and vocabulary ``V``:

.. code-block:: text

    P_layer   = d·(d + 2·d_kv) + d·d + 3·d·f         matmul parameters of one block (q, k, v, o, gate, up, down)
    fwd(l, T) = 2·(l·P_layer + d·V) + 4·l·d·(T+1)/2   forward FLOPs per token through l blocks and the LM head;
                                                      the last term is QKᵀ and AV over the mean causal context
    bwd       = 2·fwd                                 backward (input and weight gradients)
    score     = 8·V per scored token                  statistics of SPEC §2 (max, exp, sums, top-2), an estimate

The embedding lookup and the norms are not counted (no matmul). Per step, with ``B`` sequences of ``T`` tokens,
``k`` kept sequences, ``n_kept`` tokens in the loss and ``r`` router layers:

=====================  ==========================================  ==========================================
mode                   **executed** (what the hardware runs)       **nominal** (the docs' accounting)
=====================  ==========================================  ==========================================
standard               3·fwd(L)·B·T                                same
random_token,          3·fwd(L)·B·T + score·B·(T−1)                fwd(L)·B·T + 2·fwd(L)·n_kept + score·B·(T−1)
cggr_token
random_sequence        3·fwd(L)·rows·T                             3·fwd(L)·k·T
cggr_sequence          fwd(r)·B·T + score·B·(T−1) + 3·fwd(L)·rows·T fwd(r)·B·T + score·B·(T−1) + 3·fwd(L)·k·T
=====================  ==========================================  ==========================================

``rows`` is the number of sequences the main pass actually runs: ``k`` in PyTorch, the static bucket size
``b ≥ k`` in JAX (padding rows are computed and weighted 0).

**Why token selection is "executed" at full cost.** Dropping a token from the loss zeroes the gradient of its
logits, but in a causal LM every earlier position still receives gradient through attention from the kept
positions, and autograd runs the dense matmuls over all ``B·T`` positions anyway. So ``CGGRLoss`` saves no
backward FLOPs; the docs' "25 % backward FLOPs" is the *nominal* column. Equal-FLOPs comparisons in
``results.md`` use the executed column; the nominal one is reported next to it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SCORE_FLOPS_PER_LOGIT", "ModelShape", "StepFlops", "step_flops", "TOKEN_MODES", "SEQUENCE_MODES"]

#: Estimated FLOPs per logit of the SPEC §2 statistics (max, subtract, exp, sum, p·z, top-2 compare, ...).
SCORE_FLOPS_PER_LOGIT = 8

TOKEN_MODES = ("random_token", "cggr_token")
SEQUENCE_MODES = ("random_sequence", "cggr_sequence")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that determine the FLOPs of a Llama-style decoder (see the module docstring)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelShape.{name}: expected a positive int, got {value!r}")
        if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelShape: d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads}) and num_heads by num_kv_heads ({self.num_kv_heads})")

    @property
    def params_per_layer(self) -> int:
        """``P_layer``: matmul parameters of one block."""
        d = self.d_model
        d_kv = d * self.num_kv_heads // self.num_heads
        return d * (d + 2 * d_kv) + d * d + 3 * d * self.ffn_dim

    @property
    def matmul_params(self) -> int:
        """``L·P_layer + d·V``: the parameters the per-token matmuls touch (no embedding lookup, no norms)."""
        return self.num_layers * self.params_per_layer + self.d_model * self.vocab_size

    def forward_flops_per_token(self, layers: int, seq_len: int) -> float:
        """``fwd(l, T) = 2·(l·P_layer + d·V) + 4·l·d·(T+1)/2`` (``0 ≤ l ≤ L``)."""
        if not 0 <= layers <= self.num_layers:
            raise ValueError(f"layers: expected 0 <= layers <= {self.num_layers}, got {layers}")
        if seq_len < 1:
            raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
        return 2.0 * (layers * self.params_per_layer + self.d_model * self.vocab_size) \
            + 4.0 * layers * self.d_model * (seq_len + 1) / 2.0


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step: ``executed`` (what runs) and ``nominal`` (forward over all tokens, backward over the
    kept ones, plus the router and the scoring)."""

    executed: float
    nominal: float


def step_flops(mode: str, shape: ModelShape, batch_size: int, seq_len: int, *, kept_sequences: int = 0,
               main_rows: int = 0, kept_tokens: int = 0, router_layers: int = 0) -> StepFlops:
    """FLOPs of one step of ``mode`` (module docstring table).

    Args:
        mode: ``standard``, ``random_token``, ``cggr_token``, ``random_sequence`` or ``cggr_sequence``.
        shape: the model.
        batch_size, seq_len: ``B``, ``T`` of the input batch.
        kept_sequences: ``k`` (sequence modes).
        main_rows: sequences the main pass runs (``k``, or the JAX bucket size); sequence modes.
        kept_tokens: tokens in the loss (token modes).
        router_layers: ``r`` (``cggr_sequence``).
    """
    B, T = int(batch_size), int(seq_len)
    full = shape.forward_flops_per_token(shape.num_layers, T)
    score = float(SCORE_FLOPS_PER_LOGIT * shape.vocab_size * B * (T - 1))
    if mode == "standard":
        f = 3.0 * full * B * T
        return StepFlops(f, f)
    if mode in TOKEN_MODES:
        if not 0 <= kept_tokens <= B * T:
            raise ValueError(f"kept_tokens: expected 0 <= kept_tokens <= B*T = {B * T}, got {kept_tokens}")
        return StepFlops(3.0 * full * B * T + score, full * B * T + 2.0 * full * kept_tokens + score)
    if mode in SEQUENCE_MODES:
        if not 0 <= kept_sequences <= main_rows <= B:
            raise ValueError(f"kept_sequences/main_rows: expected 0 <= k ({kept_sequences}) <= rows "
                             f"({main_rows}) <= B ({B})")
        main_exec = 3.0 * full * main_rows * T
        main_nom = 3.0 * full * kept_sequences * T
        if mode == "random_sequence":
            return StepFlops(main_exec, main_nom)
        router = shape.forward_flops_per_token(router_layers, T) * B * T + score
        return StepFlops(router + main_exec, router + main_nom)
    raise ValueError(f"mode: expected one of standard, {', '.join(TOKEN_MODES + SEQUENCE_MODES)}, got {mode!r}")


def describe(shape: ModelShape, seq_len: int) -> dict[str, Any]:
    """JSON-able summary: the shape, ``P_layer``, the matmul parameters and ``fwd(L, T)`` per token."""
    return {**asdict(shape), "params_per_layer": shape.params_per_layer, "matmul_params": shape.matmul_params,
            "forward_flops_per_token": shape.forward_flops_per_token(shape.num_layers, seq_len)}
