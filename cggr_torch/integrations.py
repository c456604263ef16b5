"""Hugging Face integration: batch splitting (:class:`~cggr_torch.batch_split.CGGRModel`) in a ``Trainer``, and
the fused CGGR LM head (:mod:`cggr_torch.fused_linear`) on a causal LM.

One call switches a model to the fused CGGR head, as Liger's ``apply_liger_kernel_to_*`` does for kernels::

    from cggr_torch.integrations import apply_cggr

    model = apply_cggr(AutoModelForCausalLM.from_pretrained(...), min_tokens_ratio=0.25, warmup_steps=1000)
    loss = model(input_ids, labels=labels, attention_mask=mask).loss    # training mode: no logits materialised
    loss.backward(); optimizer.step(); model.cggr_loss.step()

(:func:`apply_cggr`; :func:`remove_cggr` undoes it). One call switches an existing ``Trainer`` (or a subclass
such as TRL's ``SFTTrainer``) to CGGR: ``use_cggr(trainer, head="fused", ...)`` with the fused head (the step
callback advances ``model.cggr_loss``), or batch splitting by default::

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

import inspect
import types
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from cggr import REFERENCE_SCORING_MODES

from .batch_split import CGGRModel
from .curriculum import Curriculum
from .causal_lm import hf_base_and_head, hf_causal_lm_cggr_loss
from .fused_linear import FusedLinearCGGRLoss
from .router import is_masked_lm

__all__ = ["use_cggr", "CGGRTrainer", "CGGRStepCallback", "cggr_objects", "apply_cggr", "remove_cggr",
           "HEADS"]


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


def _check_trainer(trainer: Trainer, computes: str) -> None:
    """What both heads need from a Trainer: a model (not ``model_init``), no label smoothing and no custom loss
    function (``computes``: what computes the loss instead, for the messages)."""
    if trainer.model is None:
        raise ValueError("model: the Trainer needs the model to train for CGGR (model_init is not supported)")
    if trainer.label_smoother is not None:
        raise ValueError(f"args.label_smoothing_factor: not supported with CGGR ({computes}); set it to 0")
    if trainer.compute_loss_func is not None:
        raise ValueError(f"compute_loss_func: not supported with CGGR ({computes})")


def _wire(trainer: Trainer, cggr: Any) -> None:
    """Attach ``cggr`` (a CGGRModel or the fused head's loss) to ``trainer``: its curriculum step callback and the
    Trainer's loss scaling. The CGGR loss is a per-micro-batch mean over what was kept: the Trainer scales it for
    gradient accumulation and never hands it ``num_items_in_batch`` (a count over the full batch). With a reference
    scoring, the ``reference_nll`` column survives the Trainer's column filter."""
    trainer.cggr = cggr
    trainer.model_accepts_loss_kwargs = False
    trainer.loss_is_scaled_for_ga = False
    trainer.add_callback(CGGRStepCallback(cggr, model=trainer.model))
    if cggr.config.scoring in REFERENCE_SCORING_MODES:
        _keep_reference_column(trainer)


def _attach(trainer: Trainer, cggr_model: Optional[CGGRModel], cggr_kwargs: dict[str, Any], *,
            kwargs_name: str) -> CGGRModel:
    """Check ``trainer``, build (or check) its ``CGGRModel``, register the step callback; shared by
    :class:`CGGRTrainer` and :func:`use_cggr` (``kwargs_name``: how the caller spells the CGGR settings)."""
    _check_trainer(trainer, "batch splitting computes the loss with the model's own cross-entropy")
    if cggr_model is not None and cggr_kwargs:
        raise ValueError(f"{kwargs_name}: pass either a ready CGGRModel (cggr_model) or {kwargs_name}, not both")
    if cggr_model is None:
        cggr_model = CGGRModel(trainer.model, **cggr_kwargs)
    elif not isinstance(cggr_model, CGGRModel):
        raise ValueError(f"cggr_model: expected a CGGRModel, got {type(cggr_model).__name__}")
    elif cggr_model.model is not trainer.model:
        raise ValueError("cggr_model: it must wrap the same model object that is given to the Trainer")
    _wire(trainer, cggr_model)
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


def _with_metrics(cggr: Any, logs: dict[str, float]) -> dict[str, float]:
    """``logs`` plus ``cggr/<metric>`` of the last CGGR step when they are training logs (they carry ``loss``).
    ``cggr``: the :class:`CGGRModel` (batch splitting; only once it has run) or the fused head's
    :class:`FusedLinearCGGRLoss`. Reading the metrics waits for the device, which is why it happens only here,
    at logging steps."""
    if "loss" in logs and (not isinstance(cggr, CGGRModel) or cggr.last_kept is not None):
        for key, value in cggr.get_metrics().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                logs[f"cggr/{key}"] = value
    return logs


# ======================================================================== the fused CGGR head: apply_cggr
#: The heads :func:`use_cggr` switches a Trainer to: ``"split"`` (batch splitting, :class:`CGGRModel`) and
#: ``"fused"`` (the fused CGGR LM head on the model itself, :func:`apply_cggr`).
HEADS = ("split", "fused")

#: Where :func:`apply_cggr` keeps what :func:`remove_cggr` restores (in the model's ``__dict__``, not a sub-module).
_APPLIED = "_cggr_applied"


def _flat_arguments(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones named by the original forward's signature, ``**kwargs``
    flattened)."""
    bound = signature.bind_partial(*args, **kwargs)
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _cggr_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward :func:`apply_cggr` installs (bound to the model): the fused CGGR head loss in training mode
    with labels, the original forward otherwise. State is read from the model, so a deep copy stays coherent."""
    applied = self.__dict__[_APPLIED]
    original = applied["forward"] if applied["forward"] is not None else types.MethodType(type(self).forward, self)
    flat = _flat_arguments(applied["signature"], args, kwargs)
    if not self.training or flat.get("labels") is None:
        # exactly the model's own forward (a reference_nll column, read by CGGR only, is dropped)
        kwargs.pop("reference_nll", None)
        return original(*args, **kwargs)
    labels = flat.pop("labels")
    input_ids = flat.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("input_ids: the fused CGGR head needs input_ids in training with labels (inputs_embeds "
                         "alone is not supported: the head-linearity check and the label shift use the ids)")
    if "num_items_in_batch" in flat:
        # the CGGR loss is a mean over the selected tokens (SPEC §8): a token count of the whole accumulated
        # batch does not apply to it, and a Trainer that passes one would skip its gradient-accumulation scaling
        raise ValueError("num_items_in_batch: not supported by the fused CGGR head (its loss is a mean over the "
                         "selected tokens); use_cggr(trainer, head='fused') or a Trainer built after apply_cggr "
                         "never passes it")
    if flat.pop("logits_to_keep", 0) not in (0, None):
        raise ValueError("logits_to_keep: the fused CGGR head computes no logits in training; leave it 0")
    attention_mask = flat.pop("attention_mask", None)
    reference_nll = flat.pop("reference_nll", None)
    return_dict = flat.pop("return_dict", None)
    flat["use_cache"] = False   # no past_key_values is returned in training: building the cache is wasted work
    loss = hf_causal_lm_cggr_loss(self, input_ids, labels, self.__dict__["cggr_loss"], attention_mask,
                                  reference_nll, **flat)
    if return_dict is False:
        return (loss,)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def apply_cggr(model: torch.nn.Module, *, head_kernel: str = "auto", **config: Any) -> torch.nn.Module:
    """Switch a Hugging Face causal LM (Llama, Qwen2/3, Mistral, GPT-2, ... any ``*ForCausalLM`` with a base
    model and a linear ``nn.Linear`` output embedding) to the fused CGGR LM head, in place; returns ``model``.

    ``model = apply_cggr(model, min_tokens_ratio=0.25, warmup_steps=1000)``; then, in training mode,
    ``model(input_ids, labels=labels, attention_mask=mask).loss`` is the CGGR loss of
    :func:`cggr_torch.causal_lm.hf_causal_lm_cggr_loss` (SPEC §1: position ``t`` is scored against
    ``labels[:, t + 1]``, a position whose next token is padding is ignored; SPEC §2-§8 selection from the
    hidden states and the head weight), and the ``(B, T, V)`` logits are never materialised: the output's
    ``.logits`` is None. ``reference_nll=`` (``scoring='excess'``, SPEC §3.1), aligned like the unshifted
    labels ``(B, T)``, is shifted like them. In eval mode, or without labels, the model's own forward runs
    unchanged (a ``reference_nll`` argument is dropped).

    The CGGR state is ``model.cggr_loss``, a :class:`~cggr_torch.fused_linear.FusedLinearCGGRLoss`. It is
    *not* a registered sub-module, so ``state_dict()``, ``save_pretrained`` and ``from_pretrained`` see the
    plain model (its only state, the curriculum step, is no tensor). **Advancing the curriculum**: under
    :func:`use_cggr` (``head="fused"``) :class:`CGGRStepCallback` calls ``model.cggr_loss.step()`` once per
    optimizer step and re-syncs it to ``state.global_step`` on a resume; in a plain training loop call
    ``model.cggr_loss.step()`` after each optimizer step (and ``model.cggr_loss.set_step(n)`` when resuming).
    Metrics of the last training forward: ``model.cggr_loss.get_metrics()``.

    The model's ``accepts_loss_kwargs`` is set to False while CGGR is applied, so a ``Trainer`` built afterwards
    divides the per-micro-batch loss by the gradient-accumulation steps and passes no ``num_items_in_batch``.

    Args:
        model: the causal LM (its forward is replaced on the instance; the class is untouched).
        head_kernel: how the fused head computes its logits blocks (SPEC §12): ``"blocks"``, ``"gemm"`` (Triton
            GEMM epilogues; not float64) or ``"auto"`` (the default); kept as ``model.cggr_loss.head_kernel``
            and checked there, by :class:`~cggr_torch.fused_linear.FusedLinearCGGRLoss`.
        **config: the other keyword arguments of :class:`~cggr_torch.fused_linear.FusedLinearCGGRLoss`
            (``min_tokens_ratio``, ``warmup_steps``, ``scoring``, ``selection``, ``config=CGGRConfig(...)``,
            chunk sizes, ...).

    Raises:
        ValueError: a model without a base model or ``nn.Linear`` output embedding, a model whose logits are not
            ``hidden · Wᵀ + b`` (SPEC §9 head-linearity check: soft-capping, scaling), CGGR already applied,
            or invalid settings (naming the argument). In training: no ``input_ids``, ``num_items_in_batch`` or
            ``logits_to_keep`` given, bad labels (as :func:`hf_causal_lm_cggr_loss`).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a Hugging Face *ForCausalLM (a torch.nn.Module), got "
                         f"{type(model).__name__}")
    if _APPLIED in model.__dict__:
        raise ValueError("model: the fused CGGR head is already applied (call remove_cggr(model) first)")
    if is_masked_lm(model):
        raise ValueError(f"model: expected a causal LM (next-token prediction, SPEC §1 shift), got the masked LM "
                         f"{type(model).__name__}")
    # validates the settings and head_kernel, naming the argument
    loss_module = FusedLinearCGGRLoss(head_kernel=head_kernel, **config)
    # SPEC §9 at switch time (the loss repeats it only when the head changes: the result is cached)
    hf_base_and_head(model)
    own = model.forward
    signature = inspect.signature(own)
    cggr_forward = types.FunctionType(_cggr_forward.__code__, _cggr_forward.__globals__, "forward",
                                      _cggr_forward.__defaults__, _cggr_forward.__closure__)
    cggr_forward.__doc__ = own.__doc__
    # The Trainer reads the forward's parameter names to keep dataset columns: show the original ones.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    cggr_forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    model.__dict__[_APPLIED] = {
        "forward": model.__dict__.get("forward"),            # an instance forward set before (None: the class's)
        "accepts_loss_kwargs": model.__dict__.get("accepts_loss_kwargs", _APPLIED),
        "signature": signature,
        "function": cggr_forward,
    }
    model.__dict__["cggr_loss"] = loss_module
    model.__dict__["forward"] = types.MethodType(cggr_forward, model)
    model.__dict__["accepts_loss_kwargs"] = False
    return model


def remove_cggr(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_cggr`: the model's original forward and ``accepts_loss_kwargs`` come back and
    ``model.cggr_loss`` is removed; returns ``model``. A forward wrapped around the CGGR one after
    :func:`apply_cggr` (e.g. by ``accelerate`` mixed precision) is dropped with it.

    Raises:
        ValueError: CGGR is not applied to ``model``.
    """
    applied = model.__dict__.get(_APPLIED) if isinstance(model, torch.nn.Module) else None
    if applied is None:
        raise ValueError(f"model: the fused CGGR head is not applied to this {type(model).__name__} "
                         f"(apply_cggr(model) first)")
    del model.__dict__[_APPLIED], model.__dict__["cggr_loss"]
    if getattr(model.__dict__.get("_original_forward"), "__func__", None) is applied["function"]:
        del model.__dict__["_original_forward"]   # accelerate's unwrap would bring the CGGR forward back
    if applied["forward"] is None:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = applied["forward"]
    if applied["accepts_loss_kwargs"] is _APPLIED:
        model.__dict__.pop("accepts_loss_kwargs", None)
    else:
        model.__dict__["accepts_loss_kwargs"] = applied["accepts_loss_kwargs"]
    return model


def _fused_loss(model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
    """The training loss of one micro-batch with the fused head: the model's (CGGR) forward with the batch."""
    if "input_ids" not in inputs or inputs.get("labels") is None:
        raise ValueError(f"inputs: CGGR needs 'input_ids' and 'labels' in every training batch, got keys "
                         f"{sorted(inputs)} (use a collator that sets labels, e.g. "
                         f"DataCollatorForLanguageModeling(tokenizer, mlm=False))")
    outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    return (loss, outputs) if return_outputs else loss


def _attach_fused(trainer: Trainer, config: dict[str, Any]) -> FusedLinearCGGRLoss:
    """The fused-head form of :func:`_attach`: :func:`apply_cggr` on ``trainer.model`` (or its fused head if
    already applied and no settings are given), the step callback, the Trainer's loss scaling."""
    _check_trainer(trainer, "the fused head computes the selective cross-entropy itself")
    model = trainer.model
    loss = model.__dict__.get("cggr_loss") if _APPLIED in model.__dict__ else None
    if loss is not None and config:
        raise ValueError("config: the model already has the fused CGGR head (apply_cggr); pass no settings to "
                         "use it, or remove_cggr(model) first")
    if loss is None:
        loss = apply_cggr(model, **config).cggr_loss
    _wire(trainer, loss)
    return loss


def use_cggr(trainer: Trainer, cggr_model: Optional[CGGRModel] = None, *, head: str = "split",
             **config: Any) -> Trainer:
    """Switch a ready ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``) to CGGR.

    ``trainer = use_cggr(Trainer(...), min_tokens_ratio=0.25, warmup_steps=1000)`` then ``trainer.train()``.

    ``head="split"`` (the default): batch splitting.

    * training micro-batches run :meth:`CGGRModel.forward_with` (router pass, then the model's forward and
      backward on the hardest sequences only); evaluation keeps the trainer's own ``compute_loss``;
    * training logs gain ``cggr/<metric>`` entries (:meth:`CGGRModel.get_metrics` of the last micro-batch).

    ``head="fused"``: the fused CGGR LM head, token selection without materialising the logits.

    * :func:`apply_cggr` switches ``trainer.model`` itself (``config``: the settings of
      :class:`~cggr_torch.fused_linear.FusedLinearCGGRLoss`; none if ``apply_cggr`` was already called);
      training micro-batches run the model's (CGGR) forward with the batch, whose ``.loss`` is the fused CGGR
      head loss; evaluation keeps the trainer's own ``compute_loss`` (the model's own forward in eval mode);
    * training logs gain ``cggr/<metric>`` entries from ``model.cggr_loss.get_metrics()``.

    Both heads: :class:`CGGRStepCallback` advances the curriculum once per optimizer step (not per micro-batch
    under gradient accumulation) and re-syncs it to ``state.global_step`` when resuming from a checkpoint; the
    metrics reach every ``report_to`` integration (wandb, tensorboard) and ``on_log`` callbacks. In training
    mode the trainer's own ``compute_loss`` is not run (e.g. the extra training metrics of TRL's
    ``SFTTrainer``, which need the logits).

    Args:
        trainer: the Trainer to switch (its ``model`` is the model trained and saved).
        cggr_model: ``head="split"`` only: a ready :class:`CGGRModel` wrapping ``trainer.model``; or
        head: ``"split"`` or ``"fused"`` (:data:`HEADS`).
        **config: the keyword arguments of :class:`CGGRModel` (``head="split"``: ``min_tokens_ratio``,
            ``warmup_steps``, ``router_layers``, ``config=CGGRConfig(...)``, ...; not with ``cggr_model``) or of
            :class:`~cggr_torch.fused_linear.FusedLinearCGGRLoss` (``head="fused"``).

    Returns:
        ``trainer`` itself, with ``trainer.cggr`` the ``CGGRModel`` (split) or the model's
        ``FusedLinearCGGRLoss`` (fused) in use.

    Raises:
        ValueError: ``trainer`` not a Trainer or already using CGGR, an unknown ``head``, ``cggr_model`` with
            ``head="fused"``, ``cggr_model`` and ``config`` both or a mismatched ``cggr_model``, label smoothing,
            a ``compute_loss_func``, invalid CGGR settings, or (fused) a model :func:`apply_cggr` rejects.
    """
    if not isinstance(trainer, Trainer):
        raise ValueError(f"trainer: expected a transformers.Trainer, got {type(trainer).__name__}")
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    if isinstance(getattr(trainer, "cggr", None), (CGGRModel, FusedLinearCGGRLoss)):
        # a second call would wrap compute_loss twice and register a second step callback
        raise ValueError("trainer: it already uses CGGR (use_cggr was applied, or it is a CGGRTrainer)")
    if head == "fused":
        if cggr_model is not None:
            raise ValueError("cggr_model: a CGGRModel is batch splitting (head='split'); with head='fused' pass "
                             "the fused head's settings as keyword arguments")
        cggr: Any = _attach_fused(trainer, config)
    else:
        cggr = _attach(trainer, cggr_model, config, kwargs_name="config")
    own_compute_loss, own_log = trainer.compute_loss, trainer.log

    def compute_loss(model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        if not model.training:
            return own_compute_loss(model, _without_reference(inputs), return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        if head == "fused":
            return _fused_loss(model, inputs, return_outputs)
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
