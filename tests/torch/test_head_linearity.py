"""The one head-linearity rule (router fused path and fused LM head): checked numerically on the model at hand.

A model whose logits are not ``hidden · Wᵀ + b`` - scaled (an ``lm_head_multiplier`` of 0.25, as a new user
would try), capped (clamp) or soft-capped (tanh) after the head - must never be scored or trained through the
fused paths, whatever its config says: the router falls back to the logits (``router_path='auto'``) or raises
(``'fused'``), the fused LM head raises. A plain model passes.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cggr_torch import CGGRModel, CGGRScorer, create_truncated_router  # noqa: E402
from cggr_torch.causal_lm import hf_causal_lm_cggr_loss  # noqa: E402
from cggr_torch.fused_linear import FusedLinearCGGRLoss  # noqa: E402
from cggr_torch.router import check_linear_head, head_linearity_reason  # noqa: E402

V = 97

TRANSFORMS = {
    "plain": None,
    "scale": lambda z: z * 0.25,                      # lm_head_multiplier = 0.25
    "clamp": lambda z: torch.clamp(z, -1.0, 1.0),     # capping
    "softcap": lambda z: 1.5 * torch.tanh(z / 1.5),   # soft-capping
}


class TransformedLlama(transformers.LlamaForCausalLM):
    """A Llama whose forward transforms the logits after the head (as Gemma-2, Granite, ... do)."""

    lm_head_multiplier = None

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        fn = TRANSFORMS[self.config.cggr_test_transform]
        if fn is not None:
            out.logits = fn(out.logits)
        return out


class TransformedGPT2(transformers.GPT2LMHeadModel):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        fn = TRANSFORMS[self.config.cggr_test_transform]
        if fn is not None:
            out.logits = fn(out.logits)
        return out


def _model(family: str, transform: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cls = TransformedLlama
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        cls = TransformedGPT2
    cfg.cggr_test_transform = transform
    model = cls(cfg).eval()
    with torch.no_grad():   # logits of a few units, so that capping at 1 and soft-capping at 1.5 bite
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_router_and_fused_head_apply_the_numeric_rule(family, transform):
    model = _model(family, transform)
    ids = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(1))
    router = create_truncated_router(model, 1)
    auto = CGGRScorer(router, warmup_steps=0)
    _, mask_a, info_a = auto(ids, ids)
    logits_path = CGGRScorer(router, warmup_steps=0, router_path="logits")
    d_l, mask_l, info_l = logits_path(ids, ids)
    if transform == "plain":
        assert info_a["router_path"] == auto.router_path_used == "fused"
        CGGRScorer(router, router_path="fused")(ids, ids)
        loss = hf_causal_lm_cggr_loss(model, ids, ids, FusedLinearCGGRLoss(warmup_steps=0))
        assert torch.isfinite(loss)
    else:
        # auto: the explicit fallback to the model's own logits, with the reason
        assert info_a["router_path"] == auto.router_path_used == "logits"
        assert "not hidden @ lm_head.weight.T" in auto.router_path_reason
        assert "scaling, capping, soft-capping" in auto.router_path_reason
        with pytest.raises(ValueError, match="router_path: 'fused' is not possible.*not hidden @ lm_head"):
            CGGRScorer(router, router_path="fused")
        with pytest.raises(ValueError, match="model: its logits are not hidden @ lm_head.weight.T"):
            hf_causal_lm_cggr_loss(model, ids, ids, FusedLinearCGGRLoss())
    # whatever the path, the scores are those of the model's own (truncated) logits
    assert torch.equal(mask_a, mask_l) and torch.equal(info_a["eligible"], info_l["eligible"])
    # batch splitting follows the same rule
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0)
    cggr(ids, labels=ids)
    assert cggr.get_metrics()["router_path"] == ("fused" if transform == "plain" else "logits")


def test_rule_is_checked_once_per_head_and_again_for_a_new_head():
    model = _model("llama", "plain")
    calls = []

    def probe(ids):
        calls.append(ids.shape)
        out = model(input_ids=ids)
        return out.logits, model.model(input_ids=ids).last_hidden_state

    assert check_linear_head(model, model.lm_head, probe) is None
    assert check_linear_head(model, model.lm_head, probe) is None
    assert len(calls) == 1
    model.lm_head = torch.nn.Linear(32, V, bias=False)
    model.config.cggr_test_transform = "scale"
    assert "not hidden" in check_linear_head(model, model.lm_head, probe)
    assert len(calls) == 2
    # the probe runs with dropout off and restores every training flag
    model.train()
    model.model.layers[0].eval()
    model.lm_head = torch.nn.Linear(32, V, bias=False)
    check_linear_head(model, model.lm_head, probe)
    assert model.training and model.lm_head.training and not model.model.layers[0].training


def test_rule_tolerances():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(4, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    z = torch.nn.functional.linear(h, w, b)
    assert head_linearity_reason(z, h, w, b) is None
    assert head_linearity_reason(z.bfloat16(), h.bfloat16(), w.bfloat16(), b.bfloat16()) is None
    assert head_linearity_reason(z * 0.999, h, w, b) is not None          # float32: 1e-3 is a transform
    assert head_linearity_reason(z * 0.25, h, w, b) is not None
    assert head_linearity_reason(z[:, :5], h, w, b) is not None           # another shape
    z_nan = z.clone()
    z_nan[1, 2] = float("nan")
    assert "finite" in head_linearity_reason(z_nan, h, w, b)
