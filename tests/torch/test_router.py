"""Truncated routers (every supported family against the full model) and CGGRScorer against the oracle.

The tiny-model builders here (:func:`tiny_config`, :func:`tiny_model`) are also used by
``test_cggr_model.py`` and ``test_trainer.py``. Models are built from configs only (no downloads).
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from cggr_torch.loss import METRIC_KEYS  # noqa: E402
from cggr_torch.router import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    PassthroughRouter,
    TruncatedRouter,
    create_truncated_router,
    fused_head_unsupported_reason,
    resolve_router_path,
    router_logits,
)
from cggr_torch.scorer import CGGRScorer  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, assert_within, random_logits, random_targets  # noqa: E402

transformers.logging.set_verbosity_error()

V = 97          # odd vocabulary
LAYERS = 3
KEEP = 2        # router layers

_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, vocab_size=V)
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str):
    """A tiny config of ``family`` (a key of SUPPORTED_ARCHITECTURES), vocabulary 97, 3 layers."""
    t = transformers
    builders: dict[str, Callable[[], Any]] = {
        "llama": lambda: t.LlamaConfig(**_DECODER, **_SPECIAL),
        "mistral": lambda: t.MistralConfig(**_DECODER, sliding_window=4, **_SPECIAL),
        "mixtral": lambda: t.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, **_SPECIAL),
        "qwen2": lambda: t.Qwen2Config(**_DECODER, **_SPECIAL),
        "qwen3": lambda: t.Qwen3Config(**_DECODER, head_dim=8, **_SPECIAL),
        "gemma": lambda: t.GemmaConfig(**_DECODER, head_dim=8, **_SPECIAL),
        "gemma2": lambda: t.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4, final_logit_softcapping=5.0,
                                         attn_logit_softcapping=10.0, **_SPECIAL),
        "phi3": lambda: t.Phi3Config(**_DECODER, **_SPECIAL),
        "olmo2": lambda: t.Olmo2Config(**_DECODER, **_SPECIAL),
        "gpt2": lambda: t.GPT2Config(vocab_size=V, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                     **_SPECIAL),
        "gptj": lambda: t.GPTJConfig(vocab_size=V, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                     rotary_dim=4, **_SPECIAL),
        "falcon": lambda: t.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, **_SPECIAL),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=LAYERS, num_attention_heads=4,
                                            max_position_embeddings=64, **_SPECIAL),
        "bert": lambda: t.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0),
        "roberta": lambda: t.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=LAYERS,
                                           num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                           pad_token_id=1, bos_token_id=0, eos_token_id=2),
    }
    return builders[family]()


def tiny_model(family: str = "llama", seed: int = 0) -> nn.Module:
    """A freshly initialised tiny task model (eval mode) of ``family``."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    auto = transformers.AutoModelForMaskedLM if SUPPORTED_ARCHITECTURES[family].masked_lm \
        else transformers.AutoModelForCausalLM
    return auto.from_config(cfg).eval()


def _final_norm_and_head(model: nn.Module, family: str, h: torch.Tensor) -> torch.Tensor:
    """Independent reference: a hidden state through the family's final norm and LM head."""
    if family in ("gpt2", "gptj", "falcon"):
        return model.get_output_embeddings()(model.transformer.ln_f(h))
    if family == "gpt_neox":
        return model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h))
    if family == "bert":
        return model.cls(h)
    if family == "roberta":
        return model.lm_head(h)
    logits = model.get_output_embeddings()(model.model.norm(h))
    if family == "gemma2":
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _cut_copy(model: nn.Module, path: str, k: int) -> nn.Module:
    """A deep copy of ``model`` whose layer list at ``path`` holds only its first ``k`` layers."""
    ref = copy.deepcopy(model)
    *parents, last = path.split(".")
    owner = ref
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, last, nn.ModuleList(list(getattr(owner, last))[:k]))
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(ref.config, attr):
            try:
                setattr(ref.config, attr, k)
            except AttributeError:
                pass
    return ref


def _batch(seed: int = 0, B: int = 3, T: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, T - 2:] = 0          # right padding in one row
    return ids, am


# ---------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", sorted(SUPPORTED_ARCHITECTURES))
def test_truncated_router_equals_the_truncated_model(family):
    model = tiny_model(family)
    router = create_truncated_router(model, num_layers=KEEP)
    assert isinstance(router, TruncatedRouter) and router.architecture == family
    ids, am = _batch()
    with torch.no_grad():
        got = router(ids, attention_mask=am)
        # 1) a deep copy of the model whose layer list is cut: bit-identical (same code, same weights)
        cut = _cut_copy(model, SUPPORTED_ARCHITECTURES[family].layers_path, KEEP)
        want = cut(input_ids=ids, attention_mask=am).logits
        # 2) the full model's hidden state after KEEP layers through the final norm and head
        full = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        via_hidden = _final_norm_and_head(model, family, full.hidden_states[KEEP])
    assert got.shape == (3, 7, V) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, via_hidden, atol=1e-5, rtol=1e-5)
    # the router really is shallower than the model
    assert (got - full.logits).abs().max() > 1e-4
    # zero extra parameter memory: every router parameter/buffer is the model's own object and storage
    model_params = {id(p): p for p in model.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    router_params = list(router.parameters())
    assert router_params and all(id(p) in model_params for p in router_params)
    assert all(p.untyped_storage().data_ptr() in storages for p in router_params)
    model_buffers = {id(b) for b in model.buffers()}
    assert all(id(b) in model_buffers for b in router.buffers())
    # only the first KEEP layers' parameters are reachable from the router
    assert len(router_params) < len(model_params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_router_forwards_position_ids_and_tracks_mode_and_weights(family):
    model = tiny_model(family)
    router = create_truncated_router(model, num_layers=KEEP)
    ids, am = _batch(1)
    pos = torch.arange(7).unsqueeze(0).expand(3, 7) + 5
    cut = _cut_copy(model, SUPPORTED_ARCHITECTURES[family].layers_path, KEEP)
    with torch.no_grad():
        torch.testing.assert_close(router(ids, attention_mask=am, position_ids=pos),
                                   cut(input_ids=ids, attention_mask=am, position_ids=pos).logits, atol=0, rtol=0)
    # train/eval mode of the model is mirrored by the router's views
    model.train()
    router(ids)
    assert router.view.training and all(m.training for m in router.modules())
    model.eval()
    router(ids)
    assert not router.view.training
    # an optimizer step on the model changes the router's output (shared weights, not a snapshot)
    before = router(ids).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.allclose(router(ids), before)


def test_router_follows_module_replacement_and_dtype_changes():
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=1)
    ids, _ = _batch(2)
    new_head = nn.Linear(32, V, bias=False)
    model.set_output_embeddings(new_head)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(router(ids), new_head(model.model.norm(h)), atol=1e-6, rtol=1e-6)
    model.to(torch.float64)
    assert router(ids).dtype == torch.float64


def test_router_state_dict_is_a_subset_of_the_model():
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=1)
    sd = router.state_dict()
    msd = model.state_dict()
    for key, value in sd.items():
        assert key.startswith("view.")
        assert value.data_ptr() == msd[key[len("view."):]].data_ptr()


# ---------------------------------------------------------------------------------- errors, passthrough
class _ToyConfig:
    model_type = "toy_lm"
    num_hidden_layers = 3
    vocab_size = V


class _ToyLM(nn.Module):
    """An architecture transformers does not know: embedding, a layer list, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _ToyConfig()
        self.embed = nn.Embedding(V, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, V)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def test_unknown_architecture_raises_naming_the_fixes():
    toy = _ToyLM()
    with pytest.raises(ValueError) as err:
        create_truncated_router(toy, num_layers=2)
    msg = str(err.value)
    assert "toy_lm" in msg and "passthrough" in msg and "layers_path" in msg and "router" in msg
    assert "'blocks'" in msg   # the candidate layer list is proposed
    # the explicit path works and equals the truncated computation
    router = create_truncated_router(toy, num_layers=2, layers_path="blocks")
    ids = torch.randint(0, V, (2, 5))
    h = toy.embed(ids)
    for block in toy.blocks[:2]:
        h = torch.tanh(block(h))
    torch.testing.assert_close(router(ids), toy.head(h), atol=0, rtol=0)
    # passthrough is the full model, explicitly
    full = create_truncated_router(toy, architecture="passthrough")
    assert isinstance(full, PassthroughRouter)
    torch.testing.assert_close(full(ids), toy(ids), atol=0, rtol=0)


def test_passthrough_router_equals_the_model():
    model = tiny_model("qwen2")
    router = create_truncated_router(model, architecture="passthrough")
    ids, am = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(router(ids, attention_mask=am), model(input_ids=ids, attention_mask=am).logits,
                                   atol=0, rtol=0)
    assert list(router.parameters()) == []   # held by reference: nothing registered twice


@pytest.mark.parametrize("num_layers", [0, -1, 4, True, 2.0])
def test_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="num_layers"):
        create_truncated_router(tiny_model("gpt2"), num_layers=num_layers)


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="architecture"):
        create_truncated_router(model, architecture="not-a-family")
    with pytest.raises(ValueError, match="layers_path"):
        create_truncated_router(model, layers_path="model.nothing")
    with pytest.raises(ValueError, match="ModuleList"):
        create_truncated_router(model, num_layers=1, layers_path="model.norm")
    with pytest.raises(ValueError, match="LM head"):
        create_truncated_router(model.model, num_layers=1, architecture="llama", layers_path="layers")
    with pytest.raises(ValueError, match="model"):
        create_truncated_router(object())
    # an instance-level forward (accelerate dispatch hooks) would make the view run the full model: refuse
    hooked = tiny_model("llama")
    hooked.model.forward = hooked.model.forward
    with pytest.raises(ValueError, match="device_map"):
        create_truncated_router(hooked, num_layers=1)
    # on the task model itself: an accelerate hook (it moves tensors between devices) still refuses ...
    root_hooked = tiny_model("llama")
    root_hooked.forward = root_hooked.forward
    root_hooked._hf_hook = object()
    with pytest.raises(ValueError, match="device_map"):
        create_truncated_router(root_hooked, num_layers=1)


def test_an_instance_forward_on_the_task_model_is_not_the_routers():
    """TRL's SFTTrainer installs its own (fused-loss) forward on the model instance; the router's view runs the
    class's forward with the first layers only, so its logits are those of the truncated model, not of the
    patched full forward."""
    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    want = create_truncated_router(model, num_layers=1)(ids)
    calls = []
    original = model.forward

    def patched(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = patched
    router = create_truncated_router(model, num_layers=1)
    got = router(ids)
    assert calls == [] and torch.equal(got, want)
    full = model(ids).logits
    assert calls == [1] and not torch.allclose(full, got)


def test_router_logits_accepts_the_common_output_forms():
    x = torch.zeros(1, 2, 3)
    assert router_logits(x) is x
    assert router_logits({"logits": x}) is x
    assert router_logits((x, None)) is x
    assert router_logits(transformers.modeling_outputs.CausalLMOutput(logits=x)) is x
    with pytest.raises(ValueError, match="router"):
        router_logits("nope")


# -------------------------------------------------------------------------------------------- the scorer
class FixedRouter(nn.Module):
    """Returns the given logits whatever the input; records the calls (for exact, NaN-laden tests)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls: list[dict[str, Any]] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask,
                           "grad_enabled": torch.is_grad_enabled(), **kwargs})
        return self.logits


def _scorer_case(seed: int, dtype: torch.dtype, B: int = 4, T: int = 9, Vs: int = 13, nonfinite: bool = True):
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (B, T, Vs), dtype)
    labels = random_targets(rng, (B, T), Vs)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 3:] = 0
    am[3, T - 1:] = 0
    if nonfinite:
        logits[0, 2, 3] = float("nan")
        logits[2, 4, 0] = float("inf")
        logits[2, 5, :] = float("-inf")
        logits[0, 5, 1] = float("-inf")     # a masked vocabulary entry (legal, finite row)
    return logits, labels, am


def _oracle_scores(logits, labels, am, scoring, ignore_index=-100):
    tgt = labels.clone()
    tgt[am == 0] = ignore_index
    return oracle.score_tokens(as_f64(logits[:, :-1]), tgt[:, 1:].numpy(), scoring, ignore_index)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("selection", oracle.SELECTION_STRATEGIES)
@pytest.mark.parametrize("scoring", oracle.SCORING_MODES)
def test_scorer_matches_the_oracle(dtype, selection, scoring):
    logits, labels, am = _scorer_case(7 + len(scoring) + len(selection), DTYPES[dtype])
    scorer = CGGRScorer(FixedRouter(logits), scoring=scoring, selection=selection, warmup_steps=0,
                        min_tokens_ratio=0.3, num_strata=3, min_tokens_per_sequence=2)
    ids = torch.zeros_like(labels)
    d, mask, info = scorer(ids, labels, am)
    B, T = labels.shape
    assert d.shape == mask.shape == (B, T) and d.dtype == torch.float32 and mask.dtype == torch.bool
    ref = _oracle_scores(logits, labels, am, scoring)
    elig = info["eligible"]
    # the last position has no next-token target
    assert not elig[:, -1].any() and not mask[:, -1].any()
    np.testing.assert_array_equal(elig[:, :-1].numpy(), ref["eligible"])
    assert_within(d[:, :-1], ref["difficulty"], "difficulty", where=ref["eligible"])
    # selection given identical scores is identical (SPEC §11 level 1)
    ratio = info["ratio"]
    base = oracle.linear_warmup_ratio(0.3, 0)(0)
    dynamic = selection != "fixed_quota"
    want_ratio = oracle.dynamic_ratio(base, float(info["avg_confidence"]), 0.5) if dynamic else base
    assert ratio.dtype == torch.float32 and float(ratio) == float(want_ratio)
    ref_mask, ref_k = oracle.select_tokens(d.double().numpy(), elig.numpy(), float(ratio), selection,
                                           num_strata=3, min_tokens_per_sequence=2)
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    assert int(info["k"]) == ref_k
    n = int(ref["eligible"].sum())
    assert int(info["tokens_total"]) == n
    conf = ref["stats"]["confidence"][ref["eligible"]].mean()
    assert float(info["avg_confidence"]) == pytest.approx(conf, abs=1e-5, rel=1e-5)
    assert int(info["tokens_nonfinite"]) == int(ref["nonfinite"].sum())
    metrics = scorer.get_metrics()
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["tokens_selected"] == int(ref_mask.sum())
    assert metrics["selection"] == selection and metrics["scoring"] == scoring


def test_scorer_without_labels_scores_every_non_padding_position():
    logits, labels, am = _scorer_case(3, torch.float32, nonfinite=False)
    scorer = CGGRScorer(FixedRouter(logits), scoring="combined", warmup_steps=0, min_tokens_ratio=0.5)
    d, mask, info = scorer(torch.zeros_like(labels), attention_mask=am)
    ref = oracle.score_tokens(as_f64(logits), None, "combined", valid_mask=am.numpy() != 0)
    np.testing.assert_array_equal(info["eligible"].numpy(), ref["eligible"])
    assert_within(d, ref["difficulty"], "difficulty", where=ref["eligible"])
    ref_mask, k = oracle.select_tokens(d.double().numpy(), info["eligible"].numpy(), float(info["ratio"]))
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    with pytest.raises(ValueError, match="labels"):
        CGGRScorer(FixedRouter(logits), scoring="loss")(torch.zeros_like(labels))


def test_scorer_all_ignored_and_masked_lm_alignment():
    logits, labels, am = _scorer_case(4, torch.float32, nonfinite=False)
    scorer = CGGRScorer(FixedRouter(logits))
    d, mask, info = scorer(torch.zeros_like(labels), torch.full_like(labels, -100), am)
    assert mask.shape == labels.shape and not mask.any() and int(info["k"]) == 0
    m = scorer.get_metrics()
    assert m["tokens_total"] == 0 and m["avg_confidence"] == 0.0 and m["tokens_selected"] == 0
    # shift_labels=False: position t is scored against labels[t] (masked LMs)
    unshifted = CGGRScorer(FixedRouter(logits), shift_labels=False, warmup_steps=0)
    d2, _, info2 = unshifted(torch.zeros_like(labels), labels, am)
    tgt = labels.clone()
    tgt[am == 0] = -100
    ref = oracle.score_tokens(as_f64(logits), tgt.numpy(), "combined")
    np.testing.assert_array_equal(info2["eligible"].numpy(), ref["eligible"])
    assert_within(d2, ref["difficulty"], "difficulty", where=ref["eligible"])


def test_scorer_curriculum_state_and_no_grad():
    logits, labels, am = _scorer_case(5, torch.float32, nonfinite=False)
    router = FixedRouter(logits)
    scorer = CGGRScorer(router, warmup_steps=10, min_tokens_ratio=0.25, dynamic_threshold=False)
    ids = torch.zeros_like(labels)
    _, mask0, info0 = scorer(ids, labels, am)
    assert info0["token_ratio"] == 1.0 and bool(mask0.eq(info0["eligible"]).all())
    for _ in range(5):
        scorer.step()
    _, _, info5 = scorer(ids, labels, am)
    assert info5["step"] == 5 and info5["token_ratio"] == pytest.approx(0.625)
    assert router.calls and not any(c["grad_enabled"] for c in router.calls)
    buf = io.BytesIO()
    torch.save(scorer.state_dict(), buf)
    buf.seek(0)
    fresh = CGGRScorer(FixedRouter(logits), warmup_steps=10)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.current_step == 5
    # a truncated router of a model is held by reference (its weights belong to the model)
    model = tiny_model("gpt2")
    s2 = CGGRScorer(create_truncated_router(model, 1))
    assert list(s2.parameters()) == [] and set(s2.state_dict()) == {"_extra_state"}


def test_scorer_bad_input():
    logits, labels, am = _scorer_case(6, torch.float32, nonfinite=False)
    scorer = CGGRScorer(FixedRouter(logits))
    with pytest.raises(ValueError, match="labels"):
        scorer(torch.zeros_like(labels), labels[:, :-1], am)
    with pytest.raises(ValueError, match="input_ids"):
        scorer(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="router"):
        scorer(torch.zeros(2, 9, dtype=torch.long))        # the router returns logits for 4 rows
    with pytest.raises(ValueError, match="selection"):
        CGGRScorer(FixedRouter(logits), selection="nope")
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        CGGRScorer(FixedRouter(logits), min_tokens_ratio=0.0)
    with pytest.raises(ValueError, match="ratio_schedule"):
        CGGRScorer(FixedRouter(logits), ratio_schedule=lambda step: 1.5)(torch.zeros_like(labels), labels)
    bad = labels.clone()
    bad[0, 3] = 13                                           # = V: out of range
    with pytest.raises(ValueError, match="labels: every value must lie"):
        scorer(torch.zeros_like(labels), bad)


def test_scorer_on_a_real_router_matches_the_oracle_on_its_logits():
    model = tiny_model("mistral")
    router = create_truncated_router(model, num_layers=1)
    scorer = CGGRScorer(router, warmup_steps=0, min_tokens_ratio=0.4)
    ids, am = _batch(5, B=3, T=8)
    d, mask, info = scorer(ids, ids, am)
    with torch.no_grad():
        logits = router(ids, attention_mask=am)
    ref = _oracle_scores(logits, ids, am, "combined")
    assert_within(d[:, :-1], ref["difficulty"], "difficulty", where=ref["eligible"])
    ref_mask, _ = oracle.select_tokens(d.double().numpy(), info["eligible"].numpy(), float(info["ratio"]))
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer(ids, ids, am)     # no warnings on the hot path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_models_are_truncated_not_run_in_full():
    model = tiny_model("llama")
    ids, am = _batch(4)
    with torch.no_grad():
        want = create_truncated_router(model, num_layers=1)(ids, attention_mask=am)
    # torch.compile(model) wraps the model; Module.compile() stores a compiled call of the full model.
    # Neither may leak into the router (compilation itself is lazy: nothing is compiled here).
    wrapped = torch.compile(model)
    router = create_truncated_router(wrapped, num_layers=1)
    assert router.source is model
    model.compile()
    router2 = create_truncated_router(model, num_layers=1)
    assert router2.view._compiled_call_impl is None and model._compiled_call_impl is not None
    with torch.no_grad():
        torch.testing.assert_close(router2(ids, attention_mask=am), want, atol=0, rtol=0)


# ------------------------------------------------------------------------- fused router path (no logits)
_CAUSAL = sorted(f for f, a in SUPPORTED_ARCHITECTURES.items() if not a.masked_lm)


@pytest.mark.parametrize("family", _CAUSAL)
def test_fused_router_path_scores_like_the_logits_path(family):
    model = tiny_model(family)
    router = create_truncated_router(model, num_layers=KEEP)
    ids, am = _batch(2, B=4, T=8)
    labels = ids.clone()
    labels[2, 3] = -100
    fused = CGGRScorer(router, warmup_steps=0, min_tokens_ratio=0.4)
    plain = CGGRScorer(router, warmup_steps=0, min_tokens_ratio=0.4, router_path="logits")
    if family == "gemma2":   # final_logit_softcapping, found by the numeric rule: explicit fallback, with the reason
        assert fused.router_path_used == "logits"
        assert "not hidden @ lm_head.weight.T" in fused.router_path_reason
        with pytest.raises(ValueError, match="router_path"):
            CGGRScorer(router, router_path="fused")
        return
    d_f, mask_f, info_f = fused(ids, labels, am)
    d_l, mask_l, info_l = plain(ids, labels, am)
    assert info_f["router_path"] == fused.router_path_used == "fused"
    assert info_l["router_path"] == "logits"
    with torch.no_grad():
        logits = router(ids, attention_mask=am)
    ref = _oracle_scores(logits, labels, am, "combined")
    torch.testing.assert_close(info_f["eligible"][:, :-1], torch.from_numpy(ref["eligible"]))
    assert torch.equal(info_f["eligible"], info_l["eligible"]) and torch.equal(info_f["valid"], info_l["valid"])
    assert_within(d_f[:, :-1], ref["difficulty"], "difficulty", where=ref["eligible"])
    for name in ("confidence", "entropy"):
        torch.testing.assert_close(getattr(info_f["stats"], name), getattr(info_l["stats"], name), atol=2e-5,
                                   rtol=2e-5)
    # the last position has no target: zero statistics and difficulty on both paths
    assert (d_f[:, -1] == 0).all() and all((x[:, -1] == 0).all() for x in info_f["stats"])
    assert torch.equal(mask_f, mask_l) and int(info_f["k"]) == int(info_l["k"])
    # identical difficulties give the identical selection (same code after the scores)
    ref_mask, _ = oracle.select_tokens(d_f.double().numpy(), info_f["eligible"].numpy(), float(info_f["ratio"]))
    np.testing.assert_array_equal(mask_f.numpy(), ref_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_router_path_half_precision_nan_rows_and_autocast(dtype):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")   # token 5 poisons its position and every later one
    ids, am = _batch(3, B=4, T=8)
    ids[1, 4] = 5
    router = create_truncated_router(model, num_layers=1)
    runs = {}
    for precision in ("model", "autocast"):
        m = model.to(dtype) if precision == "model" else model.float()
        ctx = (torch.autocast("cpu", dtype=dtype) if precision == "autocast"
               else torch.autocast("cpu", enabled=False))
        with ctx:
            f = CGGRScorer(router, warmup_steps=0)(ids, ids, am)
            lg = CGGRScorer(router, warmup_steps=0, router_path="logits")(ids, ids, am)
        runs[precision] = (f, lg)
        assert m is model
    for f, lg in runs.values():
        (d_f, mask_f, info_f), (d_l, mask_l, info_l) = f, lg
        assert torch.equal(info_f["eligible"], info_l["eligible"])
        assert int(info_f["tokens_nonfinite"]) == int(info_l["tokens_nonfinite"]) >= 4   # row 1, positions 4..7
        assert not info_f["eligible"][1, 4:].any()
        e = info_f["eligible"]
        torch.testing.assert_close(d_f[e], d_l[e], atol=6e-4, rtol=2e-5)
        assert torch.equal(mask_f, mask_l)


class _WrappedHead(nn.Linear):
    """A Linear subclass (as a LoRA / quantised wrapper would be): not provably weight·h + bias."""


def test_fused_router_path_falls_back_explicitly():
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=1)
    assert fused_head_unsupported_reason(router) is None
    assert resolve_router_path(router, "auto")[0] == "fused"
    assert resolve_router_path(router, "logits")[0] == "logits"
    logits = torch.zeros(2, 5, V)
    path, reason = resolve_router_path(FixedRouter(logits), "auto")
    assert path == "logits" and "arbitrary module" in reason
    with pytest.raises(ValueError, match="router_path"):
        resolve_router_path(FixedRouter(logits), "fused")
    with pytest.raises(ValueError, match="router_path"):
        resolve_router_path(router, "materialised")
    with pytest.raises(ValueError, match="router_memory_budget_bytes"):
        CGGRScorer(router, router_memory_budget_bytes=0)
    assert "passthrough" in fused_head_unsupported_reason(create_truncated_router(model, architecture="passthrough"))
    assert "masked LM" in fused_head_unsupported_reason(create_truncated_router(tiny_model("bert"), 1))
    # a hook on the head would be bypassed: the next call falls back (re-checked every call, host only)
    scorer = CGGRScorer(router, warmup_steps=0)
    ids, am = _batch(1)
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: None)
    scorer(ids, ids, am)
    assert scorer.router_path_used == "logits" and "hook" in scorer.router_path_reason
    handle.remove()
    scorer(ids, ids, am)
    assert scorer.router_path_used == "fused"
    wrapped = _WrappedHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    wrapped.weight = model.lm_head.weight
    model.lm_head = wrapped
    assert "not a plain" in fused_head_unsupported_reason(router)
    model.config.final_logit_softcapping = None   # None means no transform
    model.lm_head = nn.Linear(wrapped.in_features, wrapped.out_features, bias=False)
    assert fused_head_unsupported_reason(router) is None
    # a config name decides nothing (Llama ignores logit_scale): the rule checks what the model computes
    # (tests/torch/test_head_linearity.py covers scaled, capped and soft-capped models)
    model.config.logit_scale = 0.5
    assert fused_head_unsupported_reason(router) is None
