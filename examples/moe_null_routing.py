"""Mixture-of-experts "null routing" driven by CGGRScorer — static shapes, tiny model, local text.

    .venv/bin/python examples/moe_null_routing.py              # ~1 min on a laptop CPU
    .venv/bin/python examples/moe_null_routing.py --steps 200 --baseline

The seed docs' SRDE section combines *forward* sparsity (a mixture of experts) with CGGR's *backward* sparsity.
This example makes the combination concrete with shapes that never depend on the data:

* every feed-forward block of a tiny ``LlamaForCausalLM`` is replaced by :class:`NullRoutedMoE`: top-1 gating
  over ``E`` experts plus a **null expert** whose output is exactly zero (the residual stream carries the token
  through unchanged, at no FLOP cost);
* before each training step, :class:`cggr_torch.scorer.CGGRScorer` scores every position with a truncated
  router (the model's first layers, weights shared) and returns a ``(B, T)`` mask of the hard tokens — exactly
  ``k`` of them (SPEC §5.3/§7) whatever the data;
* tokens outside the mask go to the null expert; the selected ones are dispatched into per-expert buffers of a
  **fixed capacity** ``C = ceil(capacity_factor · (r_max · N + 1) / E)``, where ``r_max = min(1, base · (1 +
  sensitivity))`` bounds the scorer's ratio (§5.2) at the current curriculum step, so every tensor shape is
  known on the host before the step and the experts run on ``E·C`` rows instead of ``N``. Nothing is sliced to
  a data-dependent size, so the step has no host synchronisation and is friendly to ``torch.compile`` /
  CUDA graphs (one shape per curriculum value).

The loss is still the model's full next-token loss (plus a small Switch-style load-balancing term over the
routed tokens): easy tokens keep flowing through attention and the
residual path, they only skip the experts.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))      # examples/data.py

from data import CharTokenizer, batch_iterator, eval_batches, load_text, split_train_eval  # noqa: E402


class NullRoutedMoE(nn.Module):
    """Top-1 mixture of ``num_experts`` SwiGLU experts plus a null expert, with static shapes.

    For the ``N = B·T`` tokens ``x_i``: gate probabilities ``g_i = softmax(W_g x_i)``, expert
    ``e_i = argmax g_i``. Token ``i`` is *active* when ``routing_mask[i]`` is True (all tokens when the mask is
    None). Among the active tokens of expert ``e``, the first ``C`` (in flat order) get a slot in the buffer
    ``(E, C, d)``; the rest, and every inactive token, go to the null expert::

        y_i = g_i[e_i] · expert_{e_i}(x_i)     if token i has a slot
        y_i = 0                                otherwise (null expert)

    ``capacity`` (``C``) is a host integer; ``None`` means ``N`` (no token is ever dropped).
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        scale_in, scale_out = d_model ** -0.5, hidden ** -0.5
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, hidden) * scale_in)
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, hidden) * scale_in)
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden, d_model) * scale_out)
        self.routing_mask: Optional[torch.Tensor] = None
        self.capacity: Optional[int] = None
        self.last_stats: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        N, E = B * T, self.num_experts
        C = N if self.capacity is None else int(self.capacity)
        flat = x.reshape(N, d)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        p, expert = probs.max(dim=-1)
        if self.routing_mask is None:
            active = torch.ones(N, dtype=torch.bool, device=x.device)
        else:
            if tuple(self.routing_mask.shape) != (B, T):
                raise ValueError(f"routing_mask: expected shape {(B, T)}, got {tuple(self.routing_mask.shape)}")
            active = self.routing_mask.reshape(N)
        onehot = F.one_hot(expert, E) * active.unsqueeze(1)                   # (N, E), 0 rows for inactive
        position = ((torch.cumsum(onehot, dim=0) - 1) * onehot).sum(dim=1)     # rank inside its expert
        has_slot = active & (position < C)
        slot = torch.where(has_slot, expert * C + position, torch.full_like(position, E * C))   # E·C = dump
        buf = flat.new_zeros(E * C + 1, d).index_copy(0, slot, flat)[: E * C].view(E, C, d)
        # (the dump row may receive several tokens; index_copy keeps one of them and it is discarded)
        h = F.silu(torch.einsum("ecd,edh->ech", buf, self.w_gate)) * torch.einsum("ecd,edh->ech", buf, self.w_up)
        out = torch.einsum("ech,ehd->ecd", h, self.w_down).reshape(E * C, d)
        out = torch.cat([out, out.new_zeros(1, d)])                          # the null expert's zero row
        y = out[slot] * (p * has_slot).to(out.dtype).unsqueeze(1)
        # Switch-Transformer load balancing over the active tokens: E · Σ_e (token share_e · mean gate prob_e)
        act = active.to(probs.dtype).unsqueeze(1)
        n_act = torch.clamp(act.sum(), min=1.0)
        self.aux_loss = E * ((onehot.to(probs.dtype).sum(0) / n_act) * ((probs * act).sum(0) / n_act)).sum()
        self.last_stats = {"active": active.sum(), "routed": has_slot.sum(), "rows": torch.tensor(E * C)}
        return y.reshape(B, T, d)


def build_model(vocab: int, args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq_len, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        layer.mlp = NullRoutedMoE(args.d_model, 2 * args.d_model, args.experts)
    return model


def moe_layers(model: nn.Module) -> list[NullRoutedMoE]:
    return [m for m in model.modules() if isinstance(m, NullRoutedMoE)]


@contextmanager
def null_routing(model: nn.Module, mask: Optional[torch.Tensor], capacity: Optional[int]) -> Iterator[None]:
    """Route every MoE layer of ``model`` with ``mask`` (None: all tokens) and expert capacity ``capacity``."""
    layers = moe_layers(model)
    for layer in layers:
        layer.routing_mask, layer.capacity = mask, capacity
    try:
        yield
    finally:
        for layer in layers:
            layer.routing_mask, layer.capacity = None, None


def static_capacity(scorer, n_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor · (r_max · N + 1) / E)`` with ``r_max = min(1, base · (1 + sensitivity))``.

    ``k = round(ratio · n) ≤ r_max · N + 1`` (SPEC §5.3, ``n ≤ N``), so ``E·C`` rows suffice on average over the
    experts; ``capacity_factor`` absorbs the imbalance between experts. Host arithmetic only."""
    base = float(scorer.ratio_schedule(scorer.current_step))
    r_max = min(1.0, base * (1.0 + scorer.threshold_sensitivity)) if scorer.dynamic_threshold else base
    return max(1, math.ceil(capacity_factor * (r_max * n_tokens + 1) / num_experts))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None)
    p.add_argument("--max-chars", type=int, default=300_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--router-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio: fraction of tokens given experts")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="also train the dense MoE (every token routed)")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from cggr_torch.router import create_truncated_router
    from cggr_torch.scorer import CGGRScorer

    hf_logging.set_verbosity_error()
    source = load_text(args.text, max_chars=args.max_chars)
    tok = CharTokenizer.from_text(source.text)
    train_ids, eval_ids = split_train_eval(tok.encode(source.text))
    evals = [torch.from_numpy(b.astype(np.int64)) for b in
             eval_batches(eval_ids, args.batch_size, args.seq_len, max_batches=4)]
    print(f"text: {source.name}, char vocabulary {tok.vocab_size}, {args.experts} experts + null expert")

    results = {}
    for name in ["cggr"] + (["dense"] if args.baseline else []):
        model = build_model(tok.vocab_size, args).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        scorer = CGGRScorer(create_truncated_router(model, args.router_layers), min_tokens_ratio=args.ratio,
                            warmup_steps=args.warmup)
        batches = batch_iterator(train_ids, args.batch_size, args.seq_len, seed=args.seed)
        start = time.perf_counter()
        for step in range(args.steps):
            ids = torch.from_numpy(next(batches).astype(np.int64))
            N = ids.numel()
            if name == "cggr":
                _, mask, info = scorer(ids, labels=ids)          # no_grad; MoE layers route everything here
                capacity = static_capacity(scorer, N, args.experts, args.capacity_factor)
            else:   # a standard top-1 MoE: every token routed, capacity ceil(capacity_factor · N / E)
                mask, capacity = None, max(1, math.ceil(args.capacity_factor * N / args.experts))
            with null_routing(model, mask, capacity):
                loss = model(input_ids=ids, labels=ids).loss
                aux = sum(layer.aux_loss for layer in moe_layers(model))
                (loss + args.aux_weight * aux).backward()
                if step == 0 and mask is not None:
                    # the null expert is exact: unselected tokens get a zero MoE output
                    layer = moe_layers(model)[0]
                    with torch.no_grad():
                        x = torch.randn(*ids.shape, args.d_model)
                        assert (layer(x)[~mask] == 0).all()
            opt.step()
            opt.zero_grad(set_to_none=True)
            scorer.step()
            if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
                stats = moe_layers(model)[-1].last_stats
                print(f"[{name}] step {step:4d}  loss {float(loss.detach()):.4f}  "
                      f"tokens with an expert {int(stats['routed'])}/{N} "
                      f"(selected {int(stats['active'])}, expert rows computed {int(stats['rows'])})")
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            eval_loss = float(np.mean([float(model(input_ids=b, labels=b).loss) for b in evals]))
        results[name] = {"eval_loss": eval_loss, "seconds": seconds}
        print(f"[{name}] {args.steps} steps in {seconds:.1f}s, eval loss (dense routing) {eval_loss:.4f}")
    return results


if __name__ == "__main__":
    main()
