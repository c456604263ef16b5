"""The ONE place where the benchmarks reach into package internals.

The op benchmarks time kernels, launch variants and floors that no public API exposes (a scoring launch with
a given ``LaunchConfig``, the fused LM head's chunk plan, the backward grid switch...). Every such import is
here, one function per internal, each trying the new module layout of issue 13 first (``kernels/launch.py``
for launch heuristics, ``dispatch.force`` instead of private globals, public names where the redesign made
them public) and falling back to the pre-redesign path. After a package move, fix the paths here and
nowhere else. Everything else in ``benchmarks/`` imports the packages through their public names.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Any, Iterator, Optional, Sequence

__all__ = [
    "force", "torch_scoring_kernels", "torch_cross_entropy_kernels", "torch_launch", "torch_mode_code",
    "torch_next_pow2", "torch_selection_kernels", "torch_sort_key_bits", "torch_selection_check",
    "torch_order_key32", "torch_loss_metric_tensors", "torch_backward_flat_grid", "torch_fused_gradient_kernel",
    "torch_fused_without_gradient_kernel", "torch_fused_accumulates_in_place", "torch_fused_accumulate_matmul",
    "jax_fused_statistics_kernel", "jax_fused_forward_blocks", "torch_plan_chunks", "torch_default_memory_budget",
    "torch_fused_linear_module", "torch_router_constants", "jax_batch_split_route", "jax_batch_split_jitted",
    "jax_scoring_kernels",
    "jax_token_statistics_reference", "jax_stream_class", "jax_cross_entropy_kernels", "jax_backward_flat_grid",
    "jax_backward_grids", "jax_scored_selective_cross_entropy", "jax_plan_chunks", "jax_default_memory_budget",
    "jax_fused_linear_module",
]


def _module(*names: str) -> ModuleType:
    """The first importable module of ``names`` (new layout first)."""
    err: Optional[Exception] = None
    for n in names:
        try:
            return importlib.import_module(n)
        except ModuleNotFoundError as e:  # this layout does not have it: try the next
            if e.name is None or not (n == e.name or n.startswith(e.name + ".")):
                raise  # a missing dependency inside the module, not a moved module: report it
            err = e
    raise ImportError(f"none of {names} is importable") from err


def _attr(candidates: Sequence[tuple[str, str]]) -> Any:
    """The first ``module.attribute`` of ``candidates`` that exists (new names first)."""
    tried = []
    for mod, attr in candidates:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError:
            tried.append(f"{mod} (no module)")
            continue
        if hasattr(m, attr):
            return getattr(m, attr)
        tried.append(f"{mod}.{attr}")
    raise ImportError("benchmarks.harness.compat: none of " + ", ".join(tried) + " exists; fix the path here")


class _Lookup:
    """Attribute lookup over several modules, first hit wins: a kernel helper that moved between
    ``kernels/<op>.py``, ``kernels/launch.py`` and the ``kernels`` package is still found. ``module_of(name)``
    gives the module that holds it (to set a module global)."""

    def __init__(self, *names: str):
        self._mods = []
        for n in names:
            try:
                self._mods.append(importlib.import_module(n))
            except ModuleNotFoundError as e:
                if e.name is None or not (n == e.name or n.startswith(e.name + ".")):
                    raise
        if not self._mods:
            raise ImportError(f"benchmarks.harness.compat: none of {names} is importable; fix the path here")

    def module_of(self, name: str) -> ModuleType:
        for m in self._mods:
            if hasattr(m, name):
                return m
        raise AttributeError(f"{name} in none of {[m.__name__ for m in self._mods]} (benchmarks.harness.compat)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.module_of(name), name)


# ------------------------------------------------------------------------------------------- dispatch
@contextlib.contextmanager
def force(framework: str, mode: str) -> Iterator[None]:
    """Force ``"kernel"`` or ``"reference"`` paths of one package for the duration of the block.

    New layout: ``<package>.dispatch.force(mode)``. Old layout: ``"reference"`` = ``CGGR_DISABLE_KERNELS=1``;
    ``"kernel"`` on CPU tensors (interpreted Triton, the CPU smoke runs) = the device-type allow-lists of
    ``cggr_torch.scoring._KERNEL_DEVICE_TYPES`` / ``cggr_torch.loss._FUSED_DEVICE_TYPES`` widened to CPU (JAX's
    kernels take ``interpret=`` themselves, so nothing to widen there)."""
    if mode not in ("kernel", "reference", "auto"):
        raise ValueError(f"mode: expected 'kernel', 'reference' or 'auto', got {mode!r}")
    pkg = {"torch": "cggr_torch", "jax": "cggr_jax"}[framework]
    try:
        dispatch = importlib.import_module(f"{pkg}.dispatch")
    except ModuleNotFoundError:
        dispatch = None
    if dispatch is not None and hasattr(dispatch, "force"):
        with dispatch.force(mode):
            yield
        return
    saved_env = os.environ.get("CGGR_DISABLE_KERNELS")
    patched: list[tuple[Any, str, Any]] = []
    try:
        if mode == "reference":
            os.environ["CGGR_DISABLE_KERNELS"] = "1"
        elif mode == "kernel":
            os.environ.pop("CGGR_DISABLE_KERNELS", None)
            if framework == "torch":
                for mod, attr in (("cggr_torch.scoring", "_KERNEL_DEVICE_TYPES"),
                                  ("cggr_torch.loss", "_FUSED_DEVICE_TYPES")):
                    m = importlib.import_module(mod)
                    if hasattr(m, attr):
                        patched.append((m, attr, getattr(m, attr)))
                        setattr(m, attr, tuple(getattr(m, attr)) + ("cpu",))
        yield
    finally:
        for m, attr, old in reversed(patched):
            setattr(m, attr, old)
        if saved_env is None:
            os.environ.pop("CGGR_DISABLE_KERNELS", None)
        else:
            os.environ["CGGR_DISABLE_KERNELS"] = saved_env


# ------------------------------------------------------------------------------------- torch kernels
def torch_scoring_kernels() -> Any:
    """The Triton scoring/CE-backward launchers (``launch_scoring``, ``row_geometry``, ``flat_targets``,
    ``score_tokens_triton``, ``launch_scoring_chunk``...): the scoring benchmark times the kernel alone and its
    launch variants, which no public API exposes. Looked up in ``kernels/scoring.py``, then ``kernels/launch.py``
    and the ``kernels`` package."""
    return _Lookup("cggr_torch.kernels.scoring", "cggr_torch.kernels.launch", "cggr_torch.kernels")


def torch_cross_entropy_kernels() -> Any:
    """The Triton selective-CE launchers (``selective_cross_entropy_triton``, ``launch_selective_backward``,
    ``launch_masked_mean``): the selective-CE benchmark times the backward kernel and its launch variants alone."""
    return _Lookup("cggr_torch.kernels.cross_entropy", "cggr_torch.kernels.launch", "cggr_torch.kernels")


def torch_launch() -> Any:
    """Launch heuristics (``LaunchConfig``, ``scoring_config``, ``scoring_config_for_rows``, ``num_sms``,
    ``backward_config``, ``CHUNK_STATE_ROWS``): ``kernels/launch.py`` after issue 13, ``kernels/scoring.py``
    before; both are searched, so a name that stayed behind is still found."""
    return _Lookup("cggr_torch.kernels.launch", "cggr_torch.kernels.scoring", "cggr_torch.kernels")


def torch_mode_code(scoring: str) -> int:
    """The scoring kernel's integer code of a scoring mode (private ``_MODE_CODE`` before issue 13)."""
    table = _attr([("cggr_torch.kernels.launch", "MODE_CODE"), ("cggr_torch.kernels.scoring", "MODE_CODE"),
                   ("cggr_torch.kernels.scoring", "_MODE_CODE")])
    return int(table[scoring])


def torch_next_pow2(x: int) -> int:
    """Next power of two ≥ x, as the launch heuristics round (private ``_next_pow2`` before issue 13)."""
    fn = _attr([("cggr_torch.kernels.launch", "next_pow2"), ("cggr_torch.kernels.scoring", "next_pow2"),
                ("cggr_torch.kernels.scoring", "_next_pow2")])
    return int(fn(x))


def torch_selection_kernels() -> Any:
    """The Triton selection launchers (``launch_keys``, ``launch_plan``, ``launch_mask``, ``sort_order``),
    timed one by one as the selection benchmark's building blocks."""
    return _Lookup("cggr_torch.kernels.selection", "cggr_torch.kernels.launch", "cggr_torch.kernels")


@contextlib.contextmanager
def torch_sort_key_bits(bits: int) -> Iterator[None]:
    """Temporarily use ``bits``-bit sort keys in the Triton selection (``SORT_KEY_BITS``, a module global: the
    int64-key variant that run 6 rejected is still measured against the int32 default)."""
    mod = torch_selection_kernels().module_of("SORT_KEY_BITS")
    old = mod.SORT_KEY_BITS
    mod.SORT_KEY_BITS = bits
    try:
        yield
    finally:
        mod.SORT_KEY_BITS = old


def torch_selection_check(difficulty: Any, eligible: Any) -> Any:
    """The argument validation of ``select_tokens`` alone (timed as a building block); private ``_check`` in
    ``cggr_torch.selection`` before issue 13, a public check in ``utils`` after it where it moved."""
    fn = _attr([("cggr_torch.utils", "check_selection_inputs"), ("cggr_torch.selection", "check_inputs"),
                ("cggr_torch.selection", "_check")])
    return fn(difficulty, eligible)


def torch_order_key32(difficulty: Any, eligible: Any) -> Any:
    """The PyTorch form of the SPEC §6 int32 sort key (private ``cggr_torch.selection._order_key32`` before
    issue 13): ``verify_torch.py`` checks the Triton key kernel against it."""
    fn = _attr([("cggr_torch.selection", "order_key32"), ("cggr_torch.kernels.selection", "order_key32"),
                ("cggr_torch.selection", "_order_key32")])
    return fn(difficulty, eligible)


def torch_loss_metric_tensors(loss_module: Any) -> dict:
    """The last call's metrics of a ``CGGRLoss`` as device tensors (private ``_metrics`` before issue 13;
    ``get_metrics()`` converts to Python numbers, which the bit-for-bit ratio check of ``verify_torch.py``
    cannot use). Falls back to ``get_metrics()`` if the tensors are no longer reachable."""
    for name in ("metric_tensors", "last_metrics", "_metrics"):
        m = getattr(loss_module, name, None)
        if isinstance(m, dict) and m:
            return m
    return loss_module.get_metrics()


@contextlib.contextmanager
def torch_backward_flat_grid(on: bool) -> Iterator[None]:
    """Temporarily switch the Triton CE backward between the flat and the 2-D grid (module global
    ``_BACKWARD_FLAT_GRID``; DECISIONS.md: ce-backward-flat-grid)."""
    mod = None
    for n, attr in (("cggr_torch.kernels.launch", "BACKWARD_FLAT_GRID"),
                    ("cggr_torch.kernels.scoring", "BACKWARD_FLAT_GRID"),
                    ("cggr_torch.kernels.scoring", "_BACKWARD_FLAT_GRID")):
        try:
            m = importlib.import_module(n)
        except ModuleNotFoundError:
            continue
        if hasattr(m, attr):
            mod = (m, attr)
            break
    if mod is None:
        raise ImportError("benchmarks.harness.compat: no BACKWARD_FLAT_GRID switch found")
    old = getattr(*mod)
    setattr(mod[0], mod[1], on)
    try:
        yield
    finally:
        setattr(mod[0], mod[1], old)


def torch_fused_linear_module() -> ModuleType:
    """``cggr_torch.fused_linear`` for its internals used by the fused-head diagnostics
    (``fused_linear_cggr``); the module keeps its name in issue 13's layout (its backward and the
    accumulation helpers are in ``fused_linear_backward`` since the module split: see the functions below)."""
    return _module("cggr_torch.fused_linear")


def torch_fused_gradient_kernel(hidden: Any) -> Any:
    """The Triton in-place chunk-gradient kernel the fused head would use for ``hidden`` (None without one;
    private ``fused_linear._gradient_kernel_for`` before issue 13). DECISIONS.md: fused-head-inplace-gradient."""
    return _attr([("cggr_torch.fused_linear_backward", "gradient_kernel_for"),
                  ("cggr_torch.fused_linear", "gradient_kernel_for"),
                  ("cggr_torch.fused_linear", "_gradient_kernel_for")])(hidden)


@contextlib.contextmanager
def torch_fused_without_gradient_kernel() -> Iterator[None]:
    """Run the fused head with its element-wise PyTorch chunk gradient instead of the Triton pass (the rejected
    alternative of DECISIONS.md: fused-head-inplace-gradient): patches the kernel lookup of the module that
    runs the backward (``fused_linear_backward`` since the module split, ``fused_linear`` before)."""
    fl = _module("cggr_torch.fused_linear_backward", "cggr_torch.fused_linear")
    name = "gradient_kernel_for" if hasattr(fl, "gradient_kernel_for") else "_gradient_kernel_for"
    old = getattr(fl, name)
    setattr(fl, name, lambda h: None)
    try:
        yield
    finally:
        setattr(fl, name, old)


def torch_fused_accumulates_in_place(device: Any, dtype: Any) -> bool:
    """Whether the fused head's backward accumulates ∂h in place (cuBLAS float32-output GEMM); private
    ``fused_linear._accumulates_in_place`` before issue 13. DECISIONS.md: fused-head-chunk-plan."""
    return bool(_attr([("cggr_torch.fused_linear_backward", "accumulates_in_place"),
                       ("cggr_torch.fused_linear", "accumulates_in_place"),
                       ("cggr_torch.fused_linear", "_accumulates_in_place")])(device, dtype))


def torch_fused_accumulate_matmul(acc: Any, z: Any, w: Any) -> Any:
    """``acc += z @ w`` as the fused head's backward does it (private ``fused_linear._accumulate_matmul``)."""
    return _attr([("cggr_torch.fused_linear_backward", "accumulate_matmul"),
                  ("cggr_torch.fused_linear", "accumulate_matmul"),
                  ("cggr_torch.fused_linear", "_accumulate_matmul")])(acc, z, w)


def torch_plan_chunks(*args: Any, **kwargs: Any) -> Any:
    """The fused LM head's chunk plan (DECISIONS.md: fused-head-chunk-plan); ``kernels/launch.py`` or
    ``fused_linear.py``."""
    return _attr([("cggr_torch.kernels.launch", "plan_chunks"), ("cggr_torch.fused_linear", "plan_chunks")])(
        *args, **kwargs)


def torch_default_memory_budget() -> int:
    """The fused LM head's default working-memory budget in bytes (0.25 GiB)."""
    return int(_attr([("cggr_torch.kernels.launch", "DEFAULT_MEMORY_BUDGET"),
                      ("cggr_torch.fused_linear", "DEFAULT_MEMORY_BUDGET")]))


def torch_router_constants() -> tuple[int, tuple[str, ...]]:
    """``(ROUTER_MEMORY_BUDGET, ROUTER_PATHS)`` of the batch-split router (``cggr_torch.router`` before issue
    13; the batch-split benchmark validates ``--router-path`` and defaults its budget with them)."""
    budget = _attr([("cggr_torch.router", "ROUTER_MEMORY_BUDGET"), ("cggr_torch.batch_split", "ROUTER_MEMORY_BUDGET"),
                    ("cggr_torch.kernels.launch", "ROUTER_MEMORY_BUDGET")])
    paths = _attr([("cggr_torch.router", "ROUTER_PATHS"), ("cggr_torch.batch_split", "ROUTER_PATHS")])
    return int(budget), tuple(paths)


# --------------------------------------------------------------------------------------- jax kernels
def jax_batch_split_route(step: Any) -> Any:
    """The routing function of a JAX batch-split train step (private ``step._route(params, rest, ids, labels,
    mask, step_index)`` before issue 13): the benchmark times the router pass alone."""
    for name in ("route", "_route"):
        fn = getattr(step, name, None)
        if fn is not None:
            return fn
    raise ImportError("benchmarks.harness.compat: the batch-split step has no route function; fix the name here")


def jax_batch_split_jitted(step: Any) -> Any:
    """The jitted function behind a JAX batch-split train step's ``__call__`` (private ``step._jitted``:
    ``(state, input_ids, labels, attention_mask, reference_nll) -> (state, metrics)``, without the host-side
    label checks): the whole-step benchmark lowers and compiles it once, reads XLA's memory analysis of it and
    times that compiled step."""
    for name in ("jitted", "_jitted"):
        fn = getattr(step, name, None)
        if fn is not None and hasattr(fn, "lower"):
            return fn
    raise ImportError("benchmarks.harness.compat: the batch-split step has no jitted function; fix the name here")


def jax_scoring_kernels() -> Any:
    """``cggr_jax.kernels.scoring``: the read-only Pallas loop of the scoring benchmark reuses its tiling
    helpers (``tile_columns``, ``program_rows``, ``store``, ``whole``, ``pallas_call_options``); also searched
    in ``kernels/launch.py`` and the ``kernels`` package."""
    return _Lookup("cggr_jax.kernels.scoring", "cggr_jax.kernels.launch", "cggr_jax.kernels")


def jax_token_statistics_reference(logits: Any, safe_targets: Any, has_target: Any) -> Any:
    """The XLA reference statistics on already checked inputs (``cggr_jax.scoring.token_statistics_reference``
    before issue 13, whose contract the redesign may change): ``verify_jax.py`` compares the Pallas kernel with
    it. Fallback: the public ``token_statistics`` with the XLA path forced (traced inside the caller's jit)."""
    try:
        fn = _attr([("cggr_jax.scoring", "token_statistics_reference")])
        return fn(logits, safe_targets, has_target)
    except (ImportError, TypeError):
        import jax.numpy as jnp

        from cggr_jax import token_statistics

        targets = None if safe_targets is None else jnp.where(has_target, safe_targets, -100)
        with force("jax", "reference"):
            return token_statistics(logits, targets, ignore_index=-100)


def jax_stream_class() -> Any:
    """The Pallas streaming loop class (private ``_Stream`` before issue 13)."""
    return _attr([("cggr_jax.kernels.scoring", "Stream"), ("cggr_jax.kernels.scoring", "_Stream")])


def jax_cross_entropy_kernels() -> Any:
    """``cggr_jax.kernels.cross_entropy`` (the Pallas CE backward; its ``BACKWARD_FLAT_GRID`` switch)."""
    return _Lookup("cggr_jax.kernels.cross_entropy", "cggr_jax.kernels.launch", "cggr_jax.kernels")


@contextlib.contextmanager
def jax_backward_flat_grid(on: bool) -> Iterator[None]:
    """Temporarily switch the Pallas CE backward's grid (DECISIONS.md: ce-backward-flat-grid: it stays 2-D in
    JAX); ``kernels/launch.py`` after issue 13 if it moved there, else ``kernels/cross_entropy.py``."""
    # kernels/cross_entropy.py binds the default from kernels/launch.py at import: switch every binding.
    mods = []
    for n in ("cggr_jax.kernels.launch", "cggr_jax.kernels.cross_entropy"):
        try:
            m = importlib.import_module(n)
        except ModuleNotFoundError:
            continue
        if hasattr(m, "BACKWARD_FLAT_GRID"):
            mods.append((m, m.BACKWARD_FLAT_GRID))
    if not mods:
        raise ImportError("benchmarks.harness.compat: no BACKWARD_FLAT_GRID in cggr_jax")
    for m, _ in mods:
        m.BACKWARD_FLAT_GRID = on
    try:
        yield
    finally:
        for m, old in mods:
            m.BACKWARD_FLAT_GRID = old


def jax_scored_selective_cross_entropy() -> Any:
    """Scores → selection → selective CE with the Pallas kernels (``cggr_jax.pipeline`` after issue 13;
    ``kernels.scored_selective_cross_entropy_pallas`` before)."""
    return _attr([("cggr_jax.pipeline", "scored_selective_cross_entropy"),
                  ("cggr_jax.kernels", "scored_selective_cross_entropy_pallas")])


def jax_backward_grids(fn: Any, *args: Any) -> Any:
    """The Pallas backward launches of a traced call (``kernels.cross_entropy.backward_grids``), to report
    which grid a timing used."""
    return _attr([("cggr_jax.kernels.cross_entropy", "backward_grids")])(fn, *args)


def jax_fused_linear_module() -> ModuleType:
    """``cggr_jax.fused_linear`` for the diagnostics' internals (``_forward_blocks``, ``_statistics_kernel``)."""
    return _module("cggr_jax.fused_linear")


def jax_fused_statistics_kernel() -> Any:
    """Whether / which Pallas statistics kernel the JAX fused head uses here (private
    ``fused_linear._statistics_kernel()`` before issue 13)."""
    try:  # after issue 13 the decision is cggr_jax.dispatch's, read outside any trace
        return bool(importlib.import_module("cggr_jax.dispatch").use_kernels())
    except ModuleNotFoundError:
        return _attr([("cggr_jax.fused_linear", "_statistics_kernel")])()


def jax_fused_forward_blocks(*args: Any, **kwargs: Any) -> Any:
    """``(plan, rows, cols)`` of the JAX fused head's forward blocks (private ``fused_linear._forward_blocks``)."""
    return _attr([("cggr_jax.fused_linear", "forward_blocks"), ("cggr_jax.fused_linear", "_forward_blocks")])(
        *args, **kwargs)


def jax_plan_chunks(*args: Any, **kwargs: Any) -> Any:
    """The JAX fused LM head's chunk plan (DECISIONS.md: fused-head-chunk-plan)."""
    return _attr([("cggr_jax.kernels.launch", "plan_chunks"), ("cggr_jax.fused_linear", "plan_chunks")])(
        *args, **kwargs)


def jax_default_memory_budget() -> int:
    """The JAX fused LM head's default working-memory budget in bytes."""
    return int(_attr([("cggr_jax.kernels.launch", "DEFAULT_MEMORY_BUDGET"),
                      ("cggr_jax.fused_linear", "DEFAULT_MEMORY_BUDGET")]))
