"""The whole training step users run, PyTorch: forward + backward + ``AdamW.step()`` of a Hugging Face Llama
built from a config (bf16 weights, random init, random tokens), for every way of computing the loss.

Run through ``benchmarks/step.py --framework torch`` (shapes, budget, records); this module measures the rows
of one shape. Rows (``ROWS``, in the order they run; each from the same initial weights and a fresh AdamW):

* ``standard``       ``model(input_ids, labels=input_ids).loss`` (Hugging Face's own shifted cross-entropy);
* ``liger_flce``     Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on the base model's hidden states
                     (skipped, with the import error as its reason, when ``liger_kernel`` does not import);
* ``cggr_loss``      ``cggr_torch.CGGRLoss`` on the model's ``(B, T, V)`` logits;
* ``cggr_fused``     the fused CGGR LM head: ``cggr_torch.causal_lm.hf_causal_lm_cggr_loss`` (eager); the
                     compiled row calls the same head, ``FusedLinearCGGRLoss(hidden, W, shifted labels)``, on
                     the compiled base model (``hf_causal_lm_cggr_loss`` checks ``isinstance`` of its loss
                     module, which a compiled module is not);
* ``batch_split_L{1,2,4}`` ``cggr_torch.CGGRModel`` with a truncated router of 1, 2, 4 layers;
* ``batch_split_L1_<option>`` the cheaper routers of SPEC §9.3: ``CGGRModel(model, router_layers=1, **options)``
                     with ``cfg["router_options"][row]`` (``benchmarks/step.py`` ``ROUTER_OPTION_ROWS``:
                     ``router_positions``, ``router_samples``, ``router_prefix``, ``router_compile``, a
                     combination; ``batch_split_L1_stride4``: ``router_positions=4``, the stride the quality
                     study's gate chose); ``router_compile=True`` becomes ``{"backend": <compile backend>}`` when the
                     benchmark's backend is not inductor (``--quick``: ``aot_eager``);
* ``random_subset``  the full model on ``k`` random sequences of the batch, ``k`` = what CGGR keeps.

Every row also runs **compiled** (``torch.compile(model, dynamic=False)``; the base model for the head-fused
rows): the CGGR losses are compiled too (``torch.compile(loss_module)``); when that fails the failure is
recorded (``compile_error``) and the row goes on with the loss eager and the model compiled. ``CGGRModel`` gets
the compiled model as its main pass (``forward_with``; ``buckets="auto"``, the default, pads the kept rows to
``default_buckets(B)``, SPEC §9.4); its router stays eager unless the row sets ``router_compile``. The rows of
one shape share one model (weights reset to the same initial values before each row), so a compiled row reuses
the graphs an earlier row compiled (the main pass of ``CGGRModel`` is the ``random_subset`` graph: both run the
model on ``k`` sequences; Liger's base model is the fused head's); ``torch._dynamo`` is reset between shapes and
before each compiled CGGR-loss row (``FRESH_DYNAMO``). The graphs each row compiled, the graph breaks and the
graphs compiled during the timed steps (recompilation) are recorded.

CGGR settings: the defaults of ``cggr.CGGRConfig`` except ``warmup_steps=0`` (the steady state is measured,
not the curriculum) and ``dynamic_threshold=False`` unless ``dynamic_threshold`` is set: at random init the
mean confidence is ~1/V, so the SPEC §5.2 threshold would keep ``0.25·1.5`` instead of the ``0.25`` a trained
model keeps; with it off every CGGR row keeps exactly ``num_selected(·, ratio)``.

Timing (``benchmarks.harness.measure``): ``warmup`` untimed steps (the first compiles), then ``steps`` timed
steps, each from an idle GPU (synchronised before, untimed), CUDA events around the whole step. ``trained``
tokens = the tokens that get a loss (``B·(T−1)`` for the standard step, ``k·(T−1)`` for the sequence rows, the
CGGR loss's ``tokens_selected`` for the token rows); peak memory = ``torch.cuda.max_memory_allocated`` over
the row (weights, optimizer state and the step's activations).
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Any, Callable, Optional

import torch

#: (row, compiled) in the order they run for one shape: the baselines first, then the rows of the issue's
#: goals (fused vs compiled standard, batch split vs random subset), then the rest.
ROWS: list[tuple[str, bool]] = [
    ("standard", False), ("standard", True), ("cggr_fused", False), ("cggr_fused", True), ("liger_flce", False),
    ("liger_flce", True), ("random_subset", False), ("batch_split_L4", False), ("random_subset", True),
    ("batch_split_L4", True), ("batch_split_L1", True), ("batch_split_L1_stride", True),
    ("batch_split_L1_samples", True), ("batch_split_L1_prefix", True), ("batch_split_L1_stride4", True),
    ("batch_split_L1_compiled_router", True), ("batch_split_L1_stride4_compiled_router", True),
    ("batch_split_L2", False), ("batch_split_L1", False), ("batch_split_L2", True),
    ("batch_split_L1_stride", False), ("batch_split_L1_samples", False), ("batch_split_L1_prefix", False),
    ("batch_split_L1_stride4", False), ("batch_split_L1_compiled_router", False),
    ("batch_split_L1_stride4_compiled_router", False), ("cggr_loss", False),
    ("cggr_loss", True),
    ("batch_split_L1_combined", True), ("batch_split_L1_combined", False),
]
#: The rows ``benchmarks/step.py`` runs without ``--rows`` (both variants of each): all but the combined router,
#: which compiles its router twice more (~40 s at the 1B shape); ``--rows all`` or naming it runs it.
DEFAULT_ROWS: list[str] = sorted({r for r, _ in ROWS} - {"batch_split_L1_combined"})
#: Compiled rows that compile a CGGR loss start from a fresh ``torch._dynamo``: both CGGR losses run the same
#: inner functions, whose recompile limit an earlier row could have used up (the later row would then run
#: eager and look fast). Each of these rows compiles a model graph no earlier row has anyway.
FRESH_DYNAMO = {"cggr_fused", "cggr_loss"}
#: Expected seconds of each row on one H200 at the 1B shape (weights reset, compile, 3 + 8 steps) before any
#: row ran; ``benchmarks.harness.budget.Budget`` rescales them by what the rows already run took. Guesses from
#: the issue's step times and the models suite's compile times, rounded up; a compiled row that reuses an
#: earlier row's graphs (``CGGRModel`` after ``random_subset``, Liger after the fused head) compiles nothing.
PRIOR_S: dict[tuple[str, bool], float] = {
    ("standard", False): 12, ("standard", True): 70, ("cggr_fused", False): 15, ("cggr_fused", True): 90,
    ("liger_flce", False): 10, ("random_subset", False): 8, ("batch_split_L4", False): 10,
    ("random_subset", True): 60, ("batch_split_L4", True): 12, ("batch_split_L2", False): 10,
    ("batch_split_L1", False): 10, ("batch_split_L2", True): 12, ("batch_split_L1", True): 12,
    ("cggr_loss", False): 12, ("cggr_loss", True): 90, ("liger_flce", True): 15,
    # The cheaper routers (1-layer router, options of SPEC §9.3): as batch_split_L1, plus a router compile
    # (one layer, forward only) for the rows with router_compile.
    ("batch_split_L1_stride", False): 10, ("batch_split_L1_samples", False): 10,
    ("batch_split_L1_prefix", False): 10, ("batch_split_L1_compiled_router", False): 30,
    ("batch_split_L1_stride", True): 12, ("batch_split_L1_samples", True): 12, ("batch_split_L1_prefix", True): 12,
    ("batch_split_L1_stride4", False): 10, ("batch_split_L1_stride4", True): 12,
    ("batch_split_L1_compiled_router", True): 30, ("batch_split_L1_combined", False): 30,
    ("batch_split_L1_stride4_compiled_router", True): 30, ("batch_split_L1_stride4_compiled_router", False): 30,
    ("batch_split_L1_combined", True): 30,
}
LABELS = {
    "standard": "standard (HF loss)", "liger_flce": "Liger fused linear CE", "cggr_loss": "CGGRLoss on logits",
    "cggr_fused": "fused CGGR head", "random_subset": "random subset (same kept count)",
    "batch_split_L1": "CGGRModel, 1-layer router", "batch_split_L2": "CGGRModel, 2-layer router",
    "batch_split_L4": "CGGRModel, 4-layer router",
    "batch_split_L1_stride": "CGGRModel, 1-layer router, router_positions (stride)",
    "batch_split_L1_samples": "CGGRModel, 1-layer router, router_samples",
    "batch_split_L1_prefix": "CGGRModel, 1-layer router, router_prefix",
    "batch_split_L1_stride4": "CGGRModel, 1-layer router, router_positions=4 (the quality study's gate)",
    "batch_split_L1_compiled_router": "CGGRModel, 1-layer router, router_compile=True",
    "batch_split_L1_stride4_compiled_router": "CGGRModel, 1-layer router, router_positions=4, router_compile=True",
    "batch_split_L1_combined": "CGGRModel, 1-layer router, router_prefix + router_samples + router_compile",
}
IGNORE = -100
Tensor = torch.Tensor
Out = tuple[torch.Tensor, Any]  # a row's forward: (loss, tokens that got a loss: an int or a 0-d tensor)


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A Llama ``…ForCausalLM`` of ``shape`` (``benchmarks/step.py`` SHAPES), random init, bf16 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(shape["seq_len"], 64),
                      tie_word_embeddings=shape["tied"], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the device: seconds, not minutes, for the 1B shape
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype=dtype).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_counts() -> dict[str, float]:
    from torch._dynamo.utils import counters

    return {"graphs": float(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": float(sum(counters["graph_break"].values()))}


def _short(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class _Row:
    """The loss of one row: ``forward(ids, labels, shifted) -> (loss, trained tokens)``, ``after()`` after the
    optimizer step (the curriculum's ``step()``), ``loss_eager()`` to fall back when a compiled loss fails."""

    def __init__(self, forward: Callable[[Tensor, Tensor, Tensor], Out],
                 after: Callable[[], None] = lambda: None, loss_eager: Optional[Callable[[], None]] = None,
                 notes: Optional[dict[str, Any]] = None):
        self.forward, self.after, self.loss_eager = forward, after, loss_eager
        self.notes = dict(notes or {})


def _make_row(row: str, compiled: bool, model: torch.nn.Module, cfg: dict[str, Any], B: int, T: int,
              device: torch.device, backend: str) -> _Row:
    from benchmarks.harness import compat
    from cggr_torch import CGGRLoss, CGGRModel, num_selected
    from cggr_torch.causal_lm import hf_causal_lm_cggr_loss
    from cggr_torch.fused_linear import FusedLinearCGGRLoss

    def compile_(m: Any) -> Any:
        # Static shapes: every row's shapes are fixed (the kept count too, with the threshold off), and the
        # rows of one shape share the compiled graphs of one model (see ``run_row``); automatic dynamic shapes
        # would turn the second batch size seen (standard B, then the kept k) into a dynamic-shape graph.
        return torch.compile(m, backend=backend, dynamic=False)

    cggr_kw = dict(min_tokens_ratio=cfg["ratio"], warmup_steps=0, dynamic_threshold=cfg["dynamic_threshold"])
    full_tokens = B * (T - 1)
    head = model.get_output_embeddings()
    if row == "standard":
        main = compile_(model) if compiled else model
        return _Row(lambda ids, labels, shifted: (main(input_ids=ids, labels=labels).loss, full_tokens),
                    notes={"api": "model(input_ids=ids, labels=labels).loss"})
    if row == "liger_flce":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except Exception as err:  # noqa: BLE001 - any import failure is the skip reason
            raise _Skip(f"liger-kernel not importable ({_short(err)}); carry its wheel in .whl/") from None
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        base = compile_(model.model) if compiled else model.model
        d = head.weight.shape[1]

        def liger_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
            hidden = base(input_ids=ids).last_hidden_state
            return liger(head.weight, hidden.reshape(-1, d), shifted.reshape(-1)), full_tokens
        return _Row(liger_forward, notes={"api": "LigerFusedLinearCrossEntropyLoss(W, base(ids) hidden, shifted)"
                                          + (" (base model compiled, Liger eager)" if compiled else "")})
    if row == "cggr_loss":
        crit = CGGRLoss(**cggr_kw)
        main = compile_(model) if compiled else model
        cell = [compile_(crit) if compiled else crit]

        def loss_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
            loss = cell[0](main(input_ids=ids).logits, shifted)
            return loss, compat.torch_loss_metric_tensors(crit).get("tokens_selected")

        def eager() -> None:
            cell[0] = crit
        return _Row(loss_forward, crit.step, eager if compiled else None,
                    notes={"api": "CGGRLoss(model(ids).logits, shifted labels)"})
    if row == "cggr_fused":
        crit = FusedLinearCGGRLoss(**cggr_kw)
        if not compiled:
            def fused_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
                loss = hf_causal_lm_cggr_loss(model, ids, labels, crit)
                return loss, compat.torch_loss_metric_tensors(crit).get("tokens_selected")
            return _Row(fused_forward, crit.step, notes={"api": "hf_causal_lm_cggr_loss(model, ids, labels, "
                                                                "FusedLinearCGGRLoss)"})
        base = compile_(model.model)
        cell = [compile_(crit)]

        def fused_compiled(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
            hidden = base(input_ids=ids).last_hidden_state
            loss = cell[0](hidden, head.weight, shifted, head.bias)
            return loss, compat.torch_loss_metric_tensors(crit).get("tokens_selected")

        def eager_fused() -> None:
            cell[0] = crit
        return _Row(fused_compiled, crit.step, eager_fused,
                    notes={"api": "FusedLinearCGGRLoss(compiled base(ids) hidden, W, shifted labels)"})
    if row == "random_subset":
        k = cfg["kept"]
        gen = torch.Generator(device="cpu").manual_seed(cfg["seed"])
        main = compile_(model) if compiled else model

        def random_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
            idx = torch.randperm(B, generator=gen)[:k].sort().values.to(device, non_blocking=True)
            return main(input_ids=ids.index_select(0, idx), labels=labels.index_select(0, idx)).loss, k * (T - 1)
        return _Row(random_forward, notes={"api": f"model(ids[random {k} of {B}], labels=...).loss"})
    if row.startswith("batch_split_L"):
        layers = int(row[len("batch_split_L"):].split("_")[0])
        options = dict(cfg.get("router_options", {}).get(row, {})) if row != f"batch_split_L{layers}" else {}
        if row != f"batch_split_L{layers}" and not options:
            raise ValueError(f"row: {row!r} has no router options in cfg['router_options']")
        shown = dict(options)
        if options.get("router_compile") is True and backend != "inductor":
            options["router_compile"] = {"backend": backend}  # --quick: the benchmark's own backend
        cg = CGGRModel(model, router_layers=layers, buckets="auto", **options, **cggr_kw)
        if compiled:
            main = compile_(model)

            def split_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
                out = cg.forward_with(main, ids, labels)
                return out.loss, out.num_kept * (T - 1)   # a device count: no host read in the timed step
        else:
            def split_forward(ids: Tensor, labels: Tensor, shifted: Tensor) -> Out:
                loss = cg(ids, labels=labels)
                return loss, cg.last_num_kept * (T - 1)
        router = "router compiled" if options.get("router_compile") else "router eager"
        call = (f".forward_with(torch.compile(model), ids, labels) ({router}, buckets {cg.bucket_sizes(B, main)})"
                if compiled else f"(ids, labels=labels) ({router})")
        args = "".join(f", {k}={v!r}" for k, v in shown.items())
        notes = {"api": f"CGGRModel(model, router_layers={layers}{args}){call}",
                 "router_layers": layers, "nominal_kept": int(num_selected(B, cfg["ratio"])),
                 "kept_rows": cg.kept_rows_mode(), "kept_rows_bound": cg.kept_rows_bound(B)}
        if shown:
            notes["router_options"] = shown
        if compiled:
            notes["buckets"] = list(cg.bucket_sizes(B, main) or ())
        return _Row(split_forward, cg.step, notes=notes)
    raise ValueError(f"row: unknown row {row!r}; expected one of {sorted(LABELS)}")


class _Skip(Exception):
    """A row that cannot run here (its reason is recorded)."""


def prepare_shape(shape: dict[str, Any], cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model of one shape, shared by its rows, and a host copy of its initial weights (every row starts
    from them). Sharing the model lets the compiled rows share the graphs they have in common (``torch._dynamo``
    caches per code object and module): the kept-count graph of ``random_subset`` is the main pass of every
    compiled ``CGGRModel`` row, the base model of ``cggr_fused`` is that of ``liger_flce``."""
    import torch._dynamo

    torch._dynamo.reset()  # a new shape, a new model: nothing of the previous shape's graphs is reused
    dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32
    model = build_model(shape, device, dtype, cfg["seed"])
    init = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if device.type == "cuda":
        init = {k: v.pin_memory() for k, v in init.items()}
    return {"model": model, "init": init, "batches": make_batches(shape, device, cfg["seed"])}


def run_row(row: str, compiled: bool, shape: dict[str, Any], cfg: dict[str, Any], device: torch.device,
            prepared: dict[str, Any]) -> dict[str, Any]:
    """Measure one row on the shape's shared model (weights reset to the initial ones, a fresh AdamW);
    returns its raw result (``status`` ``ok`` / ``skipped`` / ``failed``)."""
    from benchmarks.harness import measure

    B, T = shape["batch_size"], shape["seq_len"]
    model, batches = prepared["model"], prepared["batches"]
    res: dict[str, Any] = {"row": row, "compiled": compiled, "label": LABELS.get(row, row)}
    t_row = time.perf_counter()
    opt = made = None
    try:
        with torch.no_grad():
            state = model.state_dict()
            for k, v in prepared["init"].items():
                state[k].copy_(v, non_blocking=True)
        model.zero_grad(set_to_none=True)
        if compiled and row in FRESH_DYNAMO:
            torch._dynamo.reset()
        counts0 = _dynamo_counts()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
        made = _make_row(row, compiled, model, cfg, B, T, device, cfg["compile_backend"])
        res.update(made.notes)
        trained: list[Any] = []
        last_loss: list[Any] = [None]

        def step(i: int) -> None:
            loss, n = made.forward(*batches[i % len(batches)])
            last_loss[0] = loss.detach()  # read after the timed steps: a broken (compiled) path shows as NaN
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            made.after()
            trained.append(n)

        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(cfg["warmup"]):
            try:
                step(i)
            except Exception as err:  # noqa: BLE001 - a compiled CGGR loss may fail to compile: record, go on
                if not (compiled and made.loss_eager is not None and "compile_error" not in res):
                    raise
                res["compile_error"] = _short(err)
                res["compile_trace"] = traceback.format_exc()[-3000:]
                res["api"] = res.get("api", "") + " (loss eager: its compile failed, see compile_error)"
                print(f"    compile of the loss failed ({res['compile_error']}); going on with the loss eager",
                      flush=True)
                opt.zero_grad(set_to_none=True)
                made.loss_eager()
                step(i)
            if i == 0:
                _sync(device)
                res["first_step_s"] = time.perf_counter() - t0
        _sync(device)
        res["warmup_s"] = time.perf_counter() - t0
        counts1 = _dynamo_counts()
        trained.clear()
        counter = iter(range(10**9))
        timing = measure(lambda: step(cfg["warmup"] + next(counter)), framework="torch", device=device.type,
                         warmup=0, reps=cfg["steps"], before_each=lambda: _sync(device))
        counts2 = _dynamo_counts()
        per_step = [float(x) if not isinstance(x, torch.Tensor) else float(x.item()) for x in trained
                    if x is not None]
        final = float(last_loss[0])
        if final != final or final in (float("inf"), float("-inf")):
            raise RuntimeError(f"non-finite loss {final} at the last timed step")
        res.update(status="ok", **{k: v for k, v in timing.as_dict().items() if k != "warmup"})
        res["final_loss"] = final
        res["warmup_steps"] = cfg["warmup"]
        res["input_tokens_per_step"] = B * T
        res["input_tokens_per_s"] = B * T / (timing.median_ms * 1e-3)
        if per_step:
            res["trained_tokens_per_step"] = statistics.median(per_step)
            res["trained_tokens_per_s"] = res["trained_tokens_per_step"] / (timing.median_ms * 1e-3)
        if row.startswith("batch_split") or row == "random_subset":
            res["sequences_trained"] = res.get("trained_tokens_per_step", 0) / (T - 1)
        res["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None
        if cfg.get("profile_steps"):  # after the timed steps and the peak memory: both unchanged
            from benchmarks.harness import profiles
            n = int(cfg["profile_steps"])
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            try:  # a profile that fails costs the profile, not the row's timing
                with torch.profiler.profile(activities=acts) as prof:
                    for i in range(n):
                        step(10**6 + i)
                    _sync(device)
                res["profile"] = profiles.torch_profile_summary(prof, n)
            except Exception as err:  # noqa: BLE001
                res["profile_error"] = _short(err)
        if compiled or "router_compile" in res.get("router_options", {}):
            # Graphs compiled by this row (0 when it reuses an earlier row's graphs of the same model), graph
            # breaks met while compiling them, and graphs compiled during the timed steps (recompilation).
            res["graphs_compiled_warmup"] = counts1["graphs"] - counts0["graphs"]
            res["graph_breaks_warmup"] = counts1["graph_breaks"] - counts0["graph_breaks"]
            res["graphs_compiled_timed"] = counts2["graphs"] - counts1["graphs"]
    except _Skip as why:
        res.update(status="skipped", reason=str(why))
    except Exception as err:  # noqa: BLE001 - one failing row (OOM, compile crash) must not lose the others
        res.update(status="failed", reason=_short(err), trace=traceback.format_exc()[-3000:])
    finally:
        del opt, made
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = time.perf_counter() - t_row
    return res


def release_shape(prepared: dict[str, Any], device: torch.device) -> None:
    prepared.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batches(shape: dict[str, Any], device: torch.device, seed: int, n: int = 4
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` random ``(input_ids, labels, shifted labels)`` batches. ``labels`` is a copy of the ids (as a data
    collator hands them; the model shifts them itself); ``shifted[:, t] = ids[:, t + 1]``, the last position
    ``-100`` (SPEC §1: the prediction at ``t`` is scored against token ``t + 1``) for the losses given
    aligned targets."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, shape["vocab"], (shape["batch_size"], shape["seq_len"]), generator=g)
        shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
        out.append((ids.to(device), ids.clone().to(device), shifted.to(device)))
    return out


def environment(device: torch.device) -> dict[str, Any]:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def device_for(quick: bool) -> torch.device:
    if quick:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --quick for the CPU script check")
    return torch.device("cuda")


def kept_count(batch_size: int, cfg: dict[str, Any]) -> int:
    """Sequences CGGR keeps at the steady state: ``num_selected(B, ratio)``; with the dynamic threshold on, the
    random-init steady state ``ratio·(1 + sensitivity)`` (mean confidence ~1/V, SPEC §5.2)."""
    from cggr import CGGRConfig
    from cggr_torch import num_selected

    r = cfg["ratio"]
    if cfg["dynamic_threshold"]:
        r = min(1.0, r * (1.0 + CGGRConfig.threshold_sensitivity))
    return int(num_selected(batch_size, r))
