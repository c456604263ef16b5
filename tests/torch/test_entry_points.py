"""Every PyTorch entry point builds ONE cggr.CGGRConfig (or takes config=), stores it as .config, and shares the
curriculum state and the select-and-measure pipeline; the selection dtype rule of SPEC §6 (float64 rounded to
float32 before ranking); errors that name the caller's argument."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from cggr import CGGRConfig
from cggr_torch import CGGRLoss, CGGRModel, CGGRScorer, cggr_loss, dispatch, select_tokens
from cggr_torch.distributed import DistributedCGGRLoss
from cggr_torch.fused_linear import FusedLinearCGGRLoss, fused_linear_cggr
from tests import oracle
from tests.torch import random_logits, random_targets


class _Router(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, **kw):
        return torch.zeros(*input_ids.shape, 7)


def test_every_entry_point_stores_one_config():
    cfg = CGGRConfig(scoring="entropy", selection="topk", warmup_steps=3, min_tokens_ratio=0.5)
    for obj in (CGGRLoss(config=cfg), FusedLinearCGGRLoss(config=cfg), DistributedCGGRLoss(config=cfg),
                CGGRScorer(_Router(), config=cfg), CGGRModel(torch.nn.Linear(2, 2), _Router(), config=cfg)):
        assert obj.config is cfg
        assert obj.scoring == "entropy" and obj.warmup_steps == 3 and obj.min_tokens_ratio == 0.5
        assert callable(obj.set_step) and obj.current_step == 0
    built = CGGRLoss(selection="topk", warmup_steps=3)
    assert built.config == CGGRConfig(selection="topk", warmup_steps=3)
    # batch splitting and the scorer default to topk (SPEC §9), the losses to stratified
    assert CGGRModel(torch.nn.Linear(2, 2), _Router()).config.selection == "topk"
    assert CGGRScorer(_Router()).config.selection == "topk" and CGGRLoss().config.selection == "stratified"
    with pytest.raises(ValueError, match="config: pass either config= or the settings"):
        CGGRLoss(config=cfg, warmup_steps=7)
    with pytest.raises(ValueError, match="config: expected None or a cggr.CGGRConfig"):
        CGGRLoss(config={"scoring": "entropy"})
    with pytest.raises(ValueError, match="selection: batch splitting selects whole sequences"):
        CGGRModel(torch.nn.Linear(2, 2), _Router(), config=CGGRConfig())        # stratified: tokens
    with pytest.raises(AttributeError):
        built.selection = "topk"                                                # frozen, read through .config


def test_functional_entry_points_take_config():
    rng = np.random.default_rng(3)
    logits, targets = random_logits(rng, (2, 5, 11)), random_targets(rng, (2, 5), 11)
    cfg = CGGRConfig(selection="topk", warmup_steps=0, min_tokens_ratio=0.5)
    a, ma = cggr_loss(logits, targets, 0, config=cfg)
    b, mb = cggr_loss(logits, targets, 0, selection="topk", warmup_steps=0, min_tokens_ratio=0.5)
    assert float(a) == float(b) and int(ma["tokens_selected"]) == int(mb["tokens_selected"])
    h, w = torch.randn(2, 5, 4), torch.randn(11, 4)
    out = fused_linear_cggr(h, w, targets, 0, config=cfg)
    assert int(out.metrics["tokens_selected"]) == int(
        fused_linear_cggr(h, w, targets, 0, selection="topk", warmup_steps=0, min_tokens_ratio=0.5)
        .metrics["tokens_selected"])


def test_cggr_model_config_is_keyword_only():
    params = list(inspect.signature(CGGRModel).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "router"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    with pytest.raises(TypeError):
        CGGRModel(torch.nn.Linear(2, 2), _Router(), "entropy")


def test_float64_difficulties_are_rounded_to_float32_before_ranking():
    """SPEC §6: both packages select the same tokens from the same float64 array."""
    d = np.array([1.0 + 2**-40, 1.0, 0.5, 1.0 + 2**-30], dtype=np.float64)   # the first two tie in float32
    e = np.ones(4, dtype=bool)
    m64, k64 = select_tokens(torch.from_numpy(d), torch.from_numpy(e), 0.5, selection="topk")
    m32, k32 = select_tokens(torch.from_numpy(d.astype(np.float32)), torch.from_numpy(e), 0.5, selection="topk")
    assert torch.equal(m64, m32) and int(k64) == int(k32) == 2 and k64.dtype == torch.int32
    # the float32 tie goes to the lower index: token 0 (not the float64-larger token 3 ... which also rounds up)
    ref, _ = oracle.select_tokens(d.astype(np.float32).astype(np.float64), e, np.float32(0.5), "topk")
    np.testing.assert_array_equal(m64.numpy(), ref)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.standard_normal(30) * 1e-9 + 1.0                               # many float32 ties
        e = rng.random(30) < 0.9
        for selection in oracle.SELECTION_STRATEGIES:
            a, _ = select_tokens(torch.from_numpy(d), torch.from_numpy(e), 0.3, selection=selection)
            b, _ = select_tokens(torch.from_numpy(d).float(), torch.from_numpy(e), 0.3, selection=selection)
            assert torch.equal(a, b)


def test_dispatch_force_nests_and_restores():
    x = torch.zeros(2)
    assert dispatch.mode() == "auto" and not dispatch.use_kernels(x)
    with dispatch.force("kernel"):
        assert dispatch.use_kernels(x) and dispatch.use_fused_loss(x)
        with dispatch.force("reference"):
            assert not dispatch.use_kernels(x) and not dispatch.kernels_enabled()
        assert dispatch.use_kernels(x)
        with dispatch.force("kernel", fused_loss=False):
            assert dispatch.use_kernels(x) and not dispatch.use_fused_loss(x)
    assert dispatch.mode() == "auto" and not dispatch.use_kernels(x)


def test_moved_names_keep_their_old_import_paths():
    """The module split (causal_lm, scorer, fused_linear_backward) kept every public name importable from its
    former module, as the same object, and listed in that module's ``__all__``."""
    import importlib

    moved = {
        ("fused_linear", "causal_lm"): ("hf_base_and_head", "hf_causal_lm_cggr_loss"),
        ("fused_linear", "fused_linear_backward"): ("gradient_kernel_for", "accumulates_in_place",
                                                    "accumulate_matmul"),
        ("router", "scorer"): ("CGGRScorer", "router_token_scores", "scored_index"),
    }
    for (old, new), names in moved.items():
        old_mod = importlib.import_module(f"cggr_torch.{old}")
        new_mod = importlib.import_module(f"cggr_torch.{new}")
        for name in names:
            assert name in old_mod.__all__ and name in new_mod.__all__, (old, new, name)
            assert getattr(old_mod, name) is getattr(new_mod, name), (old, new, name)
    from cggr_torch.fused_linear import hf_causal_lm_cggr_loss  # noqa: F401 - the from-import form works too
    from cggr_torch.router import CGGRScorer as OldScorer
    assert OldScorer is CGGRScorer
    with pytest.raises(AttributeError):
        importlib.import_module("cggr_torch.router").no_such_name  # noqa: B018
