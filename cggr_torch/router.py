"""Truncated routers for batch splitting (SPEC §9) and static-shape routing, and how each is scored.

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

The router's token scores and :class:`CGGRScorer` (the routing mask of SPEC §2-§7 over a router's output)
live in :mod:`cggr_torch.scorer`; their names stay importable from here.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from cggr import METRIC_KEYS
from cggr.config import ROUTER_POSITIONS_ALL, RouterPositions

# The head-linearity rule is defined with the argument checks (utils), so that the fused LM head's entry
# points (causal_lm) apply the same rule without importing the routers; re-exported here (the mirror).
from .utils import check_batch, check_linear_head, head_linearity_reason

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
    "ROUTER_MEMORY_BUDGET",
    # re-exported from cggr_torch.scorer (their home since the split), loaded on first use below
    "router_token_scores",
    "scored_index",
    "CGGRScorer",
]

#: Names that moved to :mod:`cggr_torch.scorer`, which imports this module: resolved lazily (PEP 562) so that
#: ``from cggr_torch.router import CGGRScorer`` keeps working without an import cycle.
_SCORER_NAMES = ("CGGRScorer", "router_token_scores", "scored_index")


def __getattr__(name: str) -> Any:
    if name in _SCORER_NAMES:
        from . import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
