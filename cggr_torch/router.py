"""Truncated routers and the token scorer for batch splitting (SPEC §9) and static-shape routing.

A *router* is any module that maps ``input_ids`` ``(B, T)`` (plus ``attention_mask`` and optional per-token
inputs such as ``position_ids``) to logits ``(B, T, V)`` over the model's vocabulary. CGGR uses it to score
token difficulty cheaply before the real forward pass.

:func:`create_truncated_router` builds one from a Hugging Face model **without copying a single weight**: it is
the model itself with its decoder-layer list cut to the first ``num_layers`` entries. Concretely, every module on
the path from the task model to the layer list (e.g. ``LlamaForCausalLM → LlamaModel → layers``) is replaced by
a *view*: a new object of the same class whose ``__dict__`` is the original's (same ``_parameters`` and
``_buffers`` dictionaries, same child modules, same config, same hooks) except that the child on the path is the
next view, and at the end of the path a ``ModuleList`` holding the first ``num_layers`` original layer objects.
The router then calls the model's *own* ``forward``: embeddings, the model's own mask construction
(``create_causal_mask`` & co.), rotary embeddings, the first layers, the final norm, the LM head and any
logit soft-capping run exactly as in the full model, so

    router(x) == the full model with ``layers[num_layers:]`` removed

bit for bit, on every transformers version whose forward iterates the layer list (all 5.x releases). A model
compiled with ``model.compile()`` or ``torch.compile(model)`` is truncated *eagerly* (the compiled graph is the
full model's; compiled sub-modules such as individual layers are kept). The views
are refreshed from the originals at every call, so later changes to the model (``.to()``, ``.train()``,
replaced embeddings, gradient checkpointing flags, LoRA layers injected into the shared layers) are always
seen. Because the parameters are the model's own ``Parameter`` objects, the router costs no parameter memory
and always scores with the current weights.

Supported families (auto-detected from ``config.model_type``, each verified in ``tests/torch/test_router.py``
against the full model): see :data:`SUPPORTED_ARCHITECTURES`. Any other architecture raises a ``ValueError``
naming the three ways forward: ``layers_path='…'`` (the dotted path of its decoder-layer ``ModuleList``; the
error message proposes the candidate it found), an explicit router module, or ``architecture='passthrough'``
(the full model scores itself, costing a full extra forward). There is no silent fallback.

:class:`CGGRScorer` turns a router into ``(difficulty, mask, info)`` over the input positions: SPEC §2-§7
applied to the router's logits, with a fixed output shape ``(B, T)``, so the mask can drive static-shape
routing such as sending unselected tokens to a "null" expert in a mixture-of-experts layer
(``examples/moe_null_routing.py``).
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from cggr import DEFAULT_SEQUENCE_SELECTION, METRIC_KEYS, REFERENCE_SCORING_MODES, CGGRConfig
from cggr.config import ROUTER_POSITIONS_ALL, RouterPositions

from .curriculum import Curriculum, Schedule
from .fused_linear import score_next_tokens_fused
from .loss import check_schedule
from .pipeline import host_metrics, measure_scores
from .scoring import score_next_tokens
from .types import TokenScores, TokenStatistics
# The head-linearity rule is defined with the argument checks (utils), so that the fused LM head
# (fused_linear, which this module imports) applies the same rule without importing the routers.
from .utils import (check_batch, check_linear_head, check_target_range, head_linearity_reason, resolve_config,
                    widen_labels)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ROUTER_INPUT_KEYS",
    "TruncatedRouter",
    "PassthroughRouter",
    "create_truncated_router",
    "router_logits",
    "model_vocab_size",
    "is_masked_lm",
    "check_batch",
    "head_linearity_reason",
    "check_linear_head",
    "METRIC_KEYS",
    "ROUTER_PATHS",
    "fused_head_unsupported_reason",
    "resolve_router_path",
    "router_token_scores",
    "scored_index",
    "ROUTER_MEMORY_BUDGET",
    "CGGRScorer",
]

#: Per-token inputs that CGGR hands to the router as well as to the main model (when the caller gives them).
ROUTER_INPUT_KEYS: tuple[str, ...] = ("position_ids", "token_type_ids")


@dataclass(frozen=True)
class _Architecture:
    """Where a family keeps its decoder layers, relative to the task model (…ForCausalLM / …ForMaskedLM)."""

    layers_path: str
    masked_lm: bool = False


#: ``config.model_type`` → the dotted path of the decoder-layer ``ModuleList`` in the task model. Every entry
#: is tested against the full model on a tiny configuration (``tests/torch/test_router.py``).
SUPPORTED_ARCHITECTURES: Mapping[str, _Architecture] = {
    "llama": _Architecture("model.layers"),
    "mistral": _Architecture("model.layers"),
    "mixtral": _Architecture("model.layers"),
    "qwen2": _Architecture("model.layers"),
    "qwen3": _Architecture("model.layers"),
    "gemma": _Architecture("model.layers"),
    "gemma2": _Architecture("model.layers"),
    "phi3": _Architecture("model.layers"),
    "olmo2": _Architecture("model.layers"),
    "gpt2": _Architecture("transformer.h"),
    "gptj": _Architecture("transformer.h"),
    "falcon": _Architecture("transformer.h"),
    "gpt_neox": _Architecture("gpt_neox.layers"),
    "bert": _Architecture("bert.encoder.layer", masked_lm=True),
    "roberta": _Architecture("roberta.encoder.layer", masked_lm=True),
}

#: How a router's token scores are computed (``router_path=`` of :class:`CGGRScorer` / ``CGGRModel``):
#: ``'fused'`` runs the truncated router to its final normed hidden states and scores the LM head
#: ``hidden · Wᵀ + b`` block by block (:func:`cggr_torch.fused_linear.fused_linear_scores`: the ``(B, T, V)``
#: logits never exist); ``'logits'`` calls the router and scores the logits it returns; ``'auto'`` picks
#: ``'fused'`` whenever :func:`fused_head_unsupported_reason` finds no reason against it.
ROUTER_PATHS: tuple[str, ...] = ("auto", "fused", "logits")

# ----------------------------------------------------------------------------------------------- helpers
def router_logits(output: Any) -> torch.Tensor:
    """The logits of a router's output: a tensor, an object with ``.logits`` (a ``ModelOutput``), a mapping
    with key ``'logits'``, or a tuple/list whose first element is the logits.

    Raises:
        ValueError: none of these forms.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"router: expected its output to be a (B, T, V) logits tensor, an object with .logits or a "
                     f"tuple whose first element is the logits, got {type(output).__name__}")


def model_vocab_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's output embedding (the LM head), else ``config.vocab_size``, else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(vocab) if isinstance(vocab, numbers.Integral) else None


def is_masked_lm(model: nn.Module) -> bool:
    """True for masked (bidirectional) LMs, whose logits at ``t`` predict ``labels[t]`` (no shift)."""
    if isinstance(model, (TruncatedRouter, PassthroughRouter)):
        return model.masked_lm
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = SUPPORTED_ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is not None:
        return arch.masked_lm
    return type(model).__name__.endswith("ForMaskedLM")


def _resolve(model: nn.Module, path: str) -> nn.Module:
    obj: Any = model
    for part in path.split("."):
        children = getattr(obj, "_modules", None)
        if not isinstance(children, Mapping) or part not in children or children[part] is None:
            raise ValueError(f"layers_path: {type(model).__name__} has no sub-module {path!r} "
                             f"(no child {part!r} under {type(obj).__name__})")
        obj = children[part]
    return obj


def _candidate_layer_paths(model: nn.Module) -> list[str]:
    """Dotted paths of ``ModuleList``s whose length is ``config.num_hidden_layers`` (an error-message hint)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name and (n is None or len(module) == n):
            found.append(name)
    return found[:3]


def _check_no_forward_override(module: nn.Module, path: str) -> None:
    # The task model itself may carry an instance-level forward that is not a dispatch hook (TRL's SFTTrainer
    # installs a fused-loss forward): the root view runs the class's forward instead (see _view_of). Accelerate's
    # hooks (`_hf_hook`) move tensors between devices, so a view without them would be wrong: those still raise.
    if "forward" in module.__dict__ and (path or "_hf_hook" in module.__dict__):
        raise ValueError(
            f"model: the module at {path or '<root>'!r} ({type(module).__name__}) has an instance-level `forward` "
            f"(e.g. accelerate dispatch hooks from device_map=...). A truncated view would call the original "
            f"module's forward and silently run every layer; load the model without device_map/offloading, or "
            f"pass CGGRModel an explicit router module")


# ------------------------------------------------------------------------------------------- the routers
class TruncatedRouter(nn.Module):
    """The model's first ``num_layers`` decoder layers plus its embeddings, final norm and head; shared weights.

    Built by :func:`create_truncated_router`. ``forward(input_ids, attention_mask=None, **kwargs)`` returns the
    logits ``(B, T, V)`` of the truncated model (computed by the model's own ``forward`` code, with
    ``use_cache=False``). Its registered sub-module ``view`` exposes exactly the parameters the truncated forward
    uses, all of which are the model's own ``Parameter`` objects (no copies). The model itself is held as a
    plain reference (``source``), not as a sub-module.
    """

    def __init__(self, model: nn.Module, num_layers: int, layers_path: str, architecture: str,
                 positions: RouterPositions = RouterPositions(), compile_options: Optional[dict] = None) -> None:
        super().__init__()
        object.__setattr__(self, "source", model)
        #: ``torch.compile`` keyword arguments for the truncated model's forward (None: eager); see
        #: :func:`create_truncated_router`'s ``router_compile``.
        self.compile_options = None if compile_options is None else dict(compile_options)
        # id(view) -> (view, its compiled call): held outside the module tree so that no parameter is registered
        # twice; the root view (logits) and the base-model view (hidden states) each keep their own.
        object.__setattr__(self, "_compiled", {})
        #: SPEC §9.3: the positions this router reads and scores (``create_truncated_router``'s settings).
        self.positions = positions
        self.num_layers = int(num_layers)
        self.layers_path = layers_path
        self.architecture = architecture
        arch = SUPPORTED_ARCHITECTURES.get(architecture)
        self.masked_lm = arch.masked_lm if arch is not None else type(model).__name__.endswith("ForMaskedLM")
        self.view = self._build_view()

    # The view of module `src` whose child `name` is replaced by `child` (same __dict__ otherwise).
    @staticmethod
    def _view_of(src: nn.Module, name: str, child: nn.Module, reuse: Optional[nn.Module]) -> nn.Module:
        view = reuse if reuse is not None and type(reuse) is type(src) else object.__new__(type(src))
        state = dict(src.__dict__)
        modules = type(src._modules)(src._modules)
        modules[name] = child
        state["_modules"] = modules
        # `Module.compile()` stores a compiled call of the *original* module: the view must run its own forward.
        if state.get("_compiled_call_impl") is not None:
            state["_compiled_call_impl"] = None
        state.pop("forward", None)   # an instance forward (root only, see _check_no_forward_override): the class's runs
        view.__dict__.clear()
        view.__dict__.update(state)
        return view

    def _build_view(self, previous: Optional[nn.Module] = None) -> nn.Module:
        """(Re)build the chain of views along ``layers_path`` from the current state of the model."""
        parts = self.layers_path.split(".")
        chain = [self.source]
        for i, part in enumerate(parts):
            _check_no_forward_override(chain[-1], ".".join(parts[:i]))
            chain.append(_resolve(chain[-1], part))
        layers = chain[-1]
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"layers_path: {self.layers_path!r} is a {type(layers).__name__}, expected the "
                             f"nn.ModuleList of decoder layers")
        if len(layers) < self.num_layers:
            raise ValueError(f"num_layers: the model has {len(layers)} layers at {self.layers_path!r}, "
                             f"cannot keep {self.num_layers}")
        # Reuse the previous truncated list when it still holds the same layer objects.
        old_views: list[Optional[nn.Module]] = [None] * len(parts)
        node = previous
        for i, part in enumerate(parts):
            old_views[i] = node
            node = node._modules.get(part) if node is not None else None
        keep = [layers[i] for i in range(self.num_layers)]
        if isinstance(node, nn.ModuleList) and len(node) == len(keep) and all(a is b for a, b in zip(node, keep)):
            child: nn.Module = node
        else:
            child = nn.ModuleList(keep)
        for i in range(len(parts) - 1, -1, -1):
            child = self._view_of(chain[i], parts[i], child, old_views[i])
        return child

    def refresh(self) -> None:
        """Re-synchronise the views with the model (done automatically before every forward)."""
        view = self._build_view(self._modules.get("view"))
        if view is not self._modules.get("view"):
            self.view = view

    def _runner(self, module: nn.Module) -> Callable[..., Any]:
        """``module`` itself, or its ``torch.compile``d call with :attr:`compile_options`. The views are reused
        across calls while the model keeps its structure (:meth:`refresh`), so one compiled call serves every
        step; a rebuilt view (new layer objects) is compiled anew."""
        if self.compile_options is None:
            return module
        cached = self._compiled.get(id(module))
        if cached is None or cached[0] is not module:
            if len(self._compiled) >= 8:   # views rebuilt many times (the model's structure changed): start over
                self._compiled.clear()
            cached = (module, torch.compile(module, **self.compile_options))
            self._compiled[id(module)] = cached
        return cached[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the truncated model for ``input_ids`` ``(B, T)``."""
        self.refresh()
        out = self._runner(self.view)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                      return_dict=True, **kwargs)
        return router_logits(out)

    def fused_head_reason(self) -> Optional[str]:
        """None when the truncated model's logits are ``lm_head(hidden_states(...))`` with a plain
        ``nn.Linear`` head, else the reason why not: the static reasons (a masked LM, a layer list outside the
        base model, a head that is not a plain ``nn.Linear`` or has hooks), then the numeric head-linearity
        rule (:func:`check_linear_head`, evaluated once per head and cached)."""
        if self.masked_lm:
            return (f"{self.architecture!r} is a masked LM: its head transforms the hidden states (dense, "
                    f"activation, norm) before the vocabulary projection")
        prefix = self.layers_path.split(".")[0]
        if "." not in self.layers_path or getattr(self.source, "base_model_prefix", None) != prefix:
            return (f"layers_path={self.layers_path!r} does not start at the base model "
                    f"(base_model_prefix={getattr(self.source, 'base_model_prefix', None)!r})")
        get_head = getattr(self.source, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if type(head) is not nn.Linear:
            return (f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear (e.g. a LoRA or "
                    f"quantised wrapper whose forward is not weight·h + bias)")
        if head._forward_hooks or head._forward_pre_hooks:
            return "the LM head has forward hooks, which the fused path would bypass"
        return check_linear_head(self.source, head, self._probe_logits_and_hidden)

    def _probe_logits_and_hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self(input_ids), self.hidden_states(input_ids)

    def lm_head(self) -> nn.Linear:
        """The model's LM head (``get_output_embeddings()``), shared with the model."""
        reason = self.fused_head_reason()
        if reason is not None:
            raise ValueError(f"router: no plain linear LM head to fuse: {reason}")
        return self.source.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      **kwargs: Any) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the truncated model (after its final norm): the input of the LM
        head, computed by the base model's own ``forward`` on the truncated layer list."""
        self.refresh()
        base = self.view._modules[self.layers_path.split(".")[0]]
        out = self._runner(base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 return_dict=True, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if not isinstance(hidden, torch.Tensor):
            hidden = out[0] if isinstance(out, (tuple, list)) else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"router: the base model of {self.architecture!r} returned no (B, T, d) "
                             f"last_hidden_state (got {type(out).__name__})")
        return hidden

    def extra_repr(self) -> str:
        extra = "" if self.positions.is_full else f", positions={self.positions}"
        return (f"architecture={self.architecture!r}, num_layers={self.num_layers}, "
                f"layers_path={self.layers_path!r}{extra}")


class PassthroughRouter(nn.Module):
    """The full model used as its own router (``architecture='passthrough'``): no truncation, a full extra
    forward pass per step. Holds the model as a plain reference (no duplicate registration)."""

    def __init__(self, model: nn.Module, positions: RouterPositions = RouterPositions()) -> None:
        super().__init__()
        object.__setattr__(self, "source", model)
        self.positions = positions   # SPEC §9.3
        self.architecture = "passthrough"
        self.masked_lm = is_masked_lm(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        out = self.source(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True,
                          **kwargs)
        return router_logits(out)


def create_truncated_router(model: nn.Module, num_layers: int = 4, *, architecture: Optional[str] = None,
                            layers_path: Optional[str] = None, router_positions: Any = ROUTER_POSITIONS_ALL,
                            router_samples: Optional[int] = None,
                            router_prefix: Optional[int] = None, router_compile: Any = False) -> nn.Module:
    """A router sharing ``model``'s embeddings, first ``num_layers`` decoder layers, final norm, rotary
    embeddings and LM head (zero extra parameter memory; see the module docstring for how).

    Args:
        model: a Hugging Face task model with an LM head (``…ForCausalLM``; ``…ForMaskedLM`` for BERT-style
            families), not dispatched with ``device_map`` hooks.
        num_layers: decoder layers to keep, ``1 <= num_layers <= `` the model's layer count.
        architecture: ``None`` to detect the family from ``model.config.model_type``; a key of
            :data:`SUPPORTED_ARCHITECTURES` to force one; or ``'passthrough'`` to use the full model as the
            router (``num_layers`` is then unused).
        layers_path: the dotted path (from ``model``) of the decoder-layer ``nn.ModuleList``, for architectures
            that are not auto-detected (e.g. ``'model.layers'``). Overrides the family's path. The router is
            then exactly "the model with that list cut", which is correct as long as the model's forward
            iterates over that list; verify it against the full model once.
        router_positions, router_samples, router_prefix: SPEC §9.3, the cheaper router: score every
            ``router_positions``-th position (``'all'``: every one), or ``router_samples`` evenly spaced ones,
            of the first ``router_prefix`` columns the router reads (``None``: all ``T``). Kept as the router's
            ``.positions`` (a :class:`cggr.config.RouterPositions`) and applied by ``CGGRModel``.
        router_compile: ``False`` (default: eager), ``True`` or a dict of ``torch.compile`` keyword arguments
            (e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs): run the truncated model's layers (its
            hidden states on the fused path, its logits otherwise) compiled. The scoring after them is unchanged.
            Off by default: compiling costs time at the first steps and every distinct ``(B, T)``/prefix shape
            compiles once more; with ``mode="reduce-overhead"`` the outputs are overwritten by the next call,
            which ``CGGRModel`` never holds across calls.

    Returns:
        :class:`TruncatedRouter` (or :class:`PassthroughRouter`).

    Raises:
        ValueError: bad ``num_layers``, unknown architecture (naming the fixes), a model without an LM head,
            a ``layers_path`` that is not a ``ModuleList``, a model dispatched with accelerate hooks, or bad
            ``router_positions`` / ``router_samples`` / ``router_prefix``.
    """
    positions = RouterPositions(router_positions, router_samples, router_prefix)
    if router_compile is True:
        compile_options: Optional[dict] = {}
    elif router_compile is False or router_compile is None:
        compile_options = None
    elif isinstance(router_compile, Mapping):
        compile_options = dict(router_compile)
    else:
        raise ValueError(f"router_compile: expected a bool or a dict of torch.compile keyword arguments, got "
                         f"{router_compile!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a Hugging Face task model), got {type(model).__name__}")
    orig = model._modules.get("_orig_mod")
    if isinstance(orig, nn.Module):     # torch.compile(model): truncate the original module (run eagerly)
        model = orig
    if architecture == "passthrough":
        if layers_path is not None:
            raise ValueError("layers_path: not used with architecture='passthrough' (the full model is the router)")
        if compile_options is not None:
            raise ValueError("router_compile: not supported with architecture='passthrough' (compile the model)")
        return PassthroughRouter(model, positions)
    if not isinstance(num_layers, numbers.Integral) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture: expected None (auto-detect), 'passthrough' or one of "
                         f"{sorted(SUPPORTED_ARCHITECTURES)}, got {architecture!r}")
    family = architecture if architecture is not None else model_type
    if layers_path is None:
        if family not in SUPPORTED_ARCHITECTURES:
            hint = _candidate_layer_paths(model)
            hint_txt = (f"; its decoder layers look like they are at {hint[0]!r}" if hint else "")
            raise ValueError(
                f"create_truncated_router: cannot auto-detect the architecture of {type(model).__name__} "
                f"(config.model_type={model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}){hint_txt}. "
                f"Pass layers_path='<dotted path of the decoder-layer ModuleList>' to truncate it anyway, give "
                f"CGGRModel an explicit router module (input_ids, attention_mask -> (B, T, V) logits), or use "
                f"architecture='passthrough' to score with the full model (a full extra forward per step)")
        layers_path = SUPPORTED_ARCHITECTURES[family].layers_path
        name = family
    else:
        if not isinstance(layers_path, str) or not layers_path:
            raise ValueError(f"layers_path: expected a dotted module path such as 'model.layers', got {layers_path!r}")
        name = family if isinstance(family, str) else type(model).__name__
    head = getattr(model, "get_output_embeddings", None)
    if not callable(head) or head() is None:
        raise ValueError(f"model: {type(model).__name__} has no LM head (get_output_embeddings() is None); pass the "
                         f"task model (…ForCausalLM / …ForMaskedLM), not the bare base model")
    _resolve(model, layers_path)
    return TruncatedRouter(model, int(num_layers), layers_path, name, positions, compile_options)


# ------------------------------------------------------------------------------------- next-token scoring
# ------------------------------------------------------------------------------------- the fused path
#: Default working-memory budget (bytes) of the fused router scoring: 1 GiB of logit blocks. The router pass
#: runs before the main pass, whose activations dominate the step's peak, so a larger block than the fused
#: loss' 0.25 GiB default costs no peak memory and saves kernel launches (64·1024 rows at V = 49152 in bf16:
#: 8 blocks of 9344 rows instead of 29 of 2304).
ROUTER_MEMORY_BUDGET: int = 2**30


def fused_head_unsupported_reason(router: Any) -> Optional[str]:
    """Why ``router`` cannot be scored on the fused path (None when it can).

    The fused path needs a causal :class:`TruncatedRouter` whose LM head is a plain ``nn.Linear`` without
    hooks and whose logits are ``hidden · Wᵀ + b`` by the numeric head-linearity rule
    (:func:`cggr_torch.utils.check_linear_head`: no scaling, capping or soft-capping after the head, e.g.
    Gemma-2's ``final_logit_softcapping``, whatever the config calls it). Arbitrary router modules and
    passthrough routers only expose their logits.
    """
    if isinstance(router, TruncatedRouter):
        return router.fused_head_reason()
    if isinstance(router, PassthroughRouter):
        return ("architecture='passthrough': an unverified architecture scores itself through its own forward, "
                "so only its logits are known to be right")
    return (f"the router is a {type(router).__name__}, an arbitrary module whose logits can only be read from "
            f"its output (build it with create_truncated_router for the fused path)")


def resolve_router_path(router: Any, router_path: str) -> tuple[str, str]:
    """``(path, reason)``: the path (``'fused'`` or ``'logits'``) that ``router_path`` gives for ``router``,
    and a sentence saying why (reported by ``CGGRModel.router_path_reason``).

    Raises:
        ValueError: ``router_path`` not in :data:`ROUTER_PATHS`, or ``'fused'`` requested for a router that
            cannot take it (the message gives the reason; there is no silent fallback).
    """
    if router_path not in ROUTER_PATHS:
        raise ValueError(f"router_path: expected one of {ROUTER_PATHS}, got {router_path!r}")
    if router_path == "logits":
        return "logits", "router_path='logits' was requested"
    reason = fused_head_unsupported_reason(router)
    if reason is None:
        return "fused", ("plain linear LM head: scored from the router's final hidden states without "
                         "materialising its (B, T, V) logits")
    if router_path == "fused":
        raise ValueError(f"router_path: 'fused' is not possible for this router: {reason}; use 'auto' (falls back "
                         f"to the logits and reports router_path='logits') or 'logits'")
    return "logits", reason


def check_budget(value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"router_memory_budget_bytes: expected an integer >= 1 (bytes), got {value!r}")


def _cat_scores(parts: list[TokenScores]) -> TokenScores:
    stats = TokenStatistics(*(torch.cat([p.stats[i] for p in parts]) for i in range(len(TokenStatistics._fields))))
    return TokenScores(torch.cat([p.difficulty for p in parts]), torch.cat([p.eligible for p in parts]),
                       torch.cat([p.valid for p in parts]), stats)


@functools.lru_cache(maxsize=64)
def _index_on(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # One host-to-device copy per (positions, T, device), then reused: a fresh copy every step would make the
    # host wait for the device queue (a pageable host-to-device copy is synchronous).
    return torch.tensor(values, dtype=torch.int64, device=device)


def scored_index(positions: Optional[RouterPositions], seq_len: int, *, shift: bool,
                 device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """SPEC §9.3: ``(router positions S, their target columns)`` as int64 tensors on ``device`` (the target
    column of position ``t`` is ``t + 1`` when ``shift``, else ``t``), or None when every position is scored
    (``positions`` None or the defaults: SPEC §9 unchanged). Cached per shape: no host synchronisation."""
    scored = None if positions is None else positions.scored(seq_len, shift)
    if scored is None:
        return None
    targets = tuple(t + 1 for t in scored) if shift else scored
    return _index_on(scored, torch.device(device)), _index_on(targets, torch.device(device))


def _prefix(value: Any, seq_len: int, read: int) -> Any:
    """A per-token router input cut to the ``read`` columns the router reads (SPEC §9.3), else unchanged."""
    if read < seq_len and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == seq_len:
        return value[..., :read]
    return value


def router_token_scores(router: Callable[..., Any], path: str, input_ids: torch.Tensor,
                        labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                        router_kwargs: Mapping[str, Any], *, scoring: str, ignore_index: int, shift: bool,
                        vocab_size: Optional[int] = None, batch_chunk: Optional[int] = None,
                        memory_budget_bytes: int = ROUTER_MEMORY_BUDGET,
                        positions: Optional[RouterPositions] = None) -> tuple[TokenScores, torch.Tensor]:
    """The router pass: token scores ``(B, T)`` (SPEC §2-§4 at the input positions) and the non-finite count.

    With ``positions`` other than the defaults (SPEC §9.3) the router reads the first ``R`` columns only and
    the scores are ``(B, |S|)``: column ``j`` is the pair of router position ``S[j]`` and its target, already
    aligned (:func:`scored_index`); on the fused path the head and the scoring run on the gathered ``B·|S|``
    hidden rows only.

    ``path='fused'`` (a :class:`TruncatedRouter` accepted by :func:`resolve_router_path`): final hidden states
    then :func:`score_next_tokens_fused`; ``path='logits'``: the router's logits, checked to be
    ``(rows, T, V)`` with ``V = vocab_size`` when given, then :func:`score_next_tokens`. ``batch_chunk``: run
    the router on chunks of that many sequences (``None``: the whole batch, the caller's tensors themselves).
    Call under ``torch.no_grad()``; nothing here synchronises with the device.
    """
    B, T = input_ids.shape
    chunk = batch_chunk or B
    parts: list[TokenScores] = []
    nonfinite: Optional[torch.Tensor] = None
    index = scored_index(positions, T, shift=shift, device=input_ids.device)
    read = T if index is None else positions.read_length(T)
    if index is not None and labels is not None and vocab_size is not None:
        # Every label is checked, scored or not (the main pass reads them all), as on the full path.
        check_target_range(labels, vocab_size, ignore_index, name="labels")
    for start in range(0, B, chunk):
        if chunk >= B:
            ids, am, lab, kw = input_ids, attention_mask, labels, router_kwargs
        else:
            sl = slice(start, min(B, start + chunk))
            ids = input_ids[sl]
            am = None if attention_mask is None else attention_mask[sl]
            lab = None if labels is None else labels[sl]
            kw = {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
                  for k, v in router_kwargs.items()}
        rows = ids.shape[0]
        if index is not None:   # SPEC §9.3: read R columns, score the pairs of S (targets already aligned)
            pos, cols = index
            ids, am_read = ids[:, :read], (None if am is None else am[:, :read])
            kw = {k: _prefix(v, T, read) for k, v in kw.items()}
            lab = None if lab is None else lab.index_select(1, cols)
            am_s = None if am is None else am.index_select(1, cols)
            if path == "fused":
                head = router.lm_head()
                if vocab_size is not None and head.weight.shape[0] != vocab_size:
                    raise ValueError(f"router: its LM head has {head.weight.shape[0]} rows but the model's "
                                     f"vocabulary has {vocab_size} entries")
                hidden = router.hidden_states(ids, attention_mask=am_read, **kw)
                if tuple(hidden.shape[:2]) != (rows, read):
                    raise ValueError(f"router: expected hidden states of shape ({rows}, {read}, d), got "
                                     f"{tuple(hidden.shape)}")
                scores, nf = score_next_tokens_fused(hidden.index_select(1, pos), head.weight, head.bias, lab,
                                                     am_s, scoring=scoring, ignore_index=ignore_index,
                                                     shift=False, memory_budget_bytes=memory_budget_bytes)
            elif path == "logits":
                logits = router_logits(router(ids, attention_mask=am_read, **kw))
                if logits.dim() != 3 or tuple(logits.shape[:2]) != (rows, read):
                    raise ValueError(f"router: expected logits of shape ({rows}, {read}, V) for the {read} "
                                     f"columns it reads, got {tuple(logits.shape)}")
                if vocab_size is not None and logits.shape[-1] != vocab_size:
                    raise ValueError(f"router: its vocabulary has {logits.shape[-1]} entries but the model's has "
                                     f"{vocab_size}; the router must score the model's own vocabulary")
                scores, nf = score_next_tokens(logits.index_select(1, pos), lab, am_s, scoring=scoring,
                                               ignore_index=ignore_index, shift=False)
                del logits
            else:
                raise ValueError(f"path: expected 'fused' or 'logits' (a resolved router path), got {path!r}")
        elif path == "fused":
            head = router.lm_head()
            if vocab_size is not None and head.weight.shape[0] != vocab_size:
                raise ValueError(f"router: its LM head has {head.weight.shape[0]} rows but the model's vocabulary "
                                 f"has {vocab_size} entries")
            hidden = router.hidden_states(ids, attention_mask=am, **kw)
            if tuple(hidden.shape[:2]) != (rows, T):
                raise ValueError(f"router: expected hidden states of shape ({rows}, {T}, d), got "
                                 f"{tuple(hidden.shape)}")
            scores, nf = score_next_tokens_fused(hidden, head.weight, head.bias, lab, am, scoring=scoring,
                                                 ignore_index=ignore_index, shift=shift,
                                                 memory_budget_bytes=memory_budget_bytes)
        elif path == "logits":
            logits = router_logits(router(ids, attention_mask=am, **kw))
            if logits.dim() != 3 or tuple(logits.shape[:2]) != (rows, T):
                raise ValueError(f"router: expected logits of shape ({rows}, {T}, V), got {tuple(logits.shape)}")
            if vocab_size is not None and logits.shape[-1] != vocab_size:
                raise ValueError(f"router: its vocabulary has {logits.shape[-1]} entries but the model's has "
                                 f"{vocab_size}; the router must score the model's own vocabulary (build it "
                                 f"with create_truncated_router(model) or from a model with the same tokenizer)")
            scores, nf = score_next_tokens(logits, lab, am, scoring=scoring, ignore_index=ignore_index, shift=shift)
            del logits
        else:
            raise ValueError(f"path: expected 'fused' or 'logits' (a resolved router path), got {path!r}")
        parts.append(scores)
        nonfinite = nf if nonfinite is None else nonfinite + nf
    assert nonfinite is not None  # B >= 1 (checked by check_batch)
    return (parts[0] if len(parts) == 1 else _cat_scores(parts)), nonfinite


# ---------------------------------------------------------------------------------------------- scorer
class CGGRScorer(Curriculum, nn.Module):
    """Score token difficulty with a router and pick the hard tokens: ``(difficulty, mask, info)``.

    ``forward(input_ids, labels=None, attention_mask=None, **router_kwargs)`` runs ``router`` under
    ``torch.no_grad()`` and applies SPEC §2-§7 to its logits:

    * difficulty ``d`` per §3 (``scoring``), eligibility per §4, the ratio per §5 (curriculum at the scorer's
      step, dynamic threshold from the mean confidence ``c̄`` of the eligible tokens), ``k`` per §5.3 and the
      selection per §7 (``selection``) over the batch's eligible tokens in flat order ``b·T + t``;
    * with ``labels`` (causal router): position ``t`` is scored against ``labels[:, t+1]``; the last position
      has no target and is never selected; padding (``attention_mask == 0``) and ``ignore_index`` targets are
      ignored. With ``shift_labels=False`` (masked LMs) position ``t`` is scored against ``labels[:, t]``.
      Without labels every non-padding position is scored by the target-free formula of §3.

    Every output has the static shape ``(B, T)`` of ``input_ids`` whatever ``k`` is, so ``mask`` can drive
    static-shape routing (e.g. mixture-of-experts "null routing": unselected tokens go to a no-op expert, see
    ``examples/moe_null_routing.py``). Nothing in ``forward`` synchronises with the device.

    Returns:
        ``difficulty`` (float32 ``(B, T)``; meaningful only where ``info['eligible']``: it is 0 at the last
        position of a shifted batch and may be NaN on non-finite router rows),
        ``mask`` (bool ``(B, T)``), and ``info``: a dict of tensors ``k``, ``ratio`` (effective, float32),
        ``eligible``, ``valid``, ``stats`` (:class:`~cggr_torch.scoring.TokenStatistics`, ``(B, T)``),
        ``tokens_selected``, ``tokens_total``, ``tokens_nonfinite``, ``avg_confidence``, ``avg_entropy``,
        ``avg_difficulty``, plus host values ``token_ratio`` and ``step``. :meth:`get_metrics` returns the last
        call's SPEC §10 metrics as Python scalars. Call :meth:`step` after each optimizer step.

    Args:
        router: a module mapping ``(input_ids, attention_mask=..., **router_kwargs)`` to logits ``(B, T, V)``
            (see :func:`router_logits` for the accepted output forms), e.g. :func:`create_truncated_router`.
        scoring, selection, dynamic_threshold, threshold_sensitivity, min_tokens_ratio, warmup_steps,
        num_strata, min_tokens_per_sequence, ignore_index, ratio_schedule: as ``CGGRLoss`` (SPEC §3-§7)
            (keyword-only; ``selection`` defaults to ``'topk'``); or ``config``, a ready
            :class:`cggr.CGGRConfig` (stored as ``.config``).
        shift_labels: ``None`` to shift unless the router is a masked LM (:func:`is_masked_lm`).
        router_path: ``'auto'`` (default), ``'fused'`` or ``'logits'``: how the router's tokens are scored
            (:data:`ROUTER_PATHS`, :func:`resolve_router_path`). ``'auto'`` scores a truncated router with a
            plain linear head from its final hidden states without materialising the ``(B, T, V)`` logits and
            falls back to the logits otherwise; ``info['router_path']`` and :attr:`router_path_used` say which
            path ran, :attr:`router_path_reason` why.
        router_memory_budget_bytes: working memory of the fused path's logit blocks (default 1 GiB).
    """

    def __init__(self, router: nn.Module, *, scoring: str = CGGRConfig.scoring,
                 selection: str = DEFAULT_SEQUENCE_SELECTION,
                 dynamic_threshold: bool = CGGRConfig.dynamic_threshold,
                 threshold_sensitivity: float = CGGRConfig.threshold_sensitivity,
                 min_tokens_ratio: float = CGGRConfig.min_tokens_ratio, warmup_steps: int = CGGRConfig.warmup_steps,
                 num_strata: int = CGGRConfig.num_strata,
                 min_tokens_per_sequence: int = CGGRConfig.min_tokens_per_sequence,
                 ignore_index: int = CGGRConfig.ignore_index, ratio_schedule: Optional[Schedule] = None,
                 shift_labels: Optional[bool] = None, router_path: str = "auto",
                 router_memory_budget_bytes: int = ROUTER_MEMORY_BUDGET, config: Optional[CGGRConfig] = None) -> None:
        super().__init__()
        if not callable(router):
            raise ValueError(f"router: expected a callable module returning (B, T, V) logits, got "
                             f"{type(router).__name__}")
        check_budget(router_memory_budget_bytes)
        resolve_router_path(router, router_path)   # validates router_path; 'fused' must be possible
        self.config = resolve_config(config, dict(
            scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence,
            ignore_index=ignore_index), CGGRConfig(selection="topk"))
        if self.config.scoring in REFERENCE_SCORING_MODES:   # a routing mask has no reference loss (SPEC §9.1)
            raise ValueError(f"scoring: {self.config.scoring!r} is not supported by CGGRScorer (its routing mask has "
                             f"no reference loss); use CGGRModel(scoring='excess') or CGGRLoss with reference_nll=")
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise ValueError(f"shift_labels: expected None or a bool, got {shift_labels!r}")
        if isinstance(router, nn.Module) and not isinstance(router, (TruncatedRouter, PassthroughRouter)):
            self.router = router
        else:  # weights owned by another model: held by reference, not registered (no duplicate state)
            object.__setattr__(self, "router", router)
        self.shift_labels = (not is_masked_lm(router)) if shift_labels is None else shift_labels
        self.router_path = router_path
        self.router_memory_budget_bytes = int(router_memory_budget_bytes)
        self.router_path_reason = resolve_router_path(router, router_path)[1]
        self._init_curriculum(self.config.min_tokens_ratio, self.config.warmup_steps,
                              check_schedule(ratio_schedule, self.config))
        self._last: Optional[dict[str, Any]] = None

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                **router_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        check_batch(input_ids, labels, attention_mask, labels_required=False)
        if labels is None and self.scoring == "loss":
            raise ValueError("labels: scoring='loss' needs labels (the next-token targets), got None")
        if labels is not None:
            labels = widen_labels(labels, self.config.ignore_index, name="labels")
        # Host-only (a few attribute reads): the model may have changed since the last call (e.g. a LoRA head).
        path, self.router_path_reason = resolve_router_path(self.router, self.router_path)
        base = self.base_ratio()
        with torch.no_grad():
            scores, nonfinite = router_token_scores(self.router, path, input_ids, labels, attention_mask,
                                                    router_kwargs, scoring=self.scoring,
                                                    ignore_index=self.ignore_index, shift=self.shift_labels,
                                                    memory_budget_bytes=self.router_memory_budget_bytes)
            measured = measure_scores(scores, self._step, base, self.config)
        metrics = measured.metrics
        mask = measured.mask
        info: dict[str, Any] = {
            "k": measured.k,
            "ratio": metrics["effective_ratio"],
            "effective_ratio": metrics["effective_ratio"],
            "tokens_out_of_range": 0,
            "token_ratio": float(base),
            "step": self._step,
            "eligible": scores.eligible,
            "valid": scores.valid,
            "stats": scores.stats,
            "tokens_selected": metrics["tokens_selected"],
            "tokens_total": metrics["tokens_total"],
            "tokens_nonfinite": nonfinite,
            "avg_confidence": metrics["avg_confidence"],
            "avg_entropy": metrics["avg_entropy"],
            "avg_difficulty": metrics["avg_difficulty"],
            "sample_ess": metrics["sample_ess"],
            "router_path": path,
        }
        self._last = info
        return scores.difficulty, mask, info

    @property
    def router_path_used(self) -> str:
        """``'fused'`` or ``'logits'``: the path of the last forward (before the first one, of the next one);
        also ``info['router_path']``. :attr:`router_path_reason` says why."""
        if self._last is not None:
            return self._last["router_path"]
        return resolve_router_path(self.router, self.router_path)[0]

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics of the last forward as Python scalars (reads the device: call outside the step).

        Before the first forward the counts and averages are 0 and both ratios are the current base ratio.
        The router path is :attr:`router_path_used` (kept out of this dict, whose keys are SPEC §10's)."""
        return host_metrics(self._last, self._step, self.base_ratio(), self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"scoring={c.scoring!r}, selection={c.selection!r}, min_tokens_ratio={c.min_tokens_ratio}, "
                f"warmup_steps={c.warmup_steps}, dynamic_threshold={c.dynamic_threshold}, step={self._step}")
