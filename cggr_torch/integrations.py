"""Hugging Face ``Trainer`` integration of batch splitting (:class:`~cggr_torch.batch_split.CGGRModel`).

::

    from cggr_torch.integrations import CGGRTrainer

    trainer = CGGRTrainer(
        model=model,                                  # a …ForCausalLM, trained and saved as usual
        args=TrainingArguments(...),
        train_dataset=train_ds,                       # rows with input_ids, labels (and attention_mask)
        cggr_kwargs=dict(min_tokens_ratio=0.25, warmup_steps=1000, router_layers=4),
    )
    trainer.train()

What it does:

* ``compute_loss`` runs :meth:`CGGRModel.forward_with` with the model the Trainer hands it (possibly wrapped by
  DDP/accelerate) as the main pass: the truncated router scores the batch under ``no_grad`` and only the hardest
  sequences go through the model's forward and backward. Evaluation (``model.training`` false) uses the
  standard full-batch loss of ``Trainer.compute_loss``.
* :class:`CGGRStepCallback` (added automatically) calls ``step()`` of every CGGR object (the ``CGGRModel`` and
  any CGGR module inside the model) after every optimizer step (``on_step_end``) and, at train begin and at the
  start of every step, aligns each curriculum step with ``state.global_step`` if they differ, so that resuming
  from a checkpoint resumes the curriculum where it was.
* The returned loss is a per-micro-batch mean; the trainer divides it by the gradient-accumulation steps
  (``model_accepts_loss_kwargs`` is turned off for this trainer, so ``num_items_in_batch`` computed over the
  full batch is not applied to the kept sequences; this behaves the same on transformers 5.17-5.23).
* Logged training metrics gain ``cggr/<metric>`` entries from :meth:`CGGRModel.get_metrics` of the last step.
* The Trainer's own model is untouched (the wrapper holds it by reference), so ``save_model`` and
  checkpoints are the usual ones.

Label smoothing (``label_smoothing_factor > 0``) and ``compute_loss_func`` are rejected with a ``ValueError``:
the main pass uses the model's own cross-entropy over the kept sequences and would silently ignore them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .batch_split import CGGRModel
from .curriculum import Curriculum

__all__ = ["CGGRTrainer", "CGGRStepCallback", "cggr_objects"]


class CGGRStepCallback(TrainerCallback):
    """Advance the curriculum of every CGGR object of a training run with the Trainer.

    ``cggr``: one object with a ``step()`` method (``CGGRModel``, ``CGGRScorer``, ``CGGRLoss``, the fused or
    distributed loss) or a list of them. With ``model=...`` every CGGR module inside that model (e.g. a
    ``CGGRLoss`` registered as a sub-module) is found as well (:func:`cggr_objects`).

    * ``on_train_begin`` and ``on_step_begin``: every object whose curriculum step differs from
      ``state.global_step`` (a fresh start after a resume from a checkpoint) is set to it with ``set_step``;
    * ``on_step_end`` (after the optimizer step and ``global_step += 1``): ``step()`` on every object.
    """

    def __init__(self, cggr: Any, model: Optional[torch.nn.Module] = None) -> None:
        objects = list(cggr) if isinstance(cggr, (list, tuple)) else [cggr]
        for obj in objects:
            if not callable(getattr(obj, "step", None)):
                raise ValueError(f"cggr: expected an object with a step() method (CGGRModel, CGGRScorer, "
                                 f"CGGRLoss), got {type(obj).__name__}")
        if model is not None:
            objects += [m for m in cggr_objects(model) if all(m is not o for o in objects)]
        self.objects = objects
        self.cggr = objects[0] if len(objects) == 1 else objects

    def _resync(self, global_step: int) -> None:
        for obj in self.objects:
            current = getattr(obj, "current_step", None)
            if current is not None and int(current) != global_step and callable(getattr(obj, "set_step", None)):
                obj.set_step(int(global_step))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        model = kwargs.get("model")
        if isinstance(model, torch.nn.Module):   # CGGR modules inside the trained model are re-synced too
            self.objects += [m for m in cggr_objects(model) if all(m is not o for o in self.objects)]
        self._resync(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._resync(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        for obj in self.objects:
            obj.step()


def cggr_objects(module: torch.nn.Module) -> list[Any]:
    """Every CGGR object with a curriculum inside ``module`` (itself included): the modules deriving from
    :class:`cggr_torch.curriculum.Curriculum` (``CGGRLoss`` and its fused/distributed forms, ``CGGRScorer``,
    ``CGGRModel``), each once."""
    found: list[Any] = []
    for m in module.modules():
        if isinstance(m, Curriculum) and all(m is not f for f in found):
            found.append(m)
    return found


class CGGRTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is CGGR batch splitting (see the module docstring).

    Args:
        *args, **kwargs: as ``Trainer`` (``model`` is required: the model to train).
        cggr_model: a :class:`CGGRModel` wrapping the Trainer's ``model``; or
        cggr_kwargs: keyword arguments to build one (``CGGRModel(model, **cggr_kwargs)``). Not both.

    Attributes:
        cggr: the ``CGGRModel`` in use (``trainer.cggr.get_metrics()`` after a step).

    Raises:
        ValueError: both or a mismatched ``cggr_model``, label smoothing, or a ``compute_loss_func``.
    """

    def __init__(self, *args: Any, cggr_model: Optional[CGGRModel] = None,
                 cggr_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ValueError("model: CGGRTrainer needs the model to train (model_init is not supported)")
        if cggr_model is not None and cggr_kwargs:
            raise ValueError("cggr_kwargs: pass either a ready CGGRModel (cggr_model) or cggr_kwargs, not both")
        if cggr_model is None:
            cggr_model = CGGRModel(self.model, **(cggr_kwargs or {}))
        elif not isinstance(cggr_model, CGGRModel):
            raise ValueError(f"cggr_model: expected a CGGRModel, got {type(cggr_model).__name__}")
        elif cggr_model.model is not self.model:
            raise ValueError("cggr_model: it must wrap the same model object that is given to the Trainer")
        if self.label_smoother is not None:
            raise ValueError("args.label_smoothing_factor: not supported by CGGRTrainer (the kept sequences are "
                             "trained with the model's own cross-entropy); set it to 0")
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func: not supported by CGGRTrainer (batch splitting computes the loss)")
        self.cggr = cggr_model
        # The CGGR loss is a per-micro-batch mean over the kept sequences: let the Trainer scale it for gradient
        # accumulation and never hand it num_items_in_batch (counted over the full batch).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.add_callback(CGGRStepCallback(cggr_model, model=self.model))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        """Batch-split loss in training mode; the standard loss otherwise. ``num_items_in_batch`` is unused."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        inputs = dict(inputs)
        if "input_ids" not in inputs or inputs.get("labels") is None:
            raise ValueError(f"inputs: CGGRTrainer needs 'input_ids' and 'labels' in every batch, got keys "
                             f"{sorted(inputs)} (use a collator that sets labels, e.g. "
                             f"DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        input_ids = inputs.pop("input_ids")
        labels = inputs.pop("labels")
        attention_mask = inputs.pop("attention_mask", None)
        result = self.cggr.forward_with(model, input_ids, labels, attention_mask, **inputs)
        return (result.loss, result.outputs) if return_outputs else result.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the last step's ``cggr/<metric>`` values to training logs (those that carry ``loss``)."""
        if "loss" in logs and self.cggr._last is not None:
            for key, value in self.cggr.get_metrics().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    logs[f"cggr/{key}"] = value
        super().log(logs, *args, **kwargs)
