"""Summaries of a quality-study v2 results folder (PROTOCOL.md §5): sweep, paired deltas with t-intervals,
effective data multiplier m, time-to-target, selection logs, gate tables, and the learning-curve plots.

    python -m benchmarks.quality.analyze benchmarks/quality/results/round1     # writes summary.md/.json + PNGs

Reads only the run JSONs (``runs/*.json``), ``gate*.json`` and ``ref/ref.json``; re-running is idempotent. Where the
chunk-source tables of ``benchmarks.quality.sources`` exist (``<folder>/../sources/``, or ``--sources DIR``), it
also reads the runs' ``*.ids.npy`` and adds a section "Chunk sources" (which packages the selecting arms prefer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.quality import pycode, sources

#: Two-sided 95 % Student t quantiles by degrees of freedom (beyond the table: the normal 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t95(dof: int) -> float:
    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    return _T95.get(dof, 1.96)


def load_runs(folder: Path) -> list:
    runs = []
    for p in sorted((folder / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("schema") != "cggr-quality-v2-run/1":
            raise ValueError(f"{p}: not a quality-v2 run JSON (schema {r.get('schema')!r})")
        runs.append(r)
    if not runs:
        raise ValueError(f"{folder}/runs holds no run JSON")
    return runs


def label(r: dict) -> str:
    return r["arm"] + ("+noise" if r["noise"] else "")


def paired(a: dict, b: dict, floor: float = 0.0) -> Optional[dict]:
    """Paired Δ = a - b over the seeds both have: mean, SE, 95 % t-CI and the PROTOCOL.md §6.2 verdict."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    out = {"n": len(seeds), "seeds": seeds, "per_seed": [float(x) for x in d], "mean": float(d.mean())}
    if len(seeds) < 2:
        out.update(se=None, ci=None, verdict="1 seed: no interval")
        return out
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    half = t95(len(d) - 1) * se
    out.update(se=se, ci=[out["mean"] - half, out["mean"] + half])
    if abs(out["mean"]) < max(floor, 2 * se):
        out["verdict"] = "no difference (|Δ| < max(δ0, 2 SE)): add seeds"
    elif out["ci"][1] < 0:
        out["verdict"] = "lower (better)"
    elif out["ci"][0] > 0:
        out["verdict"] = "higher (worse)"
    else:
        out["verdict"] = "CI spans 0"
    return out


def invert_curve(points: list, loss: float) -> tuple:
    """Trained tokens D at which the piecewise-linear (log D, L) curve through ``points`` [(D, L)] reaches ``loss``;
    linear extrapolation in log D beyond the ends. Returns (D, extrapolated?)."""
    pts = sorted(points)
    if len(pts) < 2:
        raise ValueError("need >= 2 budgets to invert a learning curve")
    x = np.log([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    for i in range(len(pts) - 1):
        lo, hi = sorted((y[i], y[i + 1]))
        if lo <= loss <= hi and y[i] != y[i + 1]:
            return float(math.exp(x[i] + (loss - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))), False
    i = 0 if loss > y[0] else len(pts) - 2           # beyond the cheap end, or beyond the expensive end
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    if slope == 0:
        return float("nan"), True
    return float(math.exp(x[i] + (loss - y[i]) / slope)), True


def time_to_target(curve: list, target: float) -> Optional[float]:
    """Wall-clock at which the val curve first reaches ``target`` (linear between evaluations), else None."""
    prev = None
    for c in curve:
        if c["val_loss"] <= target:
            if prev is None or prev["val_loss"] == c["val_loss"]:
                return c["wall_s"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - c["val_loss"])
            return prev["wall_s"] + f * (c["wall_s"] - prev["wall_s"])
        prev = c
    return None


def time_ratio(B: int, k: int, t_arm: float, t_B: float, m: float) -> float:
    """PROTOCOL.md "Round 3": R = (B/k)·t_arm/(m·t_B), the wall-clock an arm with data multiplier ``m`` and step
    cost ``t_arm`` needs to reach std_B's final loss, relative to std_B's (N·(B/k)/m steps of t_arm against N of
    t_B). R < 1: the arm gets there sooner; the goal (§6.6) is R ≤ 0.7. ``ValueError`` on non-positive inputs."""
    for name, v in (("B", B), ("k", k), ("t_arm", t_arm), ("t_B", t_B), ("m", m)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    return (B / k) * t_arm / (m * t_B)


def summarize(folder: Path, sources_dir: Optional[Path] = None) -> dict:
    """The summary of a results folder; ``sources_dir`` (default ``<folder>/../sources``): the chunk-source tables,
    used where they exist (key ``chunk_sources``)."""
    runs = load_runs(folder)
    N = max(r["scale"]["steps"] for r in runs)
    main = [r for r in runs if not r["tag"] and r["accounting"]["optimizer_steps"] == N]
    # The tuned LR of an arm family = the LR its seed-1.. runs use (the sweep is seed 0 only).
    sweep = defaultdict(dict)
    for r in main:
        if r["arm"] in ("std_B", "std_k") and r["seed"] == 0:
            sweep[r["arm"]][r["lr"]] = {"val": r["final"]["val_loss"], "ms_per_step": r["accounting"]["ms_per_step"]}
    tuned = {a: min(v, key=lambda lr: v[lr]["val"]) for a, v in sweep.items()}
    arms = defaultdict(dict)   # label -> seed -> run (tuned LR only for the swept arms)
    for r in main:
        if r["arm"] in tuned and r["lr"] != tuned[r["arm"]]:
            continue
        arms[label(r)][r["seed"]] = r
    repeat = [r for r in runs if r["tag"] == "repeat"]
    floor = 0.0
    if repeat and repeat[0]["seed"] in arms.get(repeat[0]["arm"], {}):
        floor = abs(repeat[0]["final"]["val_loss"] - arms[repeat[0]["arm"]][repeat[0]["seed"]]["final"]["val_loss"])
    val = {lab: {s: r["final"]["val_loss"] for s, r in d.items()} for lab, d in arms.items()}
    table = {}
    for lab, d in sorted(arms.items()):
        rs = [d[s] for s in sorted(d)]
        v = np.array([r["final"]["val_loss"] for r in rs])
        table[lab] = {
            "seeds": sorted(d), "val_per_seed": [float(x) for x in v], "val_mean": float(v.mean()),
            "val_sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "lr": rs[0]["lr"], "trained_tokens": rs[0]["accounting"]["trained_tokens"],
            "candidate_tokens": rs[0]["accounting"]["candidate_tokens"],
            "steps": rs[0]["accounting"]["optimizer_steps"],
            "train_wall_s": float(np.mean([r["accounting"]["train_wall_s"] for r in rs])),
            "ms_per_step": float(np.mean([r["accounting"]["ms_per_step"] for r in rs])),
            "noise_share_trained": float(np.mean([r["selection"]["noise_share_trained"] for r in rs])),
            # None for the JAX arm (round 4: its jitted step returns no kept ids)
            "ref_nll_trained": _mean_or_none([r["selection"]["ref_nll_trained_mean"] for r in rs]),
            "ref_nll_candidates": float(np.mean([r["selection"]["ref_nll_candidates_mean"] for r in rs])),
            "full_nll_trained": _mean_or_none([r["selection"]["full_nll_trained_mean"] for r in rs]),
            "full_nll_candidates": _mean_or_none([r["selection"]["full_nll_candidates_mean"] for r in rs]),
            "ood": {k: _mean_or_none([r["final"]["ood"].get(k) for r in rs]) for k in rs[0]["final"]["ood"]},
            "by_freq": {k: _mean_or_none([r["final"]["val_loss_by_freq_bucket"][k] for r in rs])
                        for k in rs[0]["final"]["val_loss_by_freq_bucket"]},
        }
    # Round 4: the `test` loss of each (arm, seed); seed 0's tuned std_B/std_k are sweep runs whose `test` number
    # was attached after the sweep, or comes from their retrain under the tag "test" (round4.py).
    test = {}
    for lab, d in arms.items():
        for sd, r in d.items():
            t = r["final"].get("test_loss")
            if t is None:
                t = next((x["final"].get("test_loss") for x in runs if x["tag"] == "test" and label(x) == lab
                          and x["seed"] == sd and x["lr"] == r["lr"]
                          and x["accounting"]["optimizer_steps"] == N), None)
            if t is not None:
                test.setdefault(lab, {})[sd] = t
    for lab, d in test.items():
        v = np.array([d[sd] for sd in sorted(d)])
        table[lab].update(test_seeds=sorted(d), test_per_seed=[float(x) for x in v], test_mean=float(v.mean()))
    comparisons = {}
    for lab in table:
        if lab.endswith("_jax"):   # round 4's JAX arm starts from other weights: compared with a seed band below
            continue
        base = "random_subset+noise" if lab.endswith("+noise") else "random_subset"
        comps = (base, "std_k") + (("oracle_excess",) if lab.startswith("router_excess") and "+noise" not in lab else ())
        if lab.endswith("_token") or lab.endswith("_token_sampled"):   # token arms: against random tokens
            comps += ("random_token",)
        if lab.startswith("cggr_excess_r") and "_s" not in lab:        # the library path vs the harness's
            comps += ("router_excess_r" + lab.rsplit("_r", 1)[1],)
        if lab.startswith("cggr_excess_r1_s"):                          # round 3: the cheap router vs all positions
            comps += ("cggr_excess_r4",)
        for comp in comps:
            if lab != comp and comp in val and (comp != "std_k" or not lab.endswith("+noise")):
                comparisons[f"{lab} - {comp}"] = paired(val[lab], val[comp], floor)
    # m: per seed, against that seed's std_k budget curve (N/2, N, 2N where run).
    budget_runs = [r for r in runs if r["arm"] == "std_k" and not r["noise"] and r["lr"] == tuned.get("std_k")
                   and r["tag"] in ("", "budget")]
    budgets = defaultdict(list)
    for r in budget_runs:
        budgets[r["seed"]].append((r["accounting"]["trained_tokens"], r["final"]["val_loss"]))
    m = data_multipliers(table, arms, budgets, {lab: val[lab] for lab in arms})
    # Round 4: the same m read on `test` (the budgets' and the arms' test losses), where every budget has one.
    test_budgets = defaultdict(list)
    for r in budget_runs:
        if r["final"].get("test_loss") is not None:
            test_budgets[r["seed"]].append((r["accounting"]["trained_tokens"], r["final"]["test_loss"]))
    m_test = data_multipliers(table, arms, test_budgets, test) if test else {}
    ttt = {}
    if "std_B" in arms:
        for lab, d in arms.items():
            ttt[lab] = {}
            for s, r in d.items():
                if s in arms["std_B"]:
                    tgt = arms["std_B"][s]["final"]["val_loss"]
                    ttt[lab][s] = {"target": tgt, "time_s": time_to_target(r["curve"], tgt),
                                   "std_B_wall_s": arms["std_B"][s]["accounting"]["train_wall_s"]}
    # R (round 3): per seed, from the arm's own m and ms/step and std_B's ms/step of the same seed; std_k has m = 1
    # by construction (its own curve). Arms at batch B (std_B itself) are not k-row arms: no R.
    ratio = {}
    if "std_B" in arms:
        for lab, d in table.items():
            if lab.startswith("std_B") or lab.endswith("+noise"):
                continue
            per = {}
            for sd in d["seeds"]:
                r = arms[lab][sd]
                mm = 1.0 if lab == "std_k" else m.get(lab, {}).get("per_seed", {}).get(sd, {}).get("m")
                if sd not in arms["std_B"] or mm is None or not (mm > 0):
                    continue
                sc = r["scale"]
                t_arm, t_B = r["accounting"]["ms_per_step"], arms["std_B"][sd]["accounting"]["ms_per_step"]
                per[sd] = {"R": time_ratio(sc["batch"], sc["keep"], t_arm, t_B, mm), "m": mm, "t_arm_ms": t_arm,
                           "t_B_ms": t_B, "B_over_k": sc["batch"] / sc["keep"],
                           "time_to_target_s": ttt.get(lab, {}).get(sd, {}).get("time_s"),
                           "std_B_wall_s": arms["std_B"][sd]["accounting"]["train_wall_s"]}
            if per:
                xs = np.array([p["R"] for p in per.values()])
                entry = {"per_seed": per, "mean": float(xs.mean()), "n": len(xs),
                         "m_mean": float(np.mean([p["m"] for p in per.values()])),
                         "t_arm_over_t_B": float(np.mean([p["t_arm_ms"] / p["t_B_ms"] for p in per.values()]))}
                if len(xs) > 1:
                    half = t95(len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
                    entry["ci"] = [float(xs.mean() - half), float(xs.mean() + half)]
                ratio[lab] = entry
    paired_test = {}
    for key in comparisons:
        lab, comp = key.split(" - ")
        if lab in test and comp in test:
            pt = paired(test[lab], test[comp], floor)
            if pt is not None:
                pv = paired({sd: val[lab][sd] for sd in pt["seeds"]}, {sd: val[comp][sd] for sd in pt["seeds"]},
                            floor)
                pt["val_mean_same_seeds"] = pv["mean"]
                pt["val_verdict_same_seeds"] = pv["verdict"]
                pt["test_minus_val"] = pt["mean"] - pv["mean"]
                # PROTOCOL.md round 4, P30: the sign holds where val says better/worse, and |Δtest − Δval| ≤ 0.02
                decided = pv["verdict"] in ("lower (better)", "higher (worse)")
                pt["p30"] = (abs(pt["test_minus_val"]) <= 0.02 and
                             (not decided or np.sign(pt["mean"]) == np.sign(pv["mean"])))
                paired_test[key] = pt
    # Out-of-domain sets (§8): the same pairs, on each OOD set's final loss.
    paired_ood = {}
    for key in comparisons:
        lab, comp = key.split(" - ")
        for name in table[lab]["ood"]:
            a = {sd: r["final"]["ood"].get(name) for sd, r in arms[lab].items()}
            b = {sd: r["final"]["ood"].get(name) for sd, r in arms[comp].items()}
            pt = paired({sd: x for sd, x in a.items() if x is not None},
                        {sd: x for sd, x in b.items() if x is not None}, floor)
            if pt is not None:
                paired_ood.setdefault(name, {})[key] = pt
    jax_arms = {}
    for lab in table:
        if lab.endswith("_jax") and lab[:-4] in arms:
            jax_arms[lab] = jax_band(arms[lab], arms[lab[:-4]], lab[:-4])
    sources_dir = Path(folder).parent / "sources" if sources_dir is None else Path(sources_dir)
    csrc = chunk_source_shares(folder, arms, sources_dir) if (sources_dir / "packages.json").is_file() else None
    gates = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("gate*.json"))}
    ref = json.loads((folder / "ref" / "ref.json").read_text()) if (folder / "ref" / "ref.json").exists() else None
    return {"N": N, "sweep": {a: {str(k): v for k, v in d.items()} for a, d in sweep.items()}, "tuned_lr": tuned,
            "floor_delta0": floor, "repeat": [r["key"] for r in repeat], "arms": table, "paired": comparisons,
            "m": m, "time_to_target": ttt, "time_ratio": ratio, "gates": gates, "reference": ref,
            "budget_runs": {str(s): sorted(v) for s, v in budgets.items()},
            # round 4 only (earlier rounds' summaries stay as they were)
            **({"paired_test": paired_test} if paired_test else {}), **({"jax": jax_arms} if jax_arms else {}),
            **({"m_test": m_test, "test_budget_runs": {str(s): sorted(v) for s, v in test_budgets.items()}}
               if m_test else {}), "paired_ood": paired_ood, **({"chunk_sources": csrc} if csrc else {})}


def data_multipliers(table: dict, arms: dict, budgets: dict, loss: dict) -> dict:
    """Effective data multiplier m per arm (PROTOCOL.md §5): per seed, the trained tokens at which that seed's
    ``std_k`` budget curve ``budgets[seed]`` [(D, L)] reaches the arm's loss ``loss[label][seed]``, over the arm's own
    trained tokens; mean and 95 % t-interval over the seeds. ``std_*`` and noise arms are skipped."""
    m = {}
    for lab, d in table.items():
        if lab.startswith("std_") or lab.endswith("+noise"):
            continue
        per = {}
        for s in d["seeds"]:
            if len(budgets.get(s, [])) >= 2 and s in loss.get(lab, {}):
                D, ext = invert_curve(budgets[s], loss[lab][s])
                per[s] = {"m": D / arms[lab][s]["accounting"]["trained_tokens"], "extrapolated": ext,
                          "budgets": sorted(budgets[s])}
        if per:
            xs = np.array([p["m"] for p in per.values()])
            entry = {"per_seed": per, "mean": float(xs.mean()), "n": len(xs)}
            if len(xs) > 1:
                half = t95(len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
                entry["ci"] = [float(xs.mean() - half), float(xs.mean() + half)]
            m[lab] = entry
    return m


def jax_band(jax_runs: dict, torch_runs: dict, torch_label: str) -> dict:
    """PROTOCOL.md round 4, item 4 and P29: the JAX arm (its own initialisation) against the PyTorch arm's seed
    band: final val within max(0.05, 3·sd) of the PyTorch seeds' mean, and at every evaluation after the first two
    its val-subset loss within [min − 0.05, max + 0.05] of the PyTorch seeds' at the same step."""
    tv = np.array([r["final"]["val_loss"] for r in torch_runs.values()])
    sd = float(tv.std(ddof=1)) if len(tv) > 1 else None
    tol = max(0.05, 3 * sd) if sd is not None else 0.05
    out = {"torch_arm": torch_label, "torch_seeds": sorted(torch_runs), "torch_val_mean": float(tv.mean()),
           "torch_val_sd": sd, "torch_val_min": float(tv.min()), "torch_val_max": float(tv.max()),
           "tolerance": tol, "runs": {}}
    tt = [r["final"].get("test_loss") for r in torch_runs.values()]
    if all(t is not None for t in tt):
        out.update(torch_test_mean=float(np.mean(tt)), torch_test_min=float(np.min(tt)),
                   torch_test_max=float(np.max(tt)))
    for seed, r in sorted(jax_runs.items()):
        v = r["final"]["val_loss"]
        curve_ok, worst = True, 0.0
        checked = 0
        for j, c in enumerate(r["curve"]):
            if j < 2:
                continue
            band = [tc["val_loss"] for t in torch_runs.values() for tc in t["curve"] if tc["step"] == c["step"]]
            if len(band) < len(torch_runs):
                continue
            lo, hi = min(band) - 0.05, max(band) + 0.05
            checked += 1
            worst = max(worst, lo - c["val_loss"], c["val_loss"] - hi)
            curve_ok &= lo <= c["val_loss"] <= hi
        final_ok = abs(v - out["torch_val_mean"]) <= tol
        out["runs"][seed] = {"val": v, "test": r["final"].get("test_loss"), "val_minus_torch_mean": v - out[
            "torch_val_mean"], "final_within": final_ok, "curve_points_checked": checked,
            "curve_within": bool(curve_ok) if checked else None, "curve_worst_excess": worst,
            "ms_per_step": r["accounting"]["ms_per_step"], "first_step_s": r["accounting"].get("first_step_s"),
            "p29": (final_ok and bool(curve_ok)) if checked else None}   # None: no evaluation after the first two
    return out


#: How many over- and under-selected packages the "Chunk sources" section names per arm.
N_EXTREMES = 3


def candidate_ids(run: dict, n_train: int) -> np.ndarray:
    """The clean (non-noise) candidate chunk ids a run saw, in stream order: the harness's own
    ``pycode.CandidateStream`` of the run's seed, batch, steps and noise, over a stand-in of the train split's shape
    (only the ids are read; no corpus needed)."""
    sc = run["scale"]
    B = sc["keep"] if run["arm"] == "std_k" else sc["batch"]
    T, steps = sc["seq_len"], run["accounting"]["optimizer_steps"]
    frac = sc["noise_frac"] if run["noise"] else 0.0
    n_noise = int(round(frac * B))
    zero = np.zeros(1, np.uint16)
    stream = pycode.CandidateStream(np.broadcast_to(zero, (n_train, T + 1)), run["seed"], B, steps, T,
                                    noise_frac=frac,
                                    noise=np.broadcast_to(zero, (n_noise * steps, T + 1)) if n_noise else None)
    ids = np.concatenate([stream.batch(i)[0] for i in range(steps)])
    return ids[ids >= 0]


def chunk_source_shares(folder: Path, arms: dict, sources_dir: Path) -> dict:
    """The "Chunk sources" section (issue 15): per arm, the package shares of its trained chunks (the saved
    ``runs/<key>.ids.npy``; noise chunks left out; each chunk counted for its majority package, as tabled by
    ``benchmarks.quality.sources``), per seed and then averaged over seeds, against the same seeds' candidate chunks
    (``candidate_ids``; where a run's ids are not all among them, against ``random_subset``'s trained chunks); the
    largest over/under-selections with z = Δ / the SE of a uniformly random choice of as many chunks from the same
    candidates; each split's exposure Σ_p token share(p) · trained(p)/baseline(p); and the token shares of every
    split (``packages.json``)."""
    meta = sources.load_sources(sources_dir)
    pk = meta["packages"]
    P = len(pk)
    if "train" not in meta["splits"]:
        raise ValueError(f"{sources_dir}: no train table (rerun benchmarks.quality.sources with the train split)")
    maj = meta["splits"]["train"]["arrays"]["majority_package"].astype(np.int64)
    n_table = len(maj)

    def shares(ids: np.ndarray) -> np.ndarray:
        return np.bincount(maj[ids], minlength=P) / max(1, len(ids))

    cands, per_arm, not_listed = {}, {}, {}
    for lab in sorted(arms):
        per = {}
        for sd, r in sorted(arms[lab].items()):
            n_train = r["scale"].get("train_chunks") or n_table
            if n_train > n_table:
                raise ValueError(f"{r['key']}: its train split has {n_train} chunks, {sources_dir} tables {n_table}")
            if r["accounting"].get("level") == "token":
                not_listed[lab] = "token-level arm: trains on every candidate chunk"
                break
            f = folder / "runs" / f"{r['key']}.ids.npy"
            if not f.is_file():
                not_listed[lab] = ("trains on every candidate chunk (no ids saved)" if r["arm"] in ("std_B", "std_k")
                                   else "no ids.npy saved")
                break
            ids = np.load(f).astype(np.int64)
            clean = ids[ids >= 0]
            if clean.size and clean.max() >= n_train:
                raise ValueError(f"{f}: chunk id {clean.max()} beyond the {n_train} train chunks: "
                                 f"the run used another corpus than {sources_dir}")
            ck = (r["seed"], r["arm"] == "std_k", r["noise"], r["accounting"]["optimizer_steps"], n_train)
            if ck not in cands:
                cands[ck] = candidate_ids(r, n_train)
            cand = cands[ck]
            ok = bool(np.isin(clean, cand).all())
            per[sd] = {"trained": shares(clean), "n": int(len(clean)), "n_candidates": int(len(cand)),
                       "candidates": shares(cand) if ok else None}
        else:
            if per:
                per_arm[lab] = per
    # the candidates of the plain (noise-free, batch-B) streams of every seed seen: the composition column
    plain = [shares(c) for (sd, k_stream, noise, _, _), c in sorted(cands.items()) if not k_stream and not noise]
    # relative to the results folder, so that the summary does not depend on where analyze was started from
    out = {"packages": pk, "sources_dir": os.path.relpath(sources_dir, folder), "attribution": "majority_package",
           "single_package_train_chunks": meta["splits"]["train"]["single_package_chunks"] / max(1, n_table),
           "token_share": {sp: {p: d["per_package"][p]["token_share"] for p in pk}
                           for sp, d in meta["splits"].items()},
           "candidates_share": dict(zip(pk, map(float, np.mean(plain, 0)))) if plain else None,
           "arms": {}, "not_listed": not_listed}
    for lab, per in per_arm.items():
        seeds = sorted(per)
        tr = np.mean([per[sd]["trained"] for sd in seeds], 0)
        n = float(np.mean([per[sd]["n"] for sd in seeds]))
        if all(per[sd]["candidates"] is not None for sd in seeds):
            base_name = "candidates"
            base = np.mean([per[sd]["candidates"] for sd in seeds], 0)
            f = n / float(np.mean([per[sd]["n_candidates"] for sd in seeds]))
            se = np.sqrt(base * (1 - base) * (1 - f) / (n * len(seeds)))
        else:
            base_name = "random_subset+noise" if lab.endswith("+noise") else "random_subset"
            if base_name not in per_arm or base_name == lab:
                not_listed[lab] = "candidates not recoverable and no random_subset to compare with"
                continue
            base = np.mean([per_arm[base_name][sd]["trained"] for sd in sorted(per_arm[base_name])], 0)
            se = np.full(P, np.nan)
        d = tr - base
        z = np.where(se > 0, d / np.where(se > 0, se, 1), np.nan)
        order = np.argsort(-d, kind="stable")
        over = [int(i) for i in order if d[i] > 0][:N_EXTREMES]
        under = [int(i) for i in order[::-1] if d[i] < 0][:N_EXTREMES]
        pos = [pk[i] for i in range(P) if d[i] > 0]
        entry = {"seeds": seeds, "trained_chunks_per_seed": n, "baseline": base_name,
                 "trained_share": dict(zip(pk, map(float, tr))), "baseline_share": dict(zip(pk, map(float, base))),
                 "ratio": {pk[i]: (float(tr[i] / base[i]) if base[i] > 0 else None) for i in range(P)},
                 "z": {pk[i]: (None if not np.isfinite(z[i]) else float(z[i])) for i in range(P)},
                 "tv_distance": float(0.5 * np.abs(d).sum()),
                 "over": [[pk[i], float(tr[i]), float(base[i]), None if not np.isfinite(z[i]) else float(z[i])]
                          for i in over],
                 "under": [[pk[i], float(tr[i]), float(base[i]), None if not np.isfinite(z[i]) else float(z[i])]
                           for i in under],
                 "over_selected_packages": pos,
                 "over_selected_token_share": {sp: float(sum(out["token_share"][sp][p] for p in pos))
                                               for sp in out["token_share"]},
                 # the rate at which the arm trained on a split's packages relative to its baseline: the split's
                 # token shares weighting the per-package ratios (1 = no tilt towards or away from that split)
                 "exposure": {sp: float(sum(out["token_share"][sp][pk[i]] * tr[i] / base[i]
                                            for i in range(P) if base[i] > 0)) for sp in out["token_share"]}}
        out["arms"][lab] = entry
    return out


def _chunk_source_lines(c: dict) -> list:
    def pct(x: Optional[float]) -> str:
        return "—" if x is None else f"{100 * x:.1f}"

    def ext(items: list) -> str:
        return ", ".join(f"{p} {100 * t:.1f} vs {100 * b:.1f}" + ("" if z is None else f" (z {z:+.1f})")
                         for p, t, b, z in items) or "—"

    ts = c["token_share"]
    L = ["\n## Chunk sources (which packages the trained chunks come from)\n",
         f"Tables of `{c['sources_dir']}` (relative to this folder; `python -m benchmarks.quality.sources`: every "
         "split's stream rebuilt file by "
         f"file and checked token for token against the stored arrays). A chunk counts for the package holding most "
         f"of its 1025 tokens ({100 * c['single_package_train_chunks']:.1f} % of train chunks lie in one package). "
         "Shares are of each run's trained clean chunks (`runs/*.ids.npy`, noise left out), averaged over seeds, "
         "against the same seeds' candidate chunks (or `random_subset`'s trained chunks where the candidates are not "
         "recoverable); z = Δ / SE of a uniformly random choice of as many chunks from the same candidates. Split "
         "compositions are token shares of the tokens the chunks cover.\n"]
    if c["arms"]:
        L.append("| arm | seeds | trained chunks / seed | baseline | TV distance (pp) | most over-selected (% vs "
                 "baseline %) | most under-selected | exposure val / test |")
        L.append("|---|---|---|---|---|---|---|---|")
        for lab, e in c["arms"].items():
            x = e["exposure"]
            L.append(f"| `{lab}` | {len(e['seeds'])} | {e['trained_chunks_per_seed']:.0f} | {e['baseline']} | "
                     f"{100 * e['tv_distance']:.1f} | {ext(e['over'])} | {ext(e['under'])} | "
                     f"{_f(x.get('val'), 3)} / {_f(x.get('test'), 3)} |")
        L.append("\nExposure of a split = Σ over packages of its token share × the arm's trained share / baseline "
                 "share: the rate, relative to the baseline, at which the arm trained on that split's packages.")
    if c["not_listed"]:
        L.append("")
    for lab, why in c["not_listed"].items():
        L.append(f"* `{lab}`: not listed; {why}.")
    arms = list(c["arms"])
    cand = c["candidates_share"] or {}
    splits = [sp for sp in ("train", "val", "test") if sp in ts]
    L.append("\nPackage shares in % (splits: tokens; candidates and arms: chunks; an arm's ratio to its baseline "
             "in brackets), packages by train share:\n")
    L.append("| package | " + " | ".join(f"{sp} tok" for sp in splits) +
             (" | val − test (pp)" if "val" in ts and "test" in ts else "") + " | candidates | " +
             " | ".join(f"`{a}`" for a in arms) + " |")
    L.append("|---" * (2 + len(splits) + ("val" in ts and "test" in ts) + len(arms)) + "|")
    order = sorted(c["packages"], key=lambda p: -ts.get("train", ts[splits[0]] if splits else {}).get(p, 0.0))
    for p in order:
        row = [p] + [pct(ts[sp][p]) for sp in splits]
        if "val" in ts and "test" in ts:
            row.append(f"{100 * (ts['val'][p] - ts['test'][p]):+.1f}")
        row.append(pct(cand.get(p)))
        for a in arms:
            r = c["arms"][a]["ratio"][p]
            row.append(f"{pct(c['arms'][a]['trained_share'][p])} ({'—' if r is None else f'×{r:.2f}'})")
        L.append("| " + " | ".join(row) + " |")
    return L


def _p29(v: Optional[bool]) -> str:
    return "n/a (no evaluation after the first two)" if v is None else "holds" if v else "fails"


def _mean_or_none(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _reached(t: Optional[float]) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def _f(x, nd=4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _m_lines(m: dict) -> list:
    out = []
    for lab, e in m.items():
        per = ", ".join(f"s{sd}: {p['m']:.2f}{' (extrapolated)' if p['extrapolated'] else ''}"
                        for sd, p in e["per_seed"].items())
        ci = f", 95 % CI [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]" if "ci" in e else " (one seed: no interval)"
        out.append(f"* `{lab}`: m = {e['mean']:.2f}{ci}; {per}")
    return out


def render(summary: dict) -> str:
    s = summary
    L = [f"# Quality study v2 summary (N = {s['N']} steps)\n"]
    if s["reference"]:
        r = s["reference"]
        es = (f" (early stopping: best val subset {r['best_val_subset']:.4f} at step {r['best_step']})"
              if "best_step" in r else "")
        L.append(f"Reference model: {r['steps']} steps on `ref` ({r['chunks']} chunks, {r['epochs']} epochs, lr "
                 f"{r['lr']}){es}, val {r['final']['val_loss']:.4f}; mean ref NLL of train chunks "
                 f"{r['refnll_train_mean']:.3f}, of noise chunks "
                 f"{np.mean(list(r['refnll_noise_mean'].values())):.3f}.\n")
    L.append("## LR sweeps (seed 0, final full-val loss)\n\n| arm | lr | val | ms/step |\n|---|---|---|---|")
    for a, d in s["sweep"].items():
        for lr, v in sorted(d.items(), key=lambda kv: float(kv[0])):
            star = " **(tuned)**" if float(lr) == s["tuned_lr"][a] else ""
            L.append(f"| {a} | {float(lr):g}{star} | {v['val']:.4f} | {v['ms_per_step']:.1f} |")
    L.append(f"\nNondeterminism floor δ0 (same seed twice: {', '.join(s['repeat']) or 'not run'}): "
             f"{s['floor_delta0']:.4f} nats.\n")
    L.append("## Arms at equal steps (final full-val loss, nats/token)\n")
    L.append("| arm | lr | seeds | val per seed | mean ± sd | trained tok | candidate tok | train s | ms/step | "
             "noise share | ref NLL trained / cand | full NLL trained / cand | WikiText-2 | Shakespeare |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lab, d in s["arms"].items():
        L.append(f"| `{lab}` | {d['lr']:g} | {len(d['seeds'])} | {', '.join(f'{x:.4f}' for x in d['val_per_seed'])} | "
                 f"{d['val_mean']:.4f} ± {_f(d['val_sd'])} | {d['trained_tokens'] / 1e6:.2f}M | "
                 f"{d['candidate_tokens'] / 1e6:.2f}M | {d['train_wall_s']:.1f} | {d['ms_per_step']:.1f} | "
                 f"{d['noise_share_trained']:.3f} | {_f(d['ref_nll_trained'], 3)} / {d['ref_nll_candidates']:.3f} | "
                 f"{_f(d['full_nll_trained'], 3)} / {_f(d['full_nll_candidates'], 3)} | "
                 f"{_f(d['ood'].get('wikitext2_valid'), 3)} | {_f(d['ood'].get('tinyshakespeare'), 3)} |")
    L.append("\n## Paired differences (Δ = arm − comparator, per seed; 95 % t-CI)\n")
    L.append("| comparison | n | Δ per seed | mean Δ | SE | 95 % CI | verdict |\n|---|---|---|---|---|---|---|")
    for k, p in s["paired"].items():
        if p is None:
            continue
        ci = "—" if p["ci"] is None else f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
        L.append(f"| {k} | {p['n']} | {', '.join(f'{x:+.4f}' for x in p['per_seed'])} | {p['mean']:+.4f} | "
                 f"{_f(p['se'])} | {ci} | {p['verdict']} |")
    if s.get("paired_test"):
        L.append("\n## The `test` split (round 4: read once, at the end of every run but the sweep's)\n")
        L.append("| arm | seeds | test per seed | mean |\n|---|---|---|---|")
        for lab, d in s["arms"].items():
            if "test_per_seed" in d:
                L.append(f"| `{lab}` | {len(d['test_seeds'])} | {', '.join(f'{x:.4f}' for x in d['test_per_seed'])} "
                         f"| {d['test_mean']:.4f} |")
        L.append("\n| comparison | n | Δ test per seed | mean Δ test | SE | 95 % CI | verdict (test) | mean Δ val "
                 "(same seeds) | verdict (val) | Δtest − Δval | P30 |\n" + "|---" * 11 + "|")
        for k, p in s["paired_test"].items():
            ci = "—" if p["ci"] is None else f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
            L.append(f"| {k} | {p['n']} | {', '.join(f'{x:+.4f}' for x in p['per_seed'])} | {p['mean']:+.4f} | "
                     f"{_f(p['se'])} | {ci} | {p['verdict']} | {p['val_mean_same_seeds']:+.4f} | "
                     f"{p['val_verdict_same_seeds']} | {p['test_minus_val']:+.4f} | {'yes' if p['p30'] else 'no'} |")
    for lab, j in s.get("jax", {}).items():
        L.append(f"\n## JAX arm `{lab}` vs the PyTorch arm `{j['torch_arm']}`'s seed band (P29)\n")
        L.append(f"PyTorch seeds {j['torch_seeds']}: final val mean {j['torch_val_mean']:.4f}, sd "
                 f"{_f(j['torch_val_sd'])}, min {j['torch_val_min']:.4f}, max {j['torch_val_max']:.4f}; tolerance "
                 f"max(0.05, 3 sd) = {j['tolerance']:.4f}" +
                 (f"; test mean {j['torch_test_mean']:.4f} (min {j['torch_test_min']:.4f}, max "
                  f"{j['torch_test_max']:.4f})" if "torch_test_mean" in j else "") + ".\n")
        L.append("| seed | val | Δ vs PyTorch mean | final within | curve within band (points) | worst excess | "
                 "test | ms/step | first step s | P29 |\n|---|---|---|---|---|---|---|---|---|---|")
        for sd, r in j["runs"].items():
            L.append(f"| {sd} | {r['val']:.4f} | {r['val_minus_torch_mean']:+.4f} | {r['final_within']} | "
                     f"{r['curve_within']} ({r['curve_points_checked']}) | {r['curve_worst_excess']:+.4f} | "
                     f"{_f(r['test'])} | {r['ms_per_step']:.1f} | {_f(r['first_step_s'], 1)} | "
                     f"{_p29(r['p29'])} |")
    L.append("\n## Effective data multiplier m vs `std_k`'s budget curve\n")
    if not s["m"]:
        L.append("No seed has >= 2 `std_k` budgets yet.")
    L += _m_lines(s["m"])
    L.append(f"\nBudget points (trained tokens, val) per seed: {s['budget_runs']}\n")
    if s.get("m_test"):
        L.append("### The same m read on `test` (the arms' and the budgets' `test` losses)\n")
        L += _m_lines(s["m_test"])
        L.append(f"\nBudget points (trained tokens, test) per seed: {s['test_budget_runs']}\n")
    if s.get("paired_ood"):
        L.append("## Paired differences on the out-of-domain sets (final loss)\n")
        L.append("| set | comparison | n | Δ per seed | mean Δ | 95 % CI | verdict |\n|---|---|---|---|---|---|---|")
        for name, comps in s["paired_ood"].items():
            for k, p in comps.items():
                ci = "—" if p["ci"] is None else f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
                L.append(f"| {name} | {k} | {p['n']} | {', '.join(f'{x:+.4f}' for x in p['per_seed'])} | "
                         f"{p['mean']:+.4f} | {ci} | {p['verdict']} |")
        L.append("")
    L.append("## Time to tuned `std_B`'s final val loss (same seed)\n")
    for lab, d in s["time_to_target"].items():
        parts = [f"s{sd}: {_reached(v['time_s'])} (std_B {v['std_B_wall_s']:.1f} s, target {v['target']:.4f})"
                 for sd, v in sorted(d.items())]
        L.append(f"* `{lab}`: " + "; ".join(parts))
    if s.get("time_ratio"):
        L.append("\n## Time ratio R = (B/k)·t_arm/(m·t_B) (PROTOCOL.md round 3; goal R ≤ 0.7)\n")
        L.append("| arm | seeds | m (mean) | t_arm/t_B | R per seed | mean R | 95 % CI | "
                 "time to std_B's loss per seed |\n|---|---|---|---|---|---|---|---|")
        for lab, e in s["time_ratio"].items():
            per = ", ".join(f"s{sd}: {p['R']:.2f}" for sd, p in e["per_seed"].items())
            ci = f"[{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]" if "ci" in e else "—"
            tt = "; ".join(f"s{sd}: {_reached(p['time_to_target_s'])} (std_B {p['std_B_wall_s']:.1f} s)"
                           for sd, p in e["per_seed"].items())
            L.append(f"| `{lab}` | {e['n']} | {e['m_mean']:.2f} | {e['t_arm_over_t_B']:.3f} | {per} | "
                     f"{e['mean']:.2f} | {ci} | {tt} |")
    L.append("\n## Val loss by target-token frequency rank (mean over seeds)\n")
    keys = next(iter(s["arms"].values()))["by_freq"].keys()
    L.append("| arm | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for lab, d in s["arms"].items():
        L.append(f"| `{lab}` | " + " | ".join(_f(d["by_freq"][k], 3) for k in keys) + " |")
    for name, g in s["gates"].items():
        L.append(f"\n## Gate `{name}`: checkpoint `{g['checkpoint']}` (val {g['checkpoint_val']:.4f}), "
                 f"{g['chunks']} candidate chunks\n")
        c, n = g["sets"]["clean"], g["sets"]["noise"]
        L.append("| score | ρ vs full loss (clean) | ρ vs oracle excess (clean) | ρ vs full loss (noise set) | "
                 "noise share in top 25 % | mean on noise / clean chunks |\n|---|---|---|---|---|---|")
        for k in c["spearman_vs_full_loss"]:
            L.append(f"| {k} | {c['spearman_vs_full_loss'][k]:.3f} | {c['spearman_vs_oracle_excess'][k]:.3f} | "
                     f"{n['spearman_vs_full_loss'][k]:.3f} | {n['noise_share_top25'][k]:.3f} | "
                     f"{n['noise_mean'][k]:.3f} / {n['clean_mean'][k]:.3f} |")
        L.append(f"\nLowest reference NLL (`ref_only`'s rule): noise share in top 25 % "
                 f"{n['noise_share_top25_of_lowest_ref']:.3f}. Base rate of noise: "
                 f"{g['noise_chunks'] / g['chunks']:.3f}.")
        if "r1_stride" in g:
            L.append(f"Scored positions per option: {g['scored_positions']}. The 1-layer arm's stride (rule of "
                     f"round 3, item 4: 16 if its rho to oracle excess ≥ 0.5, else 4): **{g['r1_stride']}**.")
    if s.get("chunk_sources"):
        L += _chunk_source_lines(s["chunk_sources"])
    return "\n".join(L) + "\n"


def plot(summary: dict, folder: Path, runs: list) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {}
    for lab in summary["arms"]:
        arms[lab] = [r for r in runs if label(r) == lab and not r["tag"]
                     and r["accounting"]["optimizer_steps"] == summary["N"]
                     and (r["arm"] not in summary["tuned_lr"] or r["lr"] == summary["tuned_lr"][r["arm"]])]
    written = []
    for xkey, xlabel, fname in (("trained_tokens", "trained tokens", "plot_val_vs_trained_tokens.png"),
                                ("wall_s", "training wall-clock (s, H200)", "plot_val_vs_wallclock.png")):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for lab, rs in sorted(arms.items()):
            xs = np.array([[c[xkey] for c in r["curve"]] for r in rs], dtype=float)
            ys = np.array([[c["val_loss"] for c in r["curve"]] for r in rs], dtype=float)
            x = xs.mean(0)
            line, = ax.plot(x, ys.mean(0), label=f"{lab} (n={len(rs)})", ls="--" if "+noise" in lab else "-")
            if len(rs) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token, 256-chunk subset)")
        ax.set_ylim(top=min(6.5, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"pycode, scale {runs[0]['scale']['name']}, N = {summary['N']} steps: mean over seeds, "
                     f"band = min..max")
        fig.tight_layout()
        p = folder / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a results folder written by benchmarks.quality.study")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--sources", help="chunk-source tables (benchmarks.quality.sources; default <folder>/../sources)")
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    if not (folder / "runs").is_dir():
        raise ValueError(f"{folder} has no runs/ folder: pass the --out of benchmarks.quality.study")
    s = summarize(folder, Path(a.sources) if a.sources else None)
    (folder / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (folder / "summary.md").write_text(render(s))
    if not a.no_plots:
        plot(s, folder, load_runs(folder))
    print(f"wrote {folder}/summary.md, summary.json" + ("" if a.no_plots else " and plots"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
