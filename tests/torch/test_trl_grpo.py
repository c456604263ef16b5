"""``cggr_torch.rl.CGGRGRPOTrainer``: TRL's ``GRPOTrainer`` with log-probs and entropies from the fused token stats
(SPEC §14.5). Tiny Llama from a config, toy reward, CPU, no downloads.

With every token kept (``top_entropy_quantile = 1``) the loss and the gradients equal TRL's own path on the same
generated batch; with ``ρ < 1`` the entropy mask is CGGR's top-k (SPEC §7.1). Skipped without ``trl``
(tested with trl 1.16.0)."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1 (the torch extra)")
trl = pytest.importorskip("trl", reason="trl is not installed (the dev extra has it: pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets", reason="trl's GRPOTrainer needs the datasets package")

from cggr_torch.rl import CGGRGRPOTrainer, fused_per_token_logps_and_entropies  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch.test_router import tiny_model  # noqa: E402
from tests.torch.test_trl import _tokenizer  # noqa: E402


def _reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """A toy reward: longer completions with more distinct words score higher."""
    return [len(set(str(c).split())) / 5.0 + len(str(c)) / 100.0 for c in completions]


def _dataset() -> Any:
    return datasets.Dataset.from_dict({"prompt": [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(4))
                                                  for i in range(8)]})


def _trainer(cls: type, model: Any, tmp_path: Any, q: float = 1.0, **kw: Any) -> Any:
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=6, max_steps=3, learning_rate=1e-3,
                          logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                          top_entropy_quantile=q, temperature=0.9, bf16=False, **kw)
    return cls(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(), processing_class=_tokenizer())


def _loss_and_grads(trainer: Any, inputs: dict[str, Any]) -> tuple[float, list[torch.Tensor]]:
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1      # set by train(); compute_loss reads it
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]


def _assert_same_loss_and_grads(theirs: Any, theirs_inputs: dict[str, Any], ours: Any,
                                ours_inputs: dict[str, Any]) -> None:
    """TRL's loss and gradients on its batch equal ours on ours (non-zero gradients, float32 rounding)."""
    la, ga = _loss_and_grads(theirs, theirs_inputs)
    lb, gb = _loss_and_grads(ours, ours_inputs)
    assert len(ga) == len(gb) > 0
    assert abs(la - lb) <= 1e-6 + 1e-5 * abs(la)
    scale = max(float(g.abs().max()) for g in ga)
    assert scale > 0
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) <= 1e-5 * scale


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.0), ("grpo", 0.0), ("bnpo", 0.0)])
def test_all_tokens_kept_equals_trls_own_path(tmp_path, loss_type, beta):
    """(The KL term, ``beta > 0``: :func:`test_kl_to_the_reference_equals_trls_own_path`.)"""
    model = tiny_model("llama").train()
    theirs = _trainer(trl.GRPOTrainer, copy.deepcopy(model), tmp_path / "a", loss_type=loss_type, beta=beta)
    ours = _trainer(CGGRGRPOTrainer, copy.deepcopy(model), tmp_path / "b", loss_type=loss_type, beta=beta)
    torch.manual_seed(0)
    inputs = theirs._generate_and_score_completions([_dataset()[i] for i in range(4)])
    _assert_same_loss_and_grads(theirs, inputs, ours, inputs)


def test_kl_to_the_reference_equals_trls_own_path(tmp_path):
    """``beta > 0``: TRL loads the reference model by the policy's ``name_or_path``; a tiny model saved to a local
    folder makes that an offline load. Each trainer computes its own batch (the same completions from the same
    seed, the reference's log-probs from its own head): the reference log-probs, the loss with its KL term and
    the gradients agree."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "policy")
    model.config._name_or_path = str(tmp_path / "policy")
    with torch.no_grad():            # the policy moves away from the saved reference: a non-zero KL and gradient
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    theirs = _trainer(trl.GRPOTrainer, copy.deepcopy(model), tmp_path / "a", loss_type="dapo", beta=0.04)
    ours = _trainer(CGGRGRPOTrainer, copy.deepcopy(model), tmp_path / "b", loss_type="dapo", beta=0.04)
    assert theirs.ref_model is not None and ours.ref_model is not None
    batches = []
    for trainer in (theirs, ours):
        torch.manual_seed(0)
        batches.append(trainer._generate_and_score_completions([_dataset()[i] for i in range(4)]))
    a, b = batches
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    torch.testing.assert_close(b["ref_per_token_logps"], a["ref_per_token_logps"], atol=1e-5, rtol=1e-5)
    ids = torch.cat([a["prompt_ids"], a["completion_ids"]], 1)
    with torch.no_grad():
        policy_logps, _ = fused_per_token_logps_and_entropies(model, ids, torch.cat([a["prompt_mask"],
                                                              a["completion_mask"]], 1), ids.shape[1] -
                                                              a["prompt_ids"].shape[1], temperature=0.9)
    assert (policy_logps - a["ref_per_token_logps"]).abs().max() > 1e-2     # the KL term is not zero
    _assert_same_loss_and_grads(theirs, a, ours, b)


def test_per_token_logps_match_trl(tmp_path):
    model = tiny_model("llama").train()
    theirs = _trainer(trl.GRPOTrainer, copy.deepcopy(model), tmp_path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    lp_a, ent_a, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, mask, 6, compute_entropy=True)
    lp_b, ent_b = fused_per_token_logps_and_entropies(model, ids, mask, 6, temperature=0.9, compute_entropy=True)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=1e-5)
    assert (lp_b[1, -2:] == 0).all() and (ent_b[1, -2:] == 0).all()
    with pytest.raises(ValueError, match="logits_to_keep"):
        fused_per_token_logps_and_entropies(model, ids, mask, 10)


def test_entropy_mask_is_cggr_topk(tmp_path):
    ours = _trainer(CGGRGRPOTrainer, tiny_model("llama").train(), tmp_path, q=0.2)
    g = torch.Generator().manual_seed(2)
    ent = torch.rand(4, 6, generator=g)
    ent[0, 0] = ent[0, 1]                      # a tie: the lower flat index wins
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[3, 4:] = 0
    kept = ours.get_high_entropy_mask(ent, mask, 1 - 0.2)
    ref, k = oracle.select_tokens(ent.double().numpy(), mask.bool().numpy(), 0.2, "topk")
    assert k == oracle.num_selected(22, 0.2) == int(kept.sum())
    assert (kept.numpy() == ref).all()


def test_a_few_training_steps(tmp_path):
    model = tiny_model("llama").train()
    before = [p.detach().clone() for p in model.parameters()]
    ours = _trainer(CGGRGRPOTrainer, model, tmp_path, q=0.2)
    out = ours.train()
    assert ours.state.global_step == 3 and math.isfinite(out.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
