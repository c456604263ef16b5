"""Every bad input of SPEC §1, §3, §5.1, §7, §8, §11 raises ValueError naming the argument."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cggr_torch import (
    CGGRLoss,
    cggr_loss,
    dynamic_ratio,
    linear_warmup_ratio,
    num_selected,
    rank_tokens,
    score_tokens,
    select_tokens,
    token_statistics,
)
from tests.torch import assert_fails_in_a_child

V = 5


def _logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, V)


def _targets(*shape: int) -> torch.Tensor:
    return torch.randint(0, V, shape)


# --------------------------------------------------------------------------------------------- §1 inputs
ENTRY_POINTS = {
    "module": lambda lg, t: CGGRLoss()(lg, t),
    "functional": lambda lg, t: cggr_loss(lg, t, 0),
    "token_statistics": lambda lg, t: token_statistics(lg, t),
    "score_tokens": lambda lg, t: score_tokens(lg, t),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("logits,targets,name", [
    (_logits(2, 3), _targets(2, 4), "targets"),                   # leading dims differ
    (_logits(2, 3), _targets(6), "targets"),                      # rank differs
    (_logits(6), _targets(6, 1), "targets"),                      # (N, V) logits with (N, 1) targets
    (torch.randn(5), torch.randint(0, 5, (5,)), "logits"),        # 1-D logits
    (torch.randn(2, 2, 2, V), _targets(2, 2, 2), "logits"),       # 4-D logits
    (torch.randint(0, 3, (4, V)), _targets(4), "logits"),         # integer logits
    (torch.zeros(4, V, dtype=torch.bool), _targets(4), "logits"),  # bool logits
    (torch.randn(4, V, dtype=torch.complex64), _targets(4), "logits"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.int64), "logits"),  # V = 0
    (_logits(4), torch.rand(4), "targets"),                       # float targets
    (_logits(4), torch.ones(4, dtype=torch.bool), "targets"),     # bool targets
    (_logits(4), [0, 1, 2, 3], "targets"),                        # not a tensor
    (_logits(4), torch.tensor([0, 1, V, 2]), "targets"),          # target == V
    (_logits(4), torch.tensor([0, -1, 1, 2]), "targets"),         # negative target that is not ignore_index
    (_logits(2, 2), torch.tensor([[0, 1], [2, 10**6]]), "targets"),
])
def test_bad_logits_and_targets(entry, logits, targets, name):
    with pytest.raises(ValueError, match=name):
        ENTRY_POINTS[entry](logits, targets)


def test_out_of_range_message_and_custom_ignore_index():
    t = torch.tensor([0, -100, 7, 1])
    with pytest.raises(ValueError, match=r"targets.*\[0, 5\).*ignore_index=-100"):
        CGGRLoss()(_logits(4), t)
    # -100 is out of range when ignore_index is something else
    with pytest.raises(ValueError, match="ignore_index=-1"):
        cggr_loss(_logits(4), torch.tensor([0, -100, 1, 2]), 0, ignore_index=-1)
    loss, _ = cggr_loss(_logits(4), torch.tensor([0, -1, 1, 2]), 0, ignore_index=-1)
    assert math.isfinite(float(loss))


def test_logits_not_a_tensor():
    with pytest.raises(ValueError, match="logits"):
        CGGRLoss()([[0.0] * V], torch.tensor([0]))


# ----------------------------------------------------------------------------------- §5.1 configuration
@pytest.mark.parametrize("kwargs,name", [
    ({"min_tokens_ratio": 0.0}, "min_tokens_ratio"),
    ({"min_tokens_ratio": -0.25}, "min_tokens_ratio"),
    ({"min_tokens_ratio": 1.5}, "min_tokens_ratio"),
    ({"min_tokens_ratio": float("nan")}, "min_tokens_ratio"),
    ({"min_tokens_ratio": "0.25"}, "min_tokens_ratio"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"warmup_steps": True}, "warmup_steps"),
    ({"threshold_sensitivity": -0.1}, "threshold_sensitivity"),
    ({"threshold_sensitivity": float("inf")}, "threshold_sensitivity"),
    ({"threshold_sensitivity": float("nan")}, "threshold_sensitivity"),
    ({"num_strata": 0}, "num_strata"),
    ({"num_strata": 2.0}, "num_strata"),
    ({"min_tokens_per_sequence": -1}, "min_tokens_per_sequence"),
    ({"scoring": "perplexity"}, "scoring"),
    ({"scoring": "Entropy"}, "scoring"),
    ({"selection": "random"}, "selection"),
    ({"selection": "top_k"}, "selection"),
    ({"dynamic_threshold": "yes"}, "dynamic_threshold"),
    ({"ignore_index": 1.5}, "ignore_index"),
    ({"base_loss": nn.CrossEntropyLoss()}, "base_loss"),                   # reduction='mean'
    ({"base_loss": nn.CrossEntropyLoss(reduction="sum")}, "base_loss"),
    ({"base_loss": "cross_entropy"}, "base_loss"),
    ({"ratio_schedule": 0.5}, "ratio_schedule"),
])
def test_bad_configuration(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CGGRLoss(**kwargs)
    with pytest.raises(ValueError, match=name):
        cggr_loss(_logits(4), _targets(4), 0, **kwargs)


def test_base_loss_without_reduction_attribute_must_return_per_token_values():
    crit = CGGRLoss(base_loss=lambda z, t: nn.functional.cross_entropy(z, t))  # a scalar
    with pytest.raises(ValueError, match=r"base_loss.*shape \(6,\)"):
        crit(_logits(2, 3), _targets(2, 3))


def test_bad_schedule_values_and_steps():
    with pytest.raises(ValueError, match="ratio_schedule"):
        CGGRLoss(ratio_schedule=lambda s: 0.0)(_logits(4), _targets(4))
    with pytest.raises(ValueError, match="ratio_schedule"):
        cggr_loss(_logits(4), _targets(4), 0, ratio_schedule=lambda s: float("nan"))
    with pytest.raises(ValueError, match="step"):
        cggr_loss(_logits(4), _targets(4), -1)
    with pytest.raises(ValueError, match="step"):
        cggr_loss(_logits(4), _targets(4), 2.5)
    with pytest.raises(ValueError, match="step"):
        linear_warmup_ratio()(-3)
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        linear_warmup_ratio(0.0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_ratio(0.5, -10)
    with pytest.raises(ValueError, match="state_dict"):
        CGGRLoss().load_state_dict({"_extra_state": 5})
    with pytest.raises(ValueError, match="step"):
        CGGRLoss().load_state_dict({"_extra_state": {"step": -2}})


# --------------------------------------------------------------------------------- §3 scoring without targets
def test_loss_scoring_needs_targets():
    with pytest.raises(ValueError, match="targets"):
        score_tokens(_logits(4), None, scoring="loss")
    with pytest.raises(ValueError, match="valid_mask"):
        score_tokens(_logits(4), None, valid_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid_mask"):
        score_tokens(_logits(4), None, valid_mask=torch.ones(4))


# ----------------------------------------------------------------------------------- §5.2, §5.3, §7 helpers
def test_bad_ratio_and_selection_arguments():
    for r in (0.0, -0.5, 1.0001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ratio"):
            num_selected(10, r)
        with pytest.raises(ValueError, match="ratio"):
            num_selected(torch.tensor(10), torch.tensor(r))
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(torch.rand(6), torch.ones(6, dtype=torch.bool), r)
    if torch.cuda.is_available():   # a CUDA ratio is a device-side assertion: only a process of its own survives it
        assert_fails_in_a_child(
            "import torch\n"
            "from cggr_torch import num_selected\n"
            "num_selected(torch.tensor(10, device='cuda'), torch.tensor(1.5, device='cuda'))\n"
            "torch.cuda.synchronize()\n",
            r"ratio: expected a value in \(0, 1\]")
    with pytest.raises(ValueError, match="^n:"):
        num_selected(-1, 0.5)
    with pytest.raises(ValueError, match="^n:"):
        num_selected(2**31, 0.5)
    with pytest.raises(ValueError, match="threshold_sensitivity"):
        dynamic_ratio(0.5, 0.5, -1.0)
    d, e = torch.rand(6), torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="eligible"):
        select_tokens(d, e.int(), 0.5)
    with pytest.raises(ValueError, match="eligible"):
        select_tokens(d, e[:5], 0.5)
    with pytest.raises(ValueError, match="difficulty"):
        select_tokens(d.reshape(1, 2, 3), e.reshape(1, 2, 3), 0.5)
    with pytest.raises(ValueError, match="difficulty"):
        rank_tokens(torch.arange(6), e)
    with pytest.raises(ValueError, match="selection"):
        select_tokens(d, e, 0.5, selection="bottomk")
    with pytest.raises(ValueError, match="num_strata"):
        select_tokens(d, e, 0.5, selection="stratified", num_strata=0)
    with pytest.raises(ValueError, match="min_tokens_per_sequence"):
        select_tokens(d, e, 0.5, selection="sequence_aware", min_tokens_per_sequence=-1)
