"""Hugging Face ``Trainer`` integration of batch splitting (:class:`~cggr_torch.batch_split.CGGRModel`).

One call switches an existing ``Trainer`` (or a subclass such as TRL's ``SFTTrainer``) to CGGR, as Liger's
``apply_liger_kernel_to_*`` does for kernels::

    from cggr_torch.integrations import use_cggr

    trainer = use_cggr(Trainer(model=model, args=args, train_dataset=train_ds),
                       min_tokens_ratio=0.25, warmup_steps=1000, router_layers=4)
    trainer.train()

or, equivalently, the subclass::

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

``use_cggr`` does the same to a ready trainer instance: it replaces the instance's ``compute_loss`` and ``log``
(the class's own ones stay in use for evaluation and are called for every log), so it composes with any
``Trainer`` subclass. In training mode the subclass's own ``compute_loss`` is *not* run (e.g. the extra
training metrics of TRL's ``SFTTrainer``); packed batches (``padding_free``) are one row and are never split.

Label smoothing (``label_smoothing_factor > 0``) and ``compute_loss_func`` are rejected with a ``ValueError``:
the main pass uses the model's own cross-entropy over the kept sequences and would silently ignore them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cggr import REFERENCE_SCORING_MODES

from .batch_split import CGGRModel
from .curriculum import Curriculum

__all__ = ["use_cggr", "CGGRTrainer", "CGGRStepCallback", "cggr_objects"]


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


def _attach(trainer: Trainer, cggr_model: Optional[CGGRModel], cggr_kwargs: dict[str, Any], *,
            kwargs_name: str) -> CGGRModel:
    """Check ``trainer``, build (or check) its ``CGGRModel``, register the step callback; shared by
    :class:`CGGRTrainer` and :func:`use_cggr` (``kwargs_name``: how the caller spells the CGGR settings)."""
    if trainer.model is None:
        raise ValueError("model: the Trainer needs the model to train for CGGR (model_init is not supported)")
    if cggr_model is not None and cggr_kwargs:
        raise ValueError(f"{kwargs_name}: pass either a ready CGGRModel (cggr_model) or {kwargs_name}, not both")
    if cggr_model is None:
        cggr_model = CGGRModel(trainer.model, **cggr_kwargs)
    elif not isinstance(cggr_model, CGGRModel):
        raise ValueError(f"cggr_model: expected a CGGRModel, got {type(cggr_model).__name__}")
    elif cggr_model.model is not trainer.model:
        raise ValueError("cggr_model: it must wrap the same model object that is given to the Trainer")
    if trainer.label_smoother is not None:
        raise ValueError("args.label_smoothing_factor: not supported with CGGR (the kept sequences are "
                         "trained with the model's own cross-entropy); set it to 0")
    if trainer.compute_loss_func is not None:
        raise ValueError("compute_loss_func: not supported with CGGR (batch splitting computes the loss)")
    trainer.cggr = cggr_model
    # The CGGR loss is a per-micro-batch mean over the kept sequences: let the Trainer scale it for gradient
    # accumulation and never hand it num_items_in_batch (counted over the full batch).
    trainer.model_accepts_loss_kwargs = False
    trainer.loss_is_scaled_for_ga = False
    trainer.add_callback(CGGRStepCallback(cggr_model, model=trainer.model))
    if cggr_model.config.scoring in REFERENCE_SCORING_MODES:
        _keep_reference_column(trainer)
    return cggr_model


#: The batch column that carries ``reference_nll`` to :class:`CGGRModel` (SPEC §9.1).
REFERENCE_COLUMN = "reference_nll"


def _keep_reference_column(trainer: Trainer) -> None:
    """With ``remove_unused_columns=True`` (the default) the Trainer drops every dataset column that the model's
    ``forward`` does not name. ``reference_nll`` is read by :class:`CGGRModel`, not by the model, so it is added to
    the kept columns (SPEC §9.1); evaluation removes it again before the model sees the batch."""
    setter = getattr(trainer, "_set_signature_columns_if_needed", None)
    if setter is None:   # a Trainer without the column filter keeps every column anyway
        return
    setter()
    columns = list(getattr(trainer, "_signature_columns", None) or [])
    if REFERENCE_COLUMN not in columns:
        columns.append(REFERENCE_COLUMN)
    trainer._signature_columns = columns


def _without_reference(inputs: dict[str, Any]) -> dict[str, Any]:
    """Evaluation batches go to the model itself, which takes no reference."""
    return {k: v for k, v in inputs.items() if k != REFERENCE_COLUMN} if REFERENCE_COLUMN in inputs else inputs


def _batch_split_loss(cggr: CGGRModel, model: torch.nn.Module, inputs: dict[str, Any],
                      return_outputs: bool) -> Any:
    """The training loss of one micro-batch by batch splitting, with ``model`` (maybe DDP-wrapped) as main pass."""
    inputs = dict(inputs)
    if "input_ids" not in inputs or inputs.get("labels") is None:
        raise ValueError(f"inputs: CGGR needs 'input_ids' and 'labels' in every training batch, got keys "
                         f"{sorted(inputs)} (use a collator that sets labels, e.g. "
                         f"DataCollatorForLanguageModeling(tokenizer, mlm=False))")
    input_ids = inputs.pop("input_ids")
    labels = inputs.pop("labels")
    attention_mask = inputs.pop("attention_mask", None)
    result = cggr.forward_with(model, input_ids, labels, attention_mask, **inputs)
    return (result.loss, result.outputs) if return_outputs else result.loss


def _with_metrics(cggr: CGGRModel, logs: dict[str, float]) -> dict[str, float]:
    """``logs`` plus ``cggr/<metric>`` of the last CGGR step when they are training logs (they carry ``loss``).
    Reading the metrics waits for the device, which is why it happens only here, at logging steps."""
    if "loss" in logs and cggr.last_kept is not None:
        for key, value in cggr.get_metrics().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                logs[f"cggr/{key}"] = value
    return logs


def use_cggr(trainer: Trainer, cggr_model: Optional[CGGRModel] = None, **config: Any) -> Trainer:
    """Switch a ready ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``) to CGGR batch splitting.

    ``trainer = use_cggr(Trainer(...), min_tokens_ratio=0.25, warmup_steps=1000)`` then ``trainer.train()``:

    * training micro-batches run :meth:`CGGRModel.forward_with` (router pass, then the model's forward and
      backward on the hardest sequences only); evaluation keeps the trainer's own ``compute_loss``;
    * :class:`CGGRStepCallback` advances the curriculum once per optimizer step (not per micro-batch under
      gradient accumulation) and re-syncs it to ``state.global_step`` when resuming from a checkpoint;
    * training logs gain ``cggr/<metric>`` entries (:meth:`CGGRModel.get_metrics` of the last micro-batch),
      so they reach every ``report_to`` integration (wandb, tensorboard) and ``on_log`` callbacks.

    Args:
        trainer: the Trainer to switch (its ``model`` is the model trained and saved, untouched).
        cggr_model: a ready :class:`CGGRModel` wrapping ``trainer.model``; or
        **config: the keyword arguments of :class:`CGGRModel` (``min_tokens_ratio``, ``warmup_steps``,
            ``router_layers``, ``config=CGGRConfig(...)``, ...). Not both.

    Returns:
        ``trainer`` itself, with ``trainer.cggr`` the ``CGGRModel`` in use.

    Raises:
        ValueError: ``trainer`` not a Trainer or already using CGGR, ``cggr_model`` and ``config`` both or a
            mismatched ``cggr_model``, label smoothing, a ``compute_loss_func``, or invalid CGGR settings.
    """
    if not isinstance(trainer, Trainer):
        raise ValueError(f"trainer: expected a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(getattr(trainer, "cggr", None), CGGRModel):
        # a second call would wrap compute_loss twice and register a second step callback
        raise ValueError("trainer: it already uses CGGR (use_cggr was applied, or it is a CGGRTrainer)")
    cggr = _attach(trainer, cggr_model, config, kwargs_name="config")
    own_compute_loss, own_log = trainer.compute_loss, trainer.log

    def compute_loss(model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        if not model.training:
            return own_compute_loss(model, _without_reference(inputs), return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        return _batch_split_loss(cggr, model, inputs, return_outputs)

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        own_log(_with_metrics(cggr, logs), *args, **kwargs)

    # Instance attributes shadow the class's methods: the Trainer calls self.compute_loss / self.log.
    trainer.compute_loss = compute_loss
    trainer.log = log
    return trainer


class CGGRTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is CGGR batch splitting (see the module docstring;
    :func:`use_cggr` does the same to a ready trainer).

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
        self.cggr = _attach(self, cggr_model, dict(cggr_kwargs or {}), kwargs_name="cggr_kwargs")

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        """Batch-split loss in training mode; the standard loss otherwise. ``num_items_in_batch`` is unused."""
        if not model.training:
            return super().compute_loss(model, _without_reference(inputs), return_outputs=return_outputs)
        return _batch_split_loss(self.cggr, model, inputs, return_outputs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the last step's ``cggr/<metric>`` values to training logs (those that carry ``loss``)."""
        super().log(_with_metrics(self.cggr, logs), *args, **kwargs)
