"""apply_cggr / remove_cggr (the fused CGGR head on a Hugging Face causal LM) and use_cggr(head="fused") with a
real transformers Trainer on CPU (tiny models, no downloads)."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1 (the torch extra)")

from cggr_torch.causal_lm import hf_causal_lm_cggr_loss  # noqa: E402
from cggr_torch.fused_linear import FusedLinearCGGRLoss  # noqa: E402
from cggr_torch.integrations import apply_cggr, remove_cggr, use_cggr  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch.test_router import V, tiny_model  # noqa: E402
from tests.torch.test_trainer import _LogRecorder, _args, _dataset  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
CFG = dict(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)


def _batch(B: int = 3, T: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odd sizes, one right-padded row, one ignored label inside a row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, T - 4:] = 0
    ids[1, T - 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[0, 5] = -100
    return ids, am, labels


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode without dropout (GPT-2 has some), so that two forwards are comparable."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------- apply_cggr: the loss
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_cggr_loss_and_gradients_equal_hf_causal_lm_cggr_loss(family, dtype):
    ref_model = _no_dropout(tiny_model(family).to(dtype).train())
    model = copy.deepcopy(ref_model)
    ids, am, labels = _batch()
    want = hf_causal_lm_cggr_loss(ref_model, ids, labels, FusedLinearCGGRLoss(**CFG), am)
    want.backward()
    assert apply_cggr(model, **CFG) is model
    out = model(ids, labels=labels, attention_mask=am)     # input_ids positional, as users call it
    assert out.logits is None                              # never materialised in training
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss.detach(), want.detach())
    out.loss.backward()
    got, ref = _grads(model), _grads(ref_model)
    assert got.keys() == ref.keys() and len(got) > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
    m = model.cggr_loss.get_metrics()
    assert m["tokens_selected"] == oracle.num_selected(m["tokens_total"], 0.5) < m["tokens_total"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_apply_cggr_at_ratio_one_is_the_models_own_loss(family):
    """An independent reference: selecting every token, the CGGR loss is the model's own shifted cross-entropy
    (SPEC §1 shift, padding and ignore_index excluded)."""
    model = _no_dropout(tiny_model(family).train())
    ids, am, labels = _batch(B=4, T=9, seed=3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, labels=labels).loss
        apply_cggr(model, min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False)
        got = model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(got.loss, want.float(), rtol=1e-5, atol=1e-6)
    assert model.cggr_loss.get_metrics()["token_ratio"] == 1.0


def test_apply_cggr_passes_reference_nll_through_shifted_like_the_labels():
    model = tiny_model("llama").train()
    ref_model = copy.deepcopy(model)
    ids, am, labels = _batch(seed=5)
    reference = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) * 4
    cfg = dict(CFG, scoring="excess")
    want = hf_causal_lm_cggr_loss(ref_model, ids, labels, FusedLinearCGGRLoss(**cfg), am, reference_nll=reference)
    apply_cggr(model, **cfg)
    got = model(input_ids=ids, attention_mask=am, labels=labels, reference_nll=reference).loss
    assert torch.equal(got.detach(), want.detach())
    # the reference decides the selection: another reference gives another loss
    other = model(input_ids=ids, attention_mask=am, labels=labels, reference_nll=reference.flip(1)).loss
    assert not torch.equal(other.detach(), got.detach())
    with pytest.raises(ValueError, match="reference_nll"):          # excess needs it
        model(input_ids=ids, attention_mask=am, labels=labels)
    with torch.no_grad():                                           # eval: the model's own forward, column dropped
        model.eval()
        assert model(input_ids=ids, labels=labels, reference_nll=reference).logits is not None


def test_apply_cggr_all_ignored_batch():
    model = tiny_model("llama").train()
    apply_cggr(model, **CFG)
    ids, am, _ = _batch()
    out = model(input_ids=ids, attention_mask=am, labels=torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.cggr_loss.get_metrics()["tokens_selected"] == 0


def test_eval_mode_and_no_labels_run_the_models_own_forward():
    plain = tiny_model("llama")
    model = apply_cggr(copy.deepcopy(plain), **CFG)
    ids, am, labels = _batch()
    with torch.no_grad():
        for m in (plain, model):
            m.eval()
        want, got = plain(input_ids=ids, attention_mask=am, labels=labels), model(ids, am, labels=labels)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
        for m in (plain, model):                                    # training mode without labels
            m.train()
        want, got = plain(input_ids=ids, attention_mask=am), model(input_ids=ids, attention_mask=am)
        assert got.loss is None and torch.equal(got.logits, want.logits)
    assert model.cggr_loss.get_metrics()["tokens_total"] == 0      # no CGGR forward ran


def test_remove_cggr_restores_the_original_forward():
    model = tiny_model("llama").train()
    ids, am, labels = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, labels=labels)
    apply_cggr(model, **CFG)
    assert model.accepts_loss_kwargs is False
    with pytest.raises(ValueError, match="model: the fused CGGR head is already applied"):
        apply_cggr(model, **CFG)
    assert remove_cggr(model) is model
    assert "forward" not in model.__dict__ and not hasattr(model, "cggr_loss")
    assert model.accepts_loss_kwargs == type(model).accepts_loss_kwargs if hasattr(type(model), "accepts_loss_kwargs") \
        else not hasattr(model, "accepts_loss_kwargs")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, labels=labels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    with pytest.raises(ValueError, match="model: the fused CGGR head is not applied"):
        remove_cggr(model)
    apply_cggr(model, **CFG)                                        # and can be applied again
    assert model(input_ids=ids, attention_mask=am, labels=labels).logits is None


def test_save_and_reload_round_trip(tmp_path):
    model = apply_cggr(tiny_model("llama").train(), **CFG)
    model.cggr_loss.set_step(3)
    assert not any("cggr" in k for k in model.state_dict())        # the plain model's state dict
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert "forward" not in reloaded.__dict__ and not hasattr(reloaded, "cggr_loss")
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), n
    ids, am, labels = _batch()
    apply_cggr(reloaded.train(), **CFG)
    torch.testing.assert_close(reloaded(ids, am, labels=labels).loss, model(ids, am, labels=labels).loss,
                               rtol=0, atol=0)


def test_apply_cggr_rejects_bad_input_naming_it():
    with pytest.raises(ValueError, match="model: expected a Hugging Face"):
        apply_cggr(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model: expected a Hugging Face"):
        apply_cggr("llama")
    with pytest.raises(ValueError, match="model: expected a causal LM"):
        apply_cggr(tiny_model("bert"))
    no_head = tiny_model("llama")
    no_head.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="model: expected get_output_embeddings"):
        apply_cggr(no_head)
    gemma2 = tiny_model("gemma2")                                    # final-logit soft-capping (SPEC §9)
    with pytest.raises(ValueError, match="model: "):
        apply_cggr(gemma2)
    assert "forward" not in gemma2.__dict__                          # nothing half-applied
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        apply_cggr(model, min_tokens_ratio=0.0)
    with pytest.raises(ValueError, match="selection"):
        apply_cggr(model, selection="sampled")                      # the fused head does not sample
    assert "forward" not in model.__dict__
    apply_cggr(model.train(), **CFG)
    ids, am, labels = _batch()
    emb = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=emb, labels=labels)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=labels[:, :-1])
    assert model(input_ids=ids, labels=labels, return_dict=False)[0].dim() == 0


# ------------------------------------------------------------------------------------ head_kernel (SPEC §12)
def _record_head_kernel(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``head_kernel`` each fused-head forward runs with (the fused head's one decision point, called
    through: on CPU every value takes the reference path, so the value is what can be checked here)."""
    import cggr_torch.fused_linear as fused_linear

    seen: list[str] = []
    decide = fused_linear._head_gemm_for

    def recording(hidden: torch.Tensor, head_kernel: str) -> bool:
        seen.append(head_kernel)
        return decide(hidden, head_kernel)

    monkeypatch.setattr(fused_linear, "_head_gemm_for", recording)
    return seen


@pytest.mark.parametrize("head_kernel", ["auto", "gemm", "blocks"])
def test_head_kernel_reaches_the_fused_head(monkeypatch, head_kernel):
    seen = _record_head_kernel(monkeypatch)
    model = _no_dropout(tiny_model("llama").train())
    ref_model = copy.deepcopy(model)
    ids, am, labels = _batch()
    want = hf_causal_lm_cggr_loss(ref_model, ids, labels, FusedLinearCGGRLoss(head_kernel=head_kernel, **CFG), am)
    assert seen == [head_kernel]                          # hf_causal_lm_cggr_loss runs the module's head_kernel
    apply_cggr(model, head_kernel=head_kernel, **CFG)
    assert model.cggr_loss.head_kernel == head_kernel
    got = model(ids, labels=labels, attention_mask=am).loss
    assert seen == [head_kernel, head_kernel]             # apply_cggr's forward too
    assert torch.equal(got.detach(), want.detach())
    # an independent reference: without the keyword the head is "auto", the same loss on CPU
    default = apply_cggr(copy.deepcopy(ref_model), **CFG)
    assert default.cggr_loss.head_kernel == "auto"
    assert torch.equal(default(ids, labels=labels, attention_mask=am).loss.detach(), want.detach())


def test_use_cggr_fused_passes_head_kernel_to_apply_cggr(monkeypatch, tmp_path):
    seen = _record_head_kernel(monkeypatch)
    model = tiny_model("llama").train()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(6))
    use_cggr(trainer, head="fused", head_kernel="blocks", **CFG)
    assert trainer.cggr is model.cggr_loss and model.cggr_loss.head_kernel == "blocks"
    trainer.train()
    assert seen and set(seen) == {"blocks"}


def test_bad_head_kernel_is_a_value_error_naming_it():
    model = tiny_model("llama")
    for bad in ("cublas", "GEMM", None, 1):
        with pytest.raises(ValueError, match="head_kernel: expected one of"):
            apply_cggr(model, head_kernel=bad)
        assert "forward" not in model.__dict__ and "cggr_loss" not in model.__dict__     # nothing half-applied
    # "gemm" has no float64 path: refused at the first training forward, whatever the device
    double = apply_cggr(tiny_model("llama").double().train(), head_kernel="gemm", **CFG)
    ids, am, labels = _batch()
    with pytest.raises(ValueError, match="head_kernel: 'gemm' needs float32"):
        double(ids, labels=labels, attention_mask=am)


# ------------------------------------------------------------------------- use_cggr(trainer, head="fused")
def test_use_cggr_fused_trains_with_the_fused_head_and_logs(tmp_path):
    import cggr
    import cggr_torch

    assert cggr.apply_cggr is apply_cggr and cggr_torch.apply_cggr is apply_cggr
    assert cggr.remove_cggr is remove_cggr and cggr_torch.remove_cggr is remove_cggr
    model = tiny_model("llama").train()
    before = [p.detach().clone() for p in model.parameters()]
    rec = _LogRecorder()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(24),
                                   callbacks=[rec])
    assert use_cggr(trainer, head="fused", warmup_steps=2, min_tokens_ratio=0.5, dynamic_threshold=False) is trainer
    assert trainer.cggr is model.cggr_loss and trainer.model is model
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(model.training))
    out = trainer.train()
    assert trainer.state.global_step == 3 and model.cggr_loss.current_step == 3
    assert math.isfinite(out.training_loss)
    assert True not in head_calls                                    # no logits in training
    train_logs = [log for log in rec.logs if "loss" in log]
    assert [log["cggr/step"] for log in train_logs] == [0, 1, 2]     # the curriculum advanced per step
    assert [log["cggr/token_ratio"] for log in train_logs] == [1.0, 0.75, 0.5]
    for log in train_logs:
        assert math.isfinite(log["loss"])
        assert log["cggr/tokens_selected"] == oracle.num_selected(log["cggr/tokens_total"],
                                                                  log["cggr/token_ratio"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(k.startswith("cggr/") for h in trainer.state.log_history for k in h)


def test_use_cggr_fused_gradient_accumulation_scales_and_steps_once(tmp_path):
    model = tiny_model("gpt2").train()
    rec = _LogRecorder()
    trainer = use_cggr(transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                                learning_rate=0.0), train_dataset=_dataset(16), callbacks=[rec]),
        head="fused", warmup_steps=4, min_tokens_ratio=0.25)
    seen, micro = [], []
    inner = trainer.compute_loss

    def recording_loss(model, inputs, **kw):
        seen.append(model.cggr_loss.current_step if hasattr(model, "cggr_loss") else None)
        loss = inner(model, inputs, **kw)
        micro.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording_loss
    trainer.train()
    assert seen == [0, 0, 1, 1]                      # two micro-batches per optimizer step, one curriculum step
    assert trainer.state.global_step == 2 and model.cggr_loss.current_step == 2
    assert trainer.model_accepts_loss_kwargs is False
    logged = [log["loss"] for log in rec.logs if "loss" in log]
    # a per-micro-batch mean divided by the accumulation steps: the logged loss is the micro-batches' mean
    assert logged == pytest.approx([(micro[0] + micro[1]) / 2, (micro[2] + micro[3]) / 2], rel=1e-5)


def test_use_cggr_fused_resumes_the_curriculum_from_a_checkpoint(tmp_path):
    cfg = dict(warmup_steps=8, min_tokens_ratio=0.25, dynamic_threshold=False)

    def run(resume: Any = None) -> tuple[transformers.Trainer, _LogRecorder]:
        rec = _LogRecorder()
        args = _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
        trainer = use_cggr(transformers.Trainer(model=tiny_model("llama").train(), args=args,
                                                train_dataset=_dataset(24), callbacks=[rec]), head="fused", **cfg)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rec

    _, first = run()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    resumed, second = run(str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.model.cggr_loss.current_step == 4
    by_step = {log["global_step"]: log for log in first.logs if "loss" in log}
    again = [log for log in second.logs if "loss" in log]
    assert [log["global_step"] for log in again] == [3, 4]
    for log in again:                                # the curriculum continued, not restarted
        assert log["cggr/step"] == log["global_step"] - 1
        assert log["cggr/token_ratio"] == by_step[log["global_step"]]["cggr/token_ratio"] < 1.0


def test_use_cggr_fused_excess_keeps_the_reference_column(tmp_path):
    rows = _dataset(12)
    g = torch.Generator().manual_seed(0)
    for row in rows:
        row["reference_nll"] = torch.rand(row["input_ids"].shape, generator=g) * 3
    trainer = use_cggr(transformers.Trainer(model=tiny_model("llama").train(), args=_args(tmp_path, max_steps=2),
                                            train_dataset=rows, eval_dataset=rows),
                       head="fused", scoring="excess", warmup_steps=0, min_tokens_ratio=0.5)
    out = trainer.train()                            # excess without the column would raise (reference_nll)
    assert math.isfinite(out.training_loss) and trainer.cggr.current_step == 2
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_use_cggr_fused_evaluation_uses_the_trainers_own_loss(tmp_path):
    model = tiny_model("llama")
    data = _dataset(6, pad_every=2)
    trainer = use_cggr(transformers.Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=6),
                                            eval_dataset=data), head="fused", warmup_steps=0, min_tokens_ratio=0.25)
    metrics = trainer.evaluate()
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    with torch.no_grad():
        want = model.eval()(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)


def test_use_cggr_fused_rejects_bad_arguments_naming_them(tmp_path):
    from cggr_torch import CGGRModel

    data = _dataset(6)

    def plain(model: Any = None, **kw: Any) -> transformers.Trainer:
        return transformers.Trainer(model=model or tiny_model("llama"), args=_args(tmp_path, **kw),
                                    train_dataset=data)

    with pytest.raises(ValueError, match="head: expected one of"):
        use_cggr(plain(), head="logits")
    trainer = plain()
    with pytest.raises(ValueError, match="cggr_model: .*head='split'"):
        use_cggr(trainer, CGGRModel(trainer.model, router_layers=1), head="fused")
    with pytest.raises(ValueError, match="label_smoothing"):
        use_cggr(plain(label_smoothing_factor=0.1), head="fused")
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        use_cggr(plain(), head="fused", min_tokens_ratio=2.0)
    with pytest.raises(ValueError, match="model: "):
        use_cggr(plain(tiny_model("gemma2")), head="fused")
    trainer = use_cggr(plain(), head="fused")
    with pytest.raises(ValueError, match="trainer: it already uses CGGR"):
        use_cggr(trainer, head="fused")
    with pytest.raises(ValueError, match="trainer: it already uses CGGR"):
        use_cggr(trainer)
    applied = apply_cggr(tiny_model("llama"), **CFG)
    with pytest.raises(ValueError, match="config: the model already has the fused CGGR head"):
        use_cggr(plain(applied), head="fused", warmup_steps=3)
    reused = use_cggr(plain(applied), head="fused")                # an applied model's head is used as is
    assert reused.cggr is applied.cggr_loss
    trainer.model.train()
    with pytest.raises(ValueError, match="inputs: .*labels"):
        trainer.compute_loss(trainer.model, {"input_ids": data[0]["input_ids"][None]})


def test_a_trainer_built_after_apply_cggr_scales_for_accumulation(tmp_path):
    """Without use_cggr, a Trainer built on an applied model must not pass num_items_in_batch (the forward
    rejects it) and must divide the per-micro-batch mean by the accumulation steps."""
    model = apply_cggr(tiny_model("llama").train(), **CFG)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=2,
                                                           per_device_train_batch_size=3),
                                   train_dataset=_dataset(6))
    assert trainer.model_accepts_loss_kwargs is False
    assert math.isfinite(trainer.train().training_loss)
    assert model.cggr_loss.current_step == 0          # no step callback without use_cggr: call step() yourself
