"""CGGRTrainer / CGGRStepCallback with a real transformers Trainer on CPU (tiny model, no downloads)."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1 (the torch extra)")

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from cggr_torch.batch_split import CGGRModel  # noqa: E402
from cggr_torch.integrations import CGGRStepCallback, CGGRTrainer  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch.test_router import V, tiny_model  # noqa: E402


def _dataset(n: int, T: int = 10, seed: int = 0, pad_every: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (T,), generator=g)
        am = torch.ones(T, dtype=torch.long)
        if i % pad_every == 1:
            am[T - 3:] = 0
            ids[T - 3:] = 0
        labels = ids.masked_fill(am == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return rows


def _args(tmp_path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=6,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_runs_batch_splitting_and_advances_the_curriculum(tmp_path):
    model = tiny_model("llama").train()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = CGGRTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(24),
                          cggr_kwargs=dict(router_layers=2, warmup_steps=2, min_tokens_ratio=0.5))
    out = trainer.train()
    assert trainer.state.global_step == 3 and trainer.cggr.current_step == 3
    assert math.isfinite(out.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    # the last logged step ran at curriculum step 2 = end of warm-up: ratio 0.5 before the dynamic threshold
    assert last["cggr/step"] == 2 and last["cggr/token_ratio"] == 0.5
    want = oracle.num_selected(last["cggr/sequences_total"], last["cggr/effective_ratio"])
    assert last["cggr/sequences_selected"] == want < 6
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.model is model                      # the Trainer trains (and saves) the plain model


def test_gradient_accumulation_steps_the_curriculum_once_per_optimizer_step(tmp_path):
    model = tiny_model("gpt2").train()
    trainer = CGGRTrainer(model=model, args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                  per_device_train_batch_size=4),
                          train_dataset=_dataset(16), cggr_kwargs=dict(router_layers=1, warmup_steps=0))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.cggr.current_step == 2
    assert trainer.model_accepts_loss_kwargs is False   # per-micro-batch mean, scaled by the Trainer


def test_evaluation_uses_the_standard_full_batch_loss(tmp_path):
    model = tiny_model("llama")
    data = _dataset(6, pad_every=2)
    trainer = CGGRTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=6), eval_dataset=data,
                          cggr_kwargs=dict(router_layers=1, warmup_steps=0, min_tokens_ratio=0.25))
    metrics = trainer.evaluate()
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    with torch.no_grad():
        want = model(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)


def test_callback_resumes_from_the_global_step():
    cggr = CGGRModel(tiny_model("gpt2"), router_layers=1)
    cb = CGGRStepCallback(cggr)
    state, control = TrainerState(), TrainerControl()
    state.global_step = 7                         # as restored from a checkpoint
    cb.on_step_begin(None, state, control)
    assert cggr.current_step == 7
    state.global_step = 8
    cb.on_step_end(None, state, control)
    assert cggr.current_step == 8
    cb.on_step_begin(None, state, control)        # already aligned: unchanged
    assert cggr.current_step == 8
    with pytest.raises(ValueError, match="step"):
        CGGRStepCallback(object())


def test_callback_resyncs_every_cggr_object_including_a_loss():
    """A resumed CGGRLoss used to be silently left at step 0 (it had no set_step); now every CGGR object the
    callback is given or finds inside the model is re-synced at train begin and step begin."""
    from cggr_torch import CGGRLoss, CGGRScorer, create_truncated_router
    from cggr_torch.fused_linear import FusedLinearCGGRLoss

    model = tiny_model("gpt2")
    inner = CGGRLoss(warmup_steps=10)
    model.cggr_loss = inner                       # a CGGR module registered inside the trained model
    loss = FusedLinearCGGRLoss(warmup_steps=10)
    scorer = CGGRScorer(create_truncated_router(model, 1))
    cb = CGGRStepCallback([loss, scorer])
    state, control = TrainerState(), TrainerControl()
    state.global_step = 5                         # as restored from a checkpoint
    cb.on_train_begin(None, state, control, model=model)
    assert loss.current_step == scorer.current_step == inner.current_step == 5
    cb.on_step_end(None, state, control)
    assert loss.current_step == scorer.current_step == inner.current_step == 6
    state.global_step = 9
    cb.on_step_begin(None, state, control)
    assert loss.current_step == scorer.current_step == inner.current_step == 9
    # CGGRLoss.set_step validates like every step argument and is restored by state_dict
    with pytest.raises(ValueError, match="step: expected an integer >= 0"):
        inner.set_step(-1)
    fresh = CGGRLoss(warmup_steps=10)
    fresh.load_state_dict(inner.state_dict())
    assert fresh.current_step == 9
    # CGGRTrainer's callback finds the model's CGGR modules by itself
    cb2 = CGGRStepCallback(CGGRModel(model, router_layers=1), model=model)
    assert any(o is inner for o in cb2.objects)


def test_trainer_rejects_what_it_would_silently_ignore(tmp_path):
    model = tiny_model("llama")
    data = _dataset(6)
    with pytest.raises(ValueError, match="label_smoothing"):
        CGGRTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), train_dataset=data,
                    cggr_kwargs=dict(router_layers=1))
    with pytest.raises(ValueError, match="same model"):
        CGGRTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                    cggr_model=CGGRModel(tiny_model("llama", seed=2), router_layers=1))
    with pytest.raises(ValueError, match="not both"):
        CGGRTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                    cggr_model=CGGRModel(model, router_layers=1), cggr_kwargs=dict(router_layers=1))
    trainer = CGGRTrainer(model=model, args=_args(tmp_path), train_dataset=data, cggr_kwargs=dict(router_layers=1))
    model.train()
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, {"input_ids": data[0]["input_ids"][None]})


def test_hf_trainer_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example_under_test", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--steps", "3", "--warmup", "1", "--max-chars", "20000", "--batch-size", "4",
                        "--seq-len", "16", "--layers", "2", "--router-layers", "1", "--d-model", "16",
                        "--out", str(tmp_path)])
    assert res["cggr"]["cggr_step"] == 3 and math.isfinite(res["cggr"]["eval_loss"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "cggr" / "final").is_dir()


# ------------------------------------------------------------------------------ use_cggr: the one-call switch
class _LogRecorder(transformers.TrainerCallback):
    """Every ``logs`` dict that reaches the callbacks (what wandb / tensorboard receive)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"global_step": state.global_step, **(logs or {})})


def test_use_cggr_switches_a_plain_trainer_and_its_metrics_reach_on_log(tmp_path):
    import cggr
    import cggr_torch
    from cggr_torch.integrations import use_cggr

    assert cggr.use_cggr is use_cggr and cggr_torch.use_cggr is use_cggr
    model = tiny_model("llama").train()
    rows: list[int] = []
    model.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    rec = _LogRecorder()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(24),
                                   callbacks=[rec])
    assert use_cggr(trainer, router_layers=2, warmup_steps=2, min_tokens_ratio=0.5) is trainer
    assert isinstance(trainer.cggr, CGGRModel) and trainer.cggr.model is model and trainer.model is model
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.cggr.current_step == 3
    train_logs = [log for log in rec.logs if "loss" in log]
    assert [log["cggr/step"] for log in train_logs] == [0, 1, 2]          # the curriculum advanced per step
    assert [log["cggr/token_ratio"] for log in train_logs] == [1.0, 0.75, 0.5]
    for log in train_logs:
        assert all(isinstance(v, (int, float)) for k, v in log.items() if k.startswith("cggr/"))
        assert {"cggr/sequences_selected", "cggr/sequences_total", "cggr/effective_ratio"} <= set(log)
    last = train_logs[-1]
    assert last["cggr/sequences_selected"] == oracle.num_selected(last["cggr/sequences_total"],
                                                                  last["cggr/effective_ratio"]) < 6
    assert rows[-1] == last["cggr/sequences_selected"] < 6    # the model's forward saw only the kept rows
    assert any(k.startswith("cggr/") for h in trainer.state.log_history for k in h)   # and the Trainer's history


def test_use_cggr_with_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    from cggr_torch.integrations import use_cggr

    model = tiny_model("gpt2").train()
    trainer = use_cggr(transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                                logging_steps=2), train_dataset=_dataset(16)),
        router_layers=1, warmup_steps=4, min_tokens_ratio=0.25)
    seen, reads = [], []
    inner_loss, inner_metrics = trainer.compute_loss, trainer.cggr.get_metrics

    def recording_loss(model, inputs, **kw):
        seen.append(trainer.cggr.current_step)
        return inner_loss(model, inputs, **kw)

    def counting_metrics():
        reads.append(trainer.state.global_step)
        return inner_metrics()

    trainer.compute_loss = recording_loss
    trainer.cggr.get_metrics = counting_metrics
    trainer.train()
    assert seen == [0, 0, 1, 1]                      # two micro-batches per optimizer step, one curriculum step
    assert trainer.state.global_step == 2 and trainer.cggr.current_step == 2
    assert reads == [2]                              # the metrics are read (device sync) at logging steps only
    assert trainer.model_accepts_loss_kwargs is False


def test_use_cggr_resumes_the_curriculum_from_a_checkpoint(tmp_path):
    from cggr_torch.integrations import use_cggr

    cfg = dict(router_layers=1, warmup_steps=8, min_tokens_ratio=0.25, dynamic_threshold=False)

    def run(resume: Any = None) -> tuple[transformers.Trainer, _LogRecorder]:
        rec = _LogRecorder()
        args = _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
        trainer = use_cggr(transformers.Trainer(model=tiny_model("llama").train(), args=args,
                                                train_dataset=_dataset(24), callbacks=[rec]), **cfg)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rec

    _, first = run()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    resumed, second = run(str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.cggr.current_step == 4
    by_step = {log["global_step"]: log for log in first.logs if "loss" in log}
    again = [log for log in second.logs if "loss" in log]
    assert [log["global_step"] for log in again] == [3, 4]            # only the steps after the checkpoint ran
    for log in again:                                                 # the curriculum continued, not restarted
        assert log["cggr/step"] == log["global_step"] - 1
        assert log["cggr/token_ratio"] == by_step[log["global_step"]]["cggr/token_ratio"] < 1.0


def test_use_cggr_evaluation_uses_the_trainers_own_loss(tmp_path):
    from cggr_torch.integrations import use_cggr

    model = tiny_model("llama")
    data = _dataset(6, pad_every=2)
    trainer = use_cggr(transformers.Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=6),
                                            eval_dataset=data), router_layers=1, warmup_steps=0,
                       min_tokens_ratio=0.25)
    metrics = trainer.evaluate()
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    with torch.no_grad():
        want = model(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)


def test_use_cggr_rejects_bad_arguments_naming_them(tmp_path):
    from cggr_torch.integrations import use_cggr

    model = tiny_model("llama")
    data = _dataset(6)

    def plain(**kw: Any) -> transformers.Trainer:
        return transformers.Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=data)

    with pytest.raises(ValueError, match="trainer: expected a transformers.Trainer"):
        use_cggr(model, router_layers=1)
    trainer = use_cggr(plain(), router_layers=1)
    with pytest.raises(ValueError, match="trainer: it already uses CGGR"):
        use_cggr(trainer, router_layers=1)
    with pytest.raises(ValueError, match="trainer: it already uses CGGR"):
        use_cggr(CGGRTrainer(model=model, args=_args(tmp_path), train_dataset=data, cggr_kwargs=dict(router_layers=1)))
    with pytest.raises(ValueError, match="config: .*not both"):
        use_cggr(plain(), cggr_model=CGGRModel(model, router_layers=1), router_layers=1)
    with pytest.raises(ValueError, match="cggr_model: it must wrap the same model"):
        use_cggr(plain(), cggr_model=CGGRModel(tiny_model("llama", seed=2), router_layers=1))
    with pytest.raises(ValueError, match="label_smoothing"):
        use_cggr(plain(label_smoothing_factor=0.1), router_layers=1)
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        use_cggr(plain(), router_layers=1, min_tokens_ratio=0.0)
    model.train()
    with pytest.raises(ValueError, match="inputs: .*labels"):
        trainer.compute_loss(model, {"input_ids": data[0]["input_ids"][None]})
