r"""Run variants (what is compared) and the PyTorch trainer of the quality harness.

Modes (the same names in both frameworks):

``standard``
    The ordinary mean next-token cross-entropy over every position of the batch.
``random_token``
    The same number of tokens as ``cggr_token`` keeps, chosen uniformly at random: the eligibility, the
    curriculum ratio ``base(step)`` and (when the dynamic threshold is on) the batch confidence ``c̄`` are
    computed from the model's own logits exactly as ``CGGRLoss`` does (SPEC §4-§5), and ``k`` tokens are
    taken by ``select_tokens`` over uniform random priorities instead of difficulties. Loss
    ``Σ_{i∈mask} ce_i / max(1, |mask|)``. The ablation of CGGR's *choice* at an identical *count*.
``random_sequence``
    No router: ``k = num_selected(B, base(step))`` (SPEC §5.3 with the curriculum ratio; no dynamic threshold,
    since there is no router confidence) sequences chosen uniformly at random run forward and backward.
``cggr_token``
    ``CGGRLoss`` (token selection) on the shifted logits.
``cggr_sequence``
    ``CGGRModel`` (batch splitting, SPEC §9) with ``create_truncated_router(model, router_layers)``.

A :class:`Variant` is one mode with its options; ``--modes`` takes comma-separated specs
``mode[:key=value[:key=value...]]`` (keys: ``scoring``, ``selection``, ``ratio``, ``warmup``,
``router_layers``, ``shift``, ``dynamic``, ``sensitivity``) and the presets of :data:`PRESETS`. Options a mode
does not use are a :class:`ValueError` (so a spec never silently means something else).

The data carry no padding and no ``ignore_index``: every sequence has ``T − 1`` valid targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .flops import ModelShape, StepFlops, step_flops

__all__ = [
    "MODES",
    "FRAMEWORKS",
    "PRESETS",
    "OPTION_KEYS",
    "Variant",
    "VariantDefaults",
    "parse_variants",
    "StepRecord",
    "OptimConfig",
    "TorchTrainer",
]

MODES: tuple[str, ...] = ("standard", "random_token", "random_sequence", "cggr_token", "cggr_sequence")
FRAMEWORKS: tuple[str, ...] = ("torch", "jax")
SCORINGS: tuple[str, ...] = ("entropy", "margin", "loss", "combined")
TOKEN_SELECTIONS: tuple[str, ...] = ("topk", "stratified", "sequence_aware", "fixed_quota")
SEQUENCE_SELECTIONS: tuple[str, ...] = ("topk", "fixed_quota")

#: Which options each mode uses.
MODE_OPTIONS: dict[str, tuple[str, ...]] = {
    "standard": (),
    "random_token": ("ratio", "warmup", "dynamic", "sensitivity"),
    "random_sequence": ("ratio", "warmup"),
    "cggr_token": ("scoring", "selection", "ratio", "warmup", "dynamic", "sensitivity"),
    "cggr_sequence": ("scoring", "selection", "ratio", "warmup", "dynamic", "sensitivity", "router_layers",
                      "shift"),
}
OPTION_KEYS: tuple[str, ...] = ("scoring", "selection", "ratio", "warmup", "router_layers", "shift", "dynamic",
                                "sensitivity")

#: Named lists of variant specs, per framework. ``{half}`` is replaced by ``max(1, L // 2)`` and ``{full}`` by
#: ``L`` (the model's layer count).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "main": {
        "torch": ("standard", "random_token", "random_sequence", "cggr_token:scoring=entropy",
                  "cggr_token:scoring=margin", "cggr_token:scoring=loss", "cggr_token:scoring=combined",
                  "cggr_sequence"),
        "jax": ("standard", "random_token", "cggr_token", "random_sequence", "cggr_sequence"),
    },
    "ablations": {  # with their references, so an ablation-only invocation is a complete section
        "torch": ("standard", "random_token", "random_sequence", "cggr_token", "cggr_sequence",
                  "cggr_token:selection=stratified", "cggr_token:warmup=0", "cggr_token:dynamic=0",
                  "cggr_token:ratio=0.5", "random_token:ratio=0.5",
                  "cggr_sequence:scoring=loss", "cggr_sequence:shift=0", "cggr_sequence:dynamic=0",
                  "cggr_sequence:router_layers=1",
                  "cggr_sequence:router_layers={half}", "cggr_sequence:warmup=0",
                  "cggr_sequence:ratio=0.5", "random_sequence:ratio=0.5"),
        "jax": ("standard", "random_token", "random_sequence", "cggr_token", "cggr_sequence",
                "cggr_token:selection=stratified", "cggr_token:warmup=0", "cggr_sequence:scoring=loss",
                "cggr_sequence:router_layers=1", "cggr_sequence:warmup=0"),
    },
    "smoke": {
        "torch": ("standard", "random_token", "random_sequence", "cggr_token:scoring=entropy",
                  "cggr_token:scoring=margin", "cggr_token:scoring=loss", "cggr_token:scoring=combined",
                  "cggr_token:selection=stratified", "cggr_sequence", "cggr_sequence:scoring=loss:shift=0"),
        "jax": ("standard", "random_token", "cggr_token", "random_sequence", "cggr_sequence"),
    },
}


@dataclass(frozen=True)
class VariantDefaults:
    """Option values a spec does not set (from the command-line flags)."""

    scoring: str = "combined"
    sequence_scoring: str = "combined"
    selection: str = "topk"
    ratio: float = 0.25
    warmup: int = 0
    router_layers: int = 1
    shift: bool = True
    dynamic: bool = True
    sensitivity: float = 0.5


@dataclass(frozen=True)
class Variant:
    """One compared configuration. Options a mode does not use are ``None``.

    ``label`` is the spec as written (``mode`` plus its explicit options); together with ``framework`` it
    names the variant in the outputs, and :meth:`options` holds the resolved values.
    """

    framework: str
    mode: str
    label: str
    scoring: Optional[str] = None
    selection: Optional[str] = None
    ratio: Optional[float] = None
    warmup: Optional[int] = None
    router_layers: Optional[int] = None
    shift: Optional[bool] = None
    dynamic: Optional[bool] = None
    sensitivity: Optional[float] = None

    def options(self) -> dict[str, Any]:
        """The resolved options this mode uses."""
        return {k: getattr(self, k) for k in MODE_OPTIONS[self.mode]}

    def key(self) -> str:
        """``framework/label``."""
        return f"{self.framework}/{self.label}"

    def to_json(self) -> dict[str, Any]:
        return {"framework": self.framework, "mode": self.mode, "label": self.label, "options": self.options()}


def _parse_bool(key: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--modes: option {key}={text!r}: expected 0/1 (or true/false)")


def _parse_spec(framework: str, spec: str, defaults: VariantDefaults, num_layers: int) -> Variant:
    parts = [p.strip() for p in spec.split(":")]
    mode = parts[0]
    if mode not in MODES:
        raise ValueError(f"--modes: unknown mode {mode!r} in {spec!r}; expected one of {MODES} or a preset "
                         f"{tuple(PRESETS)}")
    given: dict[str, str] = {}
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(f"--modes: {spec!r}: option {part!r} must be key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        if key == "router":
            key = "router_layers"
        if key not in OPTION_KEYS:
            raise ValueError(f"--modes: {spec!r}: unknown option {key!r}; expected one of {OPTION_KEYS}")
        if key not in MODE_OPTIONS[mode]:
            raise ValueError(f"--modes: {spec!r}: mode {mode!r} does not use {key!r} (it uses "
                             f"{MODE_OPTIONS[mode] or 'no options'})")
        if key in given:
            raise ValueError(f"--modes: {spec!r}: option {key!r} given twice")
        given[key] = value.replace("{half}", str(max(1, num_layers // 2))).replace("{full}", str(num_layers))

    resolved: dict[str, Any] = {}
    for key in MODE_OPTIONS[mode]:
        if key == "scoring":
            value: Any = given.get(key, defaults.sequence_scoring if mode == "cggr_sequence" else defaults.scoring)
            if value not in SCORINGS:
                raise ValueError(f"--modes: {spec!r}: scoring must be one of {SCORINGS}, got {value!r}")
        elif key == "selection":
            allowed = SEQUENCE_SELECTIONS if mode == "cggr_sequence" else TOKEN_SELECTIONS
            value = given.get(key, defaults.selection if defaults.selection in allowed else "topk")
            if value not in allowed:
                raise ValueError(f"--modes: {spec!r}: selection for {mode} must be one of {allowed}, got {value!r}")
        elif key == "ratio":
            value = float(given[key]) if key in given else float(defaults.ratio)
            if not (0.0 < value <= 1.0):
                raise ValueError(f"--modes: {spec!r}: ratio must lie in (0, 1], got {value}")
        elif key == "warmup":
            value = int(given[key]) if key in given else int(defaults.warmup)
            if value < 0:
                raise ValueError(f"--modes: {spec!r}: warmup must be >= 0 steps, got {value}")
        elif key == "router_layers":
            value = int(given[key]) if key in given else int(defaults.router_layers)
            if not 1 <= value <= num_layers:
                raise ValueError(f"--modes: {spec!r}: router_layers must lie in [1, {num_layers}] (the model's "
                                 f"layers), got {value}")
        elif key in ("shift", "dynamic"):
            value = _parse_bool(key, given[key]) if key in given else bool(getattr(defaults, key))
        elif key == "sensitivity":
            value = float(given[key]) if key in given else float(defaults.sensitivity)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"--modes: {spec!r}: sensitivity must be finite and >= 0, got {value}")
        resolved[key] = value
    if framework == "jax" and mode == "cggr_sequence" and resolved["shift"] is False:
        raise ValueError(f"--modes: {spec!r}: the JAX batch split always shifts (SPEC §9); shift=0 is a "
                         f"PyTorch-only ablation")
    label = ":".join([mode] + [f"{k}={given[k]}" for k in OPTION_KEYS if k in given])
    return Variant(framework=framework, mode=mode, label=label, **resolved)


def parse_variants(specs: str, frameworks: tuple[str, ...], defaults: VariantDefaults,
                   num_layers: int) -> list[Variant]:
    """Expand ``--modes`` (comma-separated specs and presets) for each framework; duplicates are dropped.

    Raises:
        ValueError: unknown framework, mode, option or preset, or an option value out of range.
    """
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise ValueError(f"--frameworks: expected a subset of {FRAMEWORKS}, got {fw!r}")
    items = [s.strip() for s in specs.split(",") if s.strip()]
    if not items:
        raise ValueError("--modes: expected at least one mode or preset")
    out: list[Variant] = []
    seen: set[str] = set()
    for fw in frameworks:
        for item in items:
            expanded = PRESETS[item][fw] if item in PRESETS else (item,)
            for spec in expanded:
                v = _parse_spec(fw, spec, defaults, num_layers)
                if v.key() not in seen:
                    seen.add(v.key())
                    out.append(v)
    return out


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings shared by every mode and both frameworks."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class StepRecord:
    """What one training step reports (host numbers, read after the step's single synchronisation).

    ``kept_sequences``/``main_rows``: sequences selected / run by the main pass; ``kept_tokens``: tokens in the
    loss; ``flops``: :class:`~benchmarks.quality.flops.StepFlops`; ``extra``: library metrics worth keeping.
    """

    loss: float
    kept_sequences: int
    main_rows: int
    kept_tokens: int
    flops: StepFlops
    extra: dict[str, float]


# ------------------------------------------------------------------------------------------------ PyTorch
def build_torch_model(shape: ModelShape, seq_len: int, seed: int, device: Any) -> Any:
    """A Llama-style ``LlamaForCausalLM`` from a config (random init under ``torch.manual_seed(seed)``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ffn_dim,
                      num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                      num_key_value_heads=shape.num_kv_heads, max_position_embeddings=seq_len,
                      tie_word_embeddings=False, initializer_range=0.02, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device)


class TorchTrainer:
    """One PyTorch run of one variant: model, AdamW, the mode's loss; ``train_step`` and ``evaluate``.

    Every step ends with exactly one host synchronisation in every mode (reading the loss); the library
    metrics are read after it. ``CGGRModel`` additionally synchronises inside its forward (it needs ``k_seq`` on
    the host to slice the batch), which is part of its real cost.
    """

    def __init__(self, variant: Variant, shape: ModelShape, seq_len: int, seed: int, optim: OptimConfig,
                 device: str = "cpu", amp: bool = False) -> None:
        import torch

        from cggr_torch import CGGRLoss, linear_warmup_ratio
        from cggr_torch.model import CGGRModel
        from cggr_torch.router import create_truncated_router

        if variant.framework != "torch":
            raise ValueError(f"variant: expected a torch variant, got {variant.key()}")
        self.variant = variant
        self.shape = shape
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.amp = bool(amp)
        if self.amp and self.device.type != "cuda":
            raise ValueError("amp: bf16 autocast is only used on CUDA (use --amp fp32 on CPU)")
        self.model = build_torch_model(shape, seq_len, seed, self.device)
        self.model.train()
        self.optim = optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                           weight_decay=optim.weight_decay, fused=self.device.type == "cuda")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(1_000_003 * (seed + 1))
        self.step_index = 0
        v = variant
        self.criterion: Any = None
        self.cggr_model: Any = None
        self.schedule: Any = None
        if v.mode in ("random_token", "random_sequence"):
            self.schedule = linear_warmup_ratio(v.ratio, v.warmup)
        if v.mode == "cggr_token":
            self.criterion = CGGRLoss(scoring=v.scoring, selection=v.selection, dynamic_threshold=v.dynamic,
                                      threshold_sensitivity=v.sensitivity, min_tokens_ratio=v.ratio,
                                      warmup_steps=v.warmup)
        elif v.mode == "cggr_sequence":
            router = create_truncated_router(self.model, v.router_layers)
            self.cggr_model = CGGRModel(self.model, router=router, scoring=v.scoring, min_tokens_ratio=v.ratio,
                                        warmup_steps=v.warmup, dynamic_threshold=v.dynamic,
                                        threshold_sensitivity=v.sensitivity, selection=v.selection,
                                        shift_labels=v.shift)

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _random_token_loss(self, logits: Any, targets: Any) -> tuple[Any, Any]:
        """``(loss, count)`` of ``random_token`` on shifted ``logits`` ``(B, T−1, V)`` and ``targets``.

        ``eligible``, ``c̄`` and ``ratio`` follow SPEC §4-§5 exactly as ``CGGRLoss`` computes them from these
        logits; the ``k = num_selected(n, ratio)`` tokens of highest uniform random priority are kept and
        ``loss = Σ_{i∈mask} ce_i / max(1, |mask|)`` (float32).
        """
        import torch
        import torch.nn.functional as F

        from cggr_torch import dynamic_ratio, score_tokens, select_tokens

        v = self.variant
        V = logits.shape[-1]
        with torch.no_grad():
            scores = score_tokens(logits.detach(), targets, scoring="entropy")
            elig = scores.eligible
            n = elig.sum()
            conf = torch.where(elig, scores.stats.confidence, torch.zeros_like(scores.stats.confidence)).sum() \
                / torch.clamp(n, min=1).to(torch.float32)
            base = torch.full((), float(self.schedule(self.step_index)), dtype=torch.float32, device=logits.device)
            ratio = dynamic_ratio(base, conf, v.sensitivity) if v.dynamic else base
            priority = torch.rand(elig.shape, generator=self.generator, device=logits.device)
            mask, k = select_tokens(priority, elig, ratio, selection="topk")
        # Sanitised like CGGRLoss: rows that cannot be selected (ignored, non-finite) become zeros with target 0,
        # so their gradient is exactly 0 (never 0·NaN) and no out-of-range index is read.
        z = torch.where(elig.unsqueeze(-1), logits.float(), torch.zeros((), dtype=torch.float32, device=logits.device))
        t = torch.where(elig, targets, torch.zeros_like(targets)).to(torch.int64)
        ce = F.cross_entropy(z.reshape(-1, V), t.reshape(-1), reduction="none")
        count = mask.sum()
        loss = torch.where(mask.reshape(-1), ce, torch.zeros_like(ce)).sum() / torch.clamp(count, min=1).float()
        return loss, count

    def train_step(self, batch: np.ndarray, lr: float) -> StepRecord:
        """One optimizer step on the int32 ``(B, T)`` window batch at learning rate ``lr``."""
        import torch

        from cggr_torch import num_selected, shift_for_causal_lm

        v = self.variant
        B, T = batch.shape
        ids = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=torch.int64, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        kept_count: Any = None
        host_k: Optional[int] = None
        with self._autocast():
            if v.mode == "standard":
                loss = self.model(input_ids=ids, labels=ids).loss
            elif v.mode == "random_sequence":
                host_k = int(num_selected(B, float(self.schedule(self.step_index))))
                rows = torch.randperm(B, generator=self.generator, device=self.device)[:host_k].sort().values
                sub = ids.index_select(0, rows)
                loss = self.model(input_ids=sub, labels=sub).loss
            elif v.mode == "cggr_sequence":
                loss = self.cggr_model(ids, labels=ids)
            else:
                logits = self.model(input_ids=ids).logits
                lg, tg = shift_for_causal_lm(logits, ids)
                if v.mode == "cggr_token":
                    loss = self.criterion(lg, tg)
                else:
                    loss, kept_count = self._random_token_loss(lg, tg)
        loss.backward()
        if self.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.criterion is not None:
            self.criterion.step()
        if self.cggr_model is not None:
            self.cggr_model.step()
        self.step_index += 1
        loss_value = float(loss.detach())  # the step's one synchronisation, in every mode

        extra: dict[str, float] = {}
        if v.mode == "standard":
            k_seq, rows, kept = B, B, B * (T - 1)
        elif v.mode == "random_sequence":
            assert host_k is not None
            k_seq, rows, kept = host_k, host_k, host_k * (T - 1)
        elif v.mode == "cggr_sequence":
            m = self.cggr_model.get_metrics()
            k_seq = rows = int(m["sequences_selected"])
            kept = k_seq * (T - 1)
            extra = {"effective_ratio": float(m["effective_ratio"]), "avg_confidence": float(m["avg_confidence"])}
        elif v.mode == "cggr_token":
            m = self.criterion.get_metrics()
            k_seq, rows, kept = B, B, int(m["tokens_selected"])
            extra = {"effective_ratio": float(m["effective_ratio"]), "avg_confidence": float(m["avg_confidence"])}
        else:
            k_seq, rows, kept = B, B, int(kept_count)
        flops = step_flops(v.mode, self.shape, B, T, kept_sequences=k_seq, main_rows=rows, kept_tokens=kept,
                           router_layers=v.router_layers or 0)
        return StepRecord(loss_value, k_seq, rows, kept, flops, extra)

    def evaluate(self, windows: np.ndarray, batch_size: int) -> float:
        """Mean full next-token cross-entropy (nats/token) over the fixed eval windows.

        Evaluated in float32 in every mode (bf16 logits would add rounding noise of ~1e-2 nats to the metric).
        """
        import torch
        import torch.nn.functional as F

        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                ids = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size])).to(
                    self.device, dtype=torch.int64)
                logits = self.model(input_ids=ids).logits  # float32 (TF32 matmuls on GPU), no autocast
                V = logits.shape[-1]
                ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
                total += ce.double()
                count += ids.shape[0] * (ids.shape[1] - 1)
        self.model.train()
        return float(total) / count

    def synchronize(self) -> None:
        """Wait for the device (timing boundaries)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def param_count(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


def variant_from_json(d: dict[str, Any]) -> Variant:
    """Inverse of :meth:`Variant.to_json`."""
    return Variant(framework=d["framework"], mode=d["mode"], label=d["label"], **d["options"])

