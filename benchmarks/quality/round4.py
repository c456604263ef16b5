"""Round 4 of the quality study (PROTOCOL.md "Round 4 (M)"): ``--round round4`` of ``study.py``.

    python -m benchmarks.quality.study --scale M --round round4 --out benchmarks/quality/results/round4 \\
        --deadline-s 480 --export $OUT/round4.tar.gz              # one device call (resumable)
    python -m benchmarks.quality.study --scale M --round round4 --out x --plan-only --deadline-s 540

What it runs, in order (every task skipped when its JSON exists; units run whole or stop the plan):

1. **No reference training**: the per-sequence reference is round 3's committed per-chunk table
   (``results/round3/ref/refnll_train.npy`` + ``ref.json``, ``--ref-dir`` to move it). Every train chunk the plan
   reads (each seed's first max(B·N, k·2N) permutation entries) must be finite there: a NaN (not covered) is a
   ``ValueError`` before anything trains.
2. **LR sweeps** (seed 0) of ``std_B``, then ``std_k``, over the scale's grids ({5e-4, 1e-3, 2e-3} at M), each
   with rule 1's extra point beyond an edge argmin (``study.edge_extension``) before the next arm's sweep.
3. **Per seed** (0, 1, 2): the paired sequence arms (``std_B``, ``std_k``, ``random_subset``,
   ``cggr_excess_r1_s4``; seed 0's ``std_B``/``std_k`` are the tuned sweep runs), then ``std_k``'s budgets N/2
   and 2N (no 4N), each a unit.
4. **The JAX arm** ``cggr_excess_r1_s4_jax`` (seed 0, ``jax_arm.py``) in a child process.

**The `test` split, read once** (item 5): every run but the sweep runs records ``final.test_loss`` (all `test`
chunks, computed as ``final.val_loss``) beside its val numbers. The sweep runs choose the rate, so they do not read
it while they are compared; their final weights are kept (in memory and in ``<store>/sweep/``, git-ignored) until
the sweep is decided, and only the *tuned* sweep run of each arm — seed 0's ``std_B``/``std_k`` arm — then gets its
`test` loss (``final.test_source = "sweep checkpoint"``). If that checkpoint is gone (a fresh machine between the
sweep's calls), the tuned run is trained again under the tag ``test`` (same spec; its own val and test recorded)
and ``analyze.py`` reads seed 0's `test` number from it.

Cost model (``--plan-only``, :data:`COST_FACTOR`, relative to a ``std_B`` step, M's std_B assumed 160 ms until
measured): std_k 0.42 (P26's middle: M is nearer compute-bound than S2's 0.66), random_subset 0.43,
cggr_excess_r1_s4 0.55 (the 1-layer stride-4 router adds ~30 % to an 8-row step, P26), the JAX arm 0.60 plus
:data:`JAX_START_S` (a child process: imports, corpus load, the step's compilation of its 2 buckets and the
router, the evaluation's). Guesses, replaced by measured ms/step as soon as the folder has them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
import numpy as np

from benchmarks.quality import pycode, study

#: The JAX arm (jax_arm.py).
JAX_ARM = "cggr_excess_r1_s4_jax"
#: The library's excess arm of round 4 (PROTOCOL.md "Round 4", item 3).
R4_ARM = "cggr_excess_r1_s4"
#: Step cost relative to a std_B step at M, for arms not yet measured in the folder (see the module docstring).
COST_FACTOR = {"std_B": 1.0, "std_k": 0.42, "random_subset": 0.43, R4_ARM: 0.55, JAX_ARM: 0.60}
#: Seconds a JAX-arm child spends beside its timed steps and evaluations: start-up, corpus load, compilation.
JAX_START_S = 120.0
#: Default folder of the per-chunk reference table round 4 reads (round 3's S2 reference).
DEFAULT_REF_DIR = pycode.REPO / "benchmarks" / "quality" / "results" / "round3" / "ref"


# ------------------------------------------------------------------------------------------- reference
def round4_chunk_ids(scale: study.Scale, n_train: int) -> np.ndarray:
    """The train chunk ids the plan reads, sorted: each seed's first max(B·N, k·2N) permutation entries (its B-arms
    and std_k's 2N budget; ``CandidateStream`` takes prefixes of one permutation)."""
    reads = min(n_train, max(scale.batch * scale.steps, scale.keep * scale.steps * 2))
    return np.unique(np.concatenate([np.random.default_rng(x).permutation(n_train)[:reads]
                                     for x in scale.seeds])).astype(np.int64)


def load_reference(st: study.Study) -> dict:
    """Load round 3's per-chunk reference table into ``st.ref_train`` (no noise tables: round 4 has no noise arm)
    and return what every run records about it (``st.round4_reference``). ``ValueError`` when the table is
    missing, shorter than the train split, or NaN (not covered) at a chunk the plan reads."""
    d = Path(getattr(st.args, "ref_dir", None) or DEFAULT_REF_DIR)
    f_table, f_meta = d / "refnll_train.npy", d / "ref.json"
    for f in (f_table, f_meta):
        if not f.is_file():
            raise ValueError(f"--ref-dir: expected round 3's reference table {f.name} in {d} (the committed "
                             f"results/round3/ref/); it is missing")
    table = np.load(f_table)
    n_train = st.corpus["train"].shape[0]
    if table.ndim != 1 or table.shape[0] < n_train:
        raise ValueError(f"--ref-dir: {f_table} has shape {table.shape}, expected one value per train chunk "
                         f"(>= {n_train})")
    need = round4_chunk_ids(st.scale, n_train)
    bad = need[~np.isfinite(table[need])]
    if bad.size:
        raise ValueError(f"--ref-dir: {bad.size} of the {need.size} train chunks that seeds "
                         f"{list(st.scale.seeds)} read at B={st.scale.batch}, N={st.scale.steps} have no reference "
                         f"NLL (NaN) in {f_table}, e.g. {bad[:8].tolist()}: round 3's table covers seeds 0-2 at "
                         f"N <= 600; extend it before running these seeds/steps")
    st.ref_train = table.astype(np.float32)
    st.ref_noise = {}
    meta = json.loads(f_meta.read_text())
    info = {"source": "round3 per-chunk table", "path": str(f_table.relative_to(pycode.REPO))
            if f_table.resolve().is_relative_to(pycode.REPO) else str(f_table),
            "sha256": hashlib.sha256(f_table.read_bytes()).hexdigest(),
            "reference_scale": (meta.get("arch") or {}).get("name"),
            "reference_val_loss": (meta.get("final") or {}).get("val_loss"),
            "reference_commit": meta.get("commit"), "chunks_read": int(need.size)}
    st.round4_reference = info
    st.log(f"round 4 reference: {info['path']} (scale {info['reference_scale']}, val "
           f"{info['reference_val_loss']}); all {need.size} chunks the plan reads are covered")
    return info


# ------------------------------------------------------------------------------------------- `test`
def is_sweep(spec: study.RunSpec, scale: study.Scale) -> bool:
    """Round 4's sweep runs: seed 0's untagged N-step std_B/std_k runs (the tuned one of each is seed 0's arm)."""
    return spec.arm in ("std_B", "std_k") and spec.seed == 0 and not spec.tag and not spec.noise and \
        spec.steps == scale.steps


def sweep_dir(st: study.Study) -> Path:
    """Where the sweep runs' final weights wait for the sweep's decision (git-ignored, outside the results)."""
    if getattr(st.args, "ref_store", None):
        return Path(st.args.ref_store) / "sweep"
    return pycode.REPO / ".refstore" / "round4" / st.scale.name / "sweep"


def after_run(st: study.Study, spec: study.RunSpec, model, res: dict) -> None:
    """``Study.after_run`` of round 4: a sweep run keeps its final weights (no `test` read while rates are
    compared); every other run records the `test` loss and the reference table it read."""
    import torch

    res["reference"] = st.round4_reference
    if is_sweep(spec, st.scale):
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        st.__dict__.setdefault("_r4_sweep_states", {})[spec.key()] = state
        d = sweep_dir(st)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(state, d / f"{spec.key()}.pt")
        return
    res["final"].update(st.evaluator.test_loss(model))


def attach_sweep_test(st: study.Study, arm: str, lr: float) -> bool:
    """Give the tuned sweep run of ``arm`` its `test` loss from its kept weights (memory, else ``sweep_dir``).
    Returns False when the weights are gone (the caller retrains that run under the tag ``test``)."""
    import torch

    s = st.scale
    spec = study.RunSpec(arm, 0, lr, s.steps)
    path = st.out / "runs" / f"{spec.key()}.json"
    res = json.loads(path.read_text())
    if "test_loss" in res["final"]:
        return True
    state = st.__dict__.get("_r4_sweep_states", {}).get(spec.key())
    f = sweep_dir(st) / f"{spec.key()}.pt"
    if state is None and f.is_file():
        state = torch.load(f, map_location="cpu")
    if state is None:
        return False
    model = study.build_model(s, st.V, 0, st.ctx.device)
    model.load_state_dict(state)
    model.eval()
    res["final"].update(st.evaluator.test_loss(model))
    res["final"]["test_source"] = "sweep checkpoint"
    path.write_text(json.dumps(res, indent=1))
    st.log(f"test of the tuned sweep run {spec.key()}: {res['final']['test_loss']:.4f}")
    del model
    kept = st.__dict__.get("_r4_sweep_states", {})
    for key in [k for k in kept if k.startswith(f"{arm}__")]:   # the sweep of this arm is decided: its weights go
        del kept[key]
    for g in sweep_dir(st).glob(f"{arm}__*.pt"):
        g.unlink()
    st.export()
    return True


# ------------------------------------------------------------------------------------------- units
def round4_units(scale: study.Scale, lr_B: float, lr_k: float) -> list:
    """Round 4's units after the sweeps, in order: per seed the paired sequence arms, then std_k's budgets N/2 and
    2N; last the JAX arm (seed 0)."""
    N = scale.steps
    units = []
    for seed in scale.seeds:
        units.append((f"seed {seed}: sequence arms",
                      [study.RunSpec("std_B", seed, lr_B, N), study.RunSpec("std_k", seed, lr_k, N),
                       study.RunSpec("random_subset", seed, lr_k, N), study.RunSpec(R4_ARM, seed, lr_k, N)]))
        units.append((f"seed {seed}: std_k budgets N/2, 2N",
                      [study.RunSpec("std_k", seed, lr_k, steps, tag="budget") for steps in (N // 2, 2 * N)]))
    units.append((f"seed {scale.seeds[0]}: JAX arm", [study.RunSpec(JAX_ARM, scale.seeds[0], lr_k, N)]))
    return units


def jax_estimate_s(st: study.Study, spec: study.RunSpec) -> float:
    return st.estimate_s(spec) + JAX_START_S


def run_jax_unit(st: study.Study, spec: study.RunSpec, what: str) -> bool:
    """The JAX arm in a child process (``python -m benchmarks.quality.jax_arm``), under the unit rule."""
    path = st.out / "runs" / f"{spec.key()}.json"
    if path.exists() and not st.args.no_resume:
        st.log(f"skip {spec.key()} (done)")
        return True
    if st.stopped:
        return False
    est = jax_estimate_s(st, spec)
    if st.args.dry_run:
        st.dry_total += est
        st.log(f"unit {what}: 1 run (~{est:.0f} s)")
        st.log(f"would run {spec.key()} in a child process (~{est:.0f} s; {st.dry_total:.0f} s so far)")
        return True
    if not st.fits(est):
        st.log(f"deadline: not starting the unit {what} (~{est:.0f} s); the plan stops here")
        st.stopped = True
        return False
    a = st.args
    rest = ["--scale", st.scale.name, "--round", "round4", "--out", str(Path(a.out).resolve()),
            "--data-dir", str(Path(st.corpus.data_dir).resolve()), "--steps", str(st.scale.steps),
            "--seeds", ",".join(str(x) for x in st.scale.seeds), "--device", "cpu", "--no-progress"]
    if getattr(a, "ref_dir", None):
        rest += ["--ref-dir", str(Path(a.ref_dir).resolve())]
    if a.no_verify:
        rest.append("--no-verify")
    if a.protocol_commit:
        rest += ["--protocol-commit", a.protocol_commit]
    if a.no_resume:
        rest.append("--no-resume")
    cmd = [sys.executable, "-m", "benchmarks.quality.jax_arm", "--arm-seed", str(spec.seed), "--lr", repr(spec.lr),
           "--run-steps", str(spec.steps), "--device-name", st.device_name, "--", *rest]
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"   # never take 75 % of the GPU up front
    env["PYTHONPATH"] = str(pycode.REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if st.commit:
        env["CGGR_COMMIT"] = st.commit
    if st.ctx.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()   # the PyTorch runs' cached blocks go back before JAX allocates
    st.log(f"unit {what}: starting {spec.key()} in a child process (~{est:.0f} s)")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=str(pycode.REPO))
    if proc.returncode != 0 or not path.exists():
        st.export()
        raise RuntimeError(f"the JAX arm's process failed (exit {proc.returncode}, {time.time() - t0:.0f} s); "
                           f"its output is above; command: {' '.join(cmd)}")
    r = json.loads(path.read_text())
    ms = r["accounting"]["ms_per_step"]
    st.measured_ms[spec.arm] = max(ms, st.measured_ms.get(spec.arm, ms))
    st.log(f"JAX arm done in {time.time() - t0:.0f} s")
    st.export()
    return True


# ------------------------------------------------------------------------------------------- the plan
def plan_round4(st: study.Study) -> None:
    """PROTOCOL.md "Round 4 (M)" (module docstring): sweeps (rule 1), per seed the paired arms and std_k's
    budgets, then the JAX arm; `test` read at every run's end except the sweep's, the tuned sweep runs' once the
    sweep is decided."""
    s = st.scale
    st.stop_at_miss = True
    st.cost_factor.update(COST_FACTOR)
    load_reference(st)
    st.after_run = lambda spec, model, res: after_run(st, spec, model, res)
    # Each arm's sweep is decided (grid, then rule 1's point) before the next starts, so that its tuned run gets
    # its `test` number from weights still in memory or on this machine's disk.
    tuned = {}
    for arm, grid in (("std_B", s.lr_grid_B), ("std_k", s.lr_grid_k)):
        for lr in grid:
            st.run(study.RunSpec(arm, 0, lr, s.steps))
        ext = study.edge_extension(st.sweep_results(arm), grid)
        if ext is not None:
            st.log(f"rule 1: {arm}'s argmin is at an edge of {grid}; adding lr {ext:g}")
            st.run(study.RunSpec(arm, 0, ext, s.steps))
        if st.stopped:
            return
        lr = st.best_lr(arm)
        if lr is None:
            if not st.args.dry_run:
                st.log(f"{arm}'s sweep is incomplete: stopping the plan here")
                return
            lr = grid[len(grid) // 2]
            st.log(f"(dry run: {arm}'s sweep is not done; listing its runs at the placeholder rate {lr:g})")
        else:
            res = st.sweep_results(arm)
            if lr in (min(res), max(res)) and len(res) > 1:
                st.log(f"rule 1: {arm}'s tuned lr {lr:g} is still at an edge of {sorted(res)}: a claim against it "
                       f"needs the grid extended again")
            if not st.args.dry_run and not attach_sweep_test(st, arm, lr):
                st.log(f"the tuned sweep run of {arm} (lr {lr:g}) has no kept weights (a fresh machine): it is "
                       f"trained again under the tag 'test' for seed 0's `test` number")
                if not st.run_unit([study.RunSpec(arm, 0, lr, s.steps, tag="test")], f"seed 0: {arm} test retrain"):
                    return
        tuned[arm] = lr
    lr_B, lr_k = tuned["std_B"], tuned["std_k"]
    st.log(f"tuned LR: std_B {lr_B}, std_k {lr_k}")
    for what, specs in round4_units(s, lr_B, lr_k):
        if specs[0].arm == JAX_ARM:
            if not run_jax_unit(st, specs[0], what):
                return
        elif not st.run_unit(specs, what):
            return


def round4_schedule(scale: study.Scale, ms_B: float, deadline_s: float) -> list:
    """The estimated device calls of the whole round-4 plan from scratch at ``ms_B`` ms per std_B step, packed in
    plan order as ``--deadline-s`` packs them (a task that does not fit starts the next call, which pays the start
    again: imports and corpus load). A list of calls, each a list of (task, seconds)."""
    overhead = study.run_overhead_s(scale, ms_B)
    n_test = 1167 if not scale.val_chunks else scale.val_chunks
    test_s = math.ceil(n_test / scale.eval_batch) * ms_B / 3 * scale.eval_batch / scale.batch / 1000

    def run_s(sp: study.RunSpec) -> float:
        return sp.steps * ms_B * COST_FACTOR[sp.arm] / 1000 + overhead + test_s

    tasks = []
    for arm, grid in (("std_B", scale.lr_grid_B), ("std_k", scale.lr_grid_k)):
        tasks += [(f"sweep {arm} lr {lr:g}", run_s(study.RunSpec(arm, 0, lr, scale.steps))) for lr in grid]
        if arm == "std_k":   # one extra point is budgeted (at std_k's cost): S and S2 each needed one
            tasks.append(("rule 1: a possible extra sweep point (std_k cost)",
                          run_s(study.RunSpec("std_k", 0, 1, scale.steps))))
        tasks.append((f"test of the tuned {arm} sweep run (from its kept weights)", test_s + 3.0))
    for what, specs in round4_units(scale, 1.0, 1.0):
        if scale.seeds and what.startswith(f"seed {scale.seeds[0]}:"):   # seed 0's std_B/std_k are sweep runs
            specs = [sp for sp in specs if sp.tag or sp.arm not in ("std_B", "std_k")]
        extra = JAX_START_S if any(sp.arm == JAX_ARM for sp in specs) else 0.0
        tasks.append((f"{what} ({len(specs)} runs)", sum(run_s(sp) for sp in specs) + extra))
    start = 30.0    # a fresh call: imports, corpus load and checks
    calls, cur, t = [], [("start: corpus load", start)], start
    for name, sec in tasks:
        if len(cur) > 1 and t + sec > deadline_s:
            calls.append(cur)
            cur, t = [("start: corpus load", start)], start
        cur.append((name, sec))
        t += sec
    if len(cur) > 1:
        calls.append(cur)
    return calls
