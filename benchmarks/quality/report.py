r"""Aggregate the run JSONs of an output directory into ``results.md``, ``summary.json`` and PNG plots.

``python -m benchmarks.quality.report OUT_DIR`` re-renders from ``OUT_DIR/runs/*.json`` (runs of several
invocations are merged; runs with a different scale, budget, device or precision form separate sections).

Statistics, per variant (``framework/label``) over its seeds:

* final held-out eval loss ``mean ± std`` (sample std, ``ddof = 1``; 0 for one seed) and its perplexity;
* **paired** difference to ``standard`` and to the variant's **random baseline** (``cggr_token`` →
  ``random_token`` and ``cggr_sequence`` → ``random_sequence`` with the same ratio/curriculum options), seed
  by seed (each seed shares initial weights and batches across variants), ``mean ± std``; called *better* or
  *worse* when a two-sided paired t-test rejects "no difference" at 95 % (``|mean| > t_{0.975, n−1}·std/√n``),
  else *inconclusive* (always for a single seed);
* **equal FLOPs / equal wall-clock**: every run's eval curve is linearly interpolated at the smallest final
  executed-FLOPs (wall-clock) over all runs of the framework, i.e. every variant is read at the same compute.
  With ``--budget steps`` this reads the more expensive variants before their learning rate has decayed,
  which favours cheap variants; ``--budget flops`` / ``--budget time`` give every variant its full schedule
  within the same compute and are the fair form of the question.

Plots (``plot_<section>_<framework>_<axis>.png``, axis ∈ ``step``, ``wall``, ``flops``): mean eval loss over
seeds on a common grid (up to the smallest final x of the variant's seeds), band = ±1 std over seeds.
"""
from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["load_runs", "summarize", "write_report", "main"]

AXES: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "optimizer steps"),
    ("wall", "wall_s", "training wall-clock (s, first step excluded)"),
    ("flops", "flops", "executed training FLOPs"),
)


def load_runs(out_dir: Path) -> list[dict[str, Any]]:
    """Every ``runs/*.json`` record of ``out_dir`` (sorted by file name)."""
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"out_dir: {str(runs_dir)!r} does not exist (run benchmarks.quality.run first)")
    out = []
    for path in sorted(runs_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("schema") != "cggr-quality-run/1":
            raise ValueError(f"{path}: not a quality run record (schema {rec.get('schema')!r})")
        out.append(rec)
    return out


def _context_key(run: dict[str, Any]) -> str:
    scale = dict(run["scale"])
    scale.pop("seeds", None)
    return json.dumps({"scale": scale, "budget": run["budget"]["kind"], "budget_total": run["budget"]["total"],
                       "device": run["device"], "amp": run["amp"]}, sort_keys=True)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _interp(run: dict[str, Any], axis: str, x: float) -> float:
    xs = np.asarray([c[axis] for c in run["curve"]], dtype=np.float64)
    ys = np.asarray([c["eval_loss"] for c in run["curve"]], dtype=np.float64)
    return float(np.interp(x, xs, ys))


def _baseline_label(group: dict[str, Any], groups: "OrderedDict[str, dict[str, Any]]") -> Optional[str]:
    """Key of the random baseline of a CGGR variant (same framework and matching options), if present."""
    base_mode = {"cggr_token": "random_token", "cggr_sequence": "random_sequence"}.get(group["mode"])
    if base_mode is None:
        return None
    opts = group["options"]
    for key, g in groups.items():
        if g["framework"] != group["framework"] or g["mode"] != base_mode:
            continue
        if all(opts.get(k) == v for k, v in g["options"].items()):
            return key
    return None


#: Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(dof: int) -> float:
    """Two-sided 95 % critical value of Student's t with ``dof >= 1`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def _paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict[str, Any]]:
    """Paired difference ``a − b`` over the common seeds: mean, std and a paired-t verdict at 95 %."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    if not all(math.isfinite(d) for d in diffs):
        verdict = "non-finite"
    elif n < 2:
        verdict = "inconclusive (1 seed)"
    elif (std == 0.0 and mean != 0.0) or abs(mean) > t95(n - 1) * std / math.sqrt(n):
        verdict = "better" if mean < 0 else "worse"
    else:
        verdict = "inconclusive"
    return {"mean": mean, "std": std, "n": n, "verdict": verdict, "seeds": seeds}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sections (one per scale/budget/device/precision) of per-variant statistics (module docstring)."""
    sections: "OrderedDict[str, list[dict[str, Any]]]" = OrderedDict()
    for run in runs:
        sections.setdefault(_context_key(run), []).append(run)
    out = []
    for ctx_key, ctx_runs in sections.items():
        groups: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        for run in ctx_runs:
            g = groups.setdefault(run["key"], {"key": run["key"], "framework": run["framework"], "mode": run["mode"],
                                               "label": run["label"], "options": run["variant"]["options"],
                                               "runs": []})
            if g["options"] != run["variant"]["options"]:
                raise ValueError(f"{run['key']}: runs with the same label but different options "
                                 f"({g['options']} vs {run['variant']['options']}); use distinct --out directories")
            g["runs"].append(run)
        common: dict[str, dict[str, float]] = {}
        for fw in sorted({g["framework"] for g in groups.values()}):
            fw_runs = [r for r in ctx_runs if r["framework"] == fw]
            common[fw] = {"flops": min(r["final"]["flops"] for r in fw_runs),
                          "wall_s": min(r["final"]["train_wall_s"] for r in fw_runs)}
        order = {m: i for i, m in enumerate(("standard", "random_token", "random_sequence", "cggr_token",
                                              "cggr_sequence"))}
        groups = OrderedDict(sorted(groups.items(), key=lambda kv: (kv[1]["framework"], order.get(kv[1]["mode"], 9),
                                                                     kv[1]["label"])))
        stats: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        for key, g in groups.items():
            runs_g = sorted(g["runs"], key=lambda r: r["seed"])
            final = {r["seed"]: r["final"]["eval_loss"] for r in runs_g}
            at_flops = {r["seed"]: _interp(r, "flops", common[g["framework"]]["flops"]) for r in runs_g}
            at_wall = {r["seed"]: _interp(r, "wall_s", common[g["framework"]]["wall_s"]) for r in runs_g}

            def ms(field: str, runs_g: list[dict[str, Any]] = runs_g) -> tuple[float, float]:
                vals = [r["final"][field] for r in runs_g if r["final"][field] is not None]
                return _mean_std(vals)

            stats[key] = {
                "key": key, "framework": g["framework"], "mode": g["mode"], "label": g["label"],
                "options": g["options"], "seeds": [r["seed"] for r in runs_g],
                "eval_loss": _mean_std(list(final.values())),
                "eval_ppl": _mean_std([math.exp(min(v, 50.0)) for v in final.values()]),
                "eval_loss_at_equal_flops": _mean_std(list(at_flops.values())),
                "eval_loss_at_equal_wall": _mean_std(list(at_wall.values())),
                "steps": _mean_std([r["steps"] for r in runs_g]),
                "flops": ms("flops"), "flops_nominal": ms("flops_nominal"), "train_wall_s": ms("train_wall_s"),
                "first_step_s": ms("first_step_s"), "tokens_per_s": ms("tokens_per_s"),
                "kept_token_fraction": ms("kept_token_fraction"),
                "kept_sequence_fraction": ms("kept_sequence_fraction"), "epochs": ms("epochs"),
                "_final": final, "_at_flops": at_flops, "_at_wall": at_wall,
            }
        for key, s in stats.items():
            std_key = next((k for k, o in stats.items() if o["framework"] == s["framework"]
                            and o["mode"] == "standard"), None)
            s["vs_standard"] = None if std_key is None or std_key == key else {
                "final": _paired(s["_final"], stats[std_key]["_final"]),
                "equal_flops": _paired(s["_at_flops"], stats[std_key]["_at_flops"]),
                "equal_wall": _paired(s["_at_wall"], stats[std_key]["_at_wall"]),
            }
            base_key = _baseline_label(groups[key], groups)
            s["baseline"] = base_key
            s["vs_baseline"] = None if base_key is None else {
                "final": _paired(s["_final"], stats[base_key]["_final"]),
                "equal_flops": _paired(s["_at_flops"], stats[base_key]["_at_flops"]),
                "equal_wall": _paired(s["_at_wall"], stats[base_key]["_at_wall"]),
            }
        first = ctx_runs[0]
        out.append({"context": json.loads(ctx_key), "common": common, "variants": list(stats.values()),
                    "runs": ctx_runs, "example": first})
    return out


# --------------------------------------------------------------------------------------------- rendering
def _fmt(ms: tuple[float, float], digits: int = 4) -> str:
    mean, std = ms
    if not math.isfinite(mean):
        return f"NON-FINITE ({mean})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_num(x: float, fmt: str = "{:.3g}") -> str:
    return fmt.format(x) if x is not None and math.isfinite(x) else "n/a"


def _fmt_delta(d: Optional[dict[str, Any]]) -> str:
    if d is None:
        return "—"
    return f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['verdict']})"


def _plot(section: dict[str, Any], framework: str, axis: str, field: str, xlabel: str, path: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in section["variants"] if v["framework"] == framework]
    runs = [r for r in section["runs"] if r["framework"] == framework]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    for i, v in enumerate(variants):
        vr = [r for r in runs if r["key"] == v["key"]]
        x_end = min(r["curve"][-1][field] for r in vr)
        grid = np.linspace(0.0, x_end, 64) if x_end > 0 else np.zeros(1)
        ys = np.stack([[_interp(r, field, x) for x in grid] for r in vr])
        mean = ys.mean(axis=0)
        std = ys.std(axis=0, ddof=1) if ys.shape[0] > 1 else np.zeros_like(mean)
        color = cmap(i % cmap.N)
        style = "-" if v["mode"].startswith("cggr") else ("--" if v["mode"].startswith("random") else ":")
        ax.plot(grid, mean, style, color=color, lw=1.8, label=f"{v['label']} (n={ys.shape[0]})")
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.18, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.set_title(title, fontsize=10)
    finals = [c["eval_loss"] for r in runs for c in r["curve"][1:]]
    if finals:
        lo, hi = float(np.min(finals)), float(np.percentile(finals, 95))
        ax.set_ylim(lo - 0.05 * max(hi - lo, 1e-3), hi + 0.1 * max(hi - lo, 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=1 if len(variants) <= 10 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _section_markdown(idx: int, section: dict[str, Any], plots: list[str]) -> list[str]:
    ex = section["example"]
    scale = section["context"]["scale"]
    model = ex["model"]
    lines: list[str] = []
    lines.append(f"## Section {idx}: scale `{_scale_name(scale)}`, budget `{ex['budget']['kind']}`, "
                 f"{ex['device']}, {ex['amp']}")
    lines.append("")
    lines.append(f"* **Data**: {ex['data']['split']}. {ex['data']['train_tokens']:,} training tokens, eval set "
                 f"{scale['eval_sequences']} windows x {scale['seq_len']} tokens spread over the "
                 f"{ex['data']['eval_tokens']:,}-token validation text. {ex['data']['tokenizer']}.")
    lines.append(f"* **Model**: Llama-style, d={model['d_model']}, {model['num_layers']} layers, "
                 f"{model['num_heads']} heads ({model['num_kv_heads']} kv), SwiGLU {model['ffn_dim']}, vocab "
                 f"{model['vocab_size']}; {ex['model']['params']:,} parameters "
                 f"({model['matmul_params']:,} in matmuls); batch {scale['batch_size']} x {scale['seq_len']}.")
    budget = ex["budget"]
    if budget["kind"] == "steps":
        btxt = f"{scale['steps']} optimizer steps per run (equal steps and data)"
    elif budget["kind"] == "flops":
        btxt = (f"{budget['total']:.3g} executed FLOPs per run (= {scale['steps']} standard steps; cheaper "
                f"variants take more steps)")
    else:
        btxt = f"{budget['total']:.1f} s of measured training per run"
    lines.append(f"* **Budget**: {btxt}. AdamW lr {ex['optim']['lr']}, cosine to 10 % after "
                 f"{scale['lr_warmup']:.0%} warm-up, wd {ex['optim']['weight_decay']}, clip "
                 f"{ex['optim']['grad_clip']}. Default router layers {scale['router_layers']}, curriculum "
                 f"warm-up {int(round(scale['curriculum_fraction'] * scale['steps']))} steps unless a variant "
                 f"says otherwise.")
    lines.append(f"* **Versions**: " + ", ".join(f"{k} {v}" for k, v in ex["versions"].items() if v) +
                 (f"; commit {ex['git_commit']}" if ex.get("git_commit") else ""))
    if any(r["budget"].get("hit_step_cap") for r in section["runs"]):
        lines.append("* **Warning**: some runs stopped at the step cap before spending their budget.")
    lines.append("")
    for fw in sorted({v["framework"] for v in section["variants"]}):
        common = section["common"][fw]
        lines.append(f"### {fw}")
        lines.append("")
        lines.append(f"Equal compute points: {common['flops']:.3g} executed FLOPs, {common['wall_s']:.2f} s "
                     f"wall-clock (the smallest final values among the {fw} runs).")
        if ex["budget"]["kind"] == "steps":
            lines.append("With `--budget steps` these columns read the more expensive variants mid-schedule "
                         "(before their learning rate has decayed), which favours the cheap ones; the fair "
                         "equal-compute comparison is `--budget flops` (or `time`), where every variant spends "
                         "the same compute on its own full schedule.")
        lines.append("")
        lines.append("| variant | seeds | final eval loss | ppl | Δ vs standard (paired) | Δ vs random baseline "
                     "| loss @ equal FLOPs | loss @ equal wall-clock | steps | exec. TFLOPs | nominal TFLOPs "
                     "| train s | tokens/s | kept tokens | kept seqs |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in section["variants"]:
            if v["framework"] != fw:
                continue
            vs_std = v["vs_standard"]["final"] if v["vs_standard"] else None
            vs_base = v["vs_baseline"]["final"] if v["vs_baseline"] else None
            lines.append(
                f"| `{v['label']}` | {len(v['seeds'])} | {_fmt(v['eval_loss'])} | {_fmt(v['eval_ppl'], 1)} "
                f"| {_fmt_delta(vs_std)} | {_fmt_delta(vs_base)} | {_fmt(v['eval_loss_at_equal_flops'])} "
                f"| {_fmt(v['eval_loss_at_equal_wall'])} | {v['steps'][0]:.0f} | {_fmt_num(v['flops'][0] / 1e12)} "
                f"| {_fmt_num(v['flops_nominal'][0] / 1e12)} | {_fmt_num(v['train_wall_s'][0], '{:.2f}')} "
                f"| {_fmt_num(v['tokens_per_s'][0], '{:,.0f}')} | {_fmt_num(100 * v['kept_token_fraction'][0], '{:.1f}')} % "
                f"| {_fmt_num(100 * v['kept_sequence_fraction'][0], '{:.1f}')} % |")
        lines.append("")
        lines.extend(_verdicts(section, fw))
        lines.append("")
        for p in plots:
            if f"_{fw}_" in p:
                lines.append(f"![{p}]({p})")
        lines.append("")
    return lines


def _scale_name(scale: dict[str, Any]) -> str:
    from benchmarks.quality.run import SCALES

    for name, s in SCALES.items():
        if s.d_model == scale["d_model"] and s.num_layers == scale["num_layers"] and s.seq_len == scale["seq_len"]:
            return name if all(getattr(s, k) == scale[k] for k in ("batch_size", "steps", "vocab_size")) \
                else f"{name} (overridden)"
    return "custom"


def _verdicts(section: dict[str, Any], fw: str) -> list[str]:
    lines = ["**Verdicts** (Δ = this variant's loss − the reference's, paired by seed; *better/worse* when a "
             "paired t-test is significant at 95 %, else *inconclusive*):", ""]
    variants = [v for v in section["variants"] if v["framework"] == fw]
    for v in variants:
        if not v["mode"].startswith("cggr"):
            continue
        parts = []
        if v["vs_standard"]:
            parts.append(f"vs standard at equal steps {_fmt_delta(v['vs_standard']['final'])}, at equal FLOPs "
                         f"{_fmt_delta(v['vs_standard']['equal_flops'])}, at equal wall-clock "
                         f"{_fmt_delta(v['vs_standard']['equal_wall'])}")
        if v["vs_baseline"]:
            parts.append(f"vs `{v['baseline'].split('/', 1)[1]}` at equal steps "
                         f"{_fmt_delta(v['vs_baseline']['final'])}, at equal FLOPs "
                         f"{_fmt_delta(v['vs_baseline']['equal_flops'])}")
        lines.append(f"* `{v['label']}`: " + ("; ".join(parts) if parts else "no baseline in this section"))
    ranked = sorted((v for v in variants if math.isfinite(v["eval_loss_at_equal_flops"][0])),
                    key=lambda v: v["eval_loss_at_equal_flops"][0])
    if ranked:
        lines.append(f"* Lowest eval loss at equal FLOPs: `{ranked[0]['label']}` "
                     f"({_fmt(ranked[0]['eval_loss_at_equal_flops'])}); at equal steps: "
                     f"`{min(variants, key=lambda v: v['eval_loss'][0])['label']}`.")
    return lines


def _jsonable(section: dict[str, Any]) -> dict[str, Any]:
    return {"context": section["context"], "common": section["common"],
            "variants": [{k: v for k, v in var.items() if not k.startswith("_")} for var in section["variants"]]}


def write_report(out_dir: Path) -> list[Path]:
    """Write ``results.md``, ``summary.json`` and the plots for ``out_dir``; return the written paths."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    if not runs:
        raise ValueError(f"out_dir: no runs under {out_dir / 'runs'}")
    sections = summarize(runs)
    written: list[Path] = []
    md = ["# CGGR quality harness: results", ""]
    if any(_scale_name(s["context"]["scale"]).startswith("cpu-smoke") for s in sections):
        md += ["> **cpu-smoke**: a handful of steps of a tiny model. It checks that the harness runs end to end; "
               "its numbers say nothing about CGGR.", ""]
    md += ["How to read this: *executed* FLOPs are what the hardware runs (token selection does not shrink a causal "
           "LM's backward, so `random_token`/`cggr_token` cost as much as `standard` plus the scoring); *nominal* "
           "FLOPs are the docs' accounting (backward over kept tokens only). Equal-FLOPs columns use executed FLOPs. "
           "tokens/s counts input tokens per second of training (first step excluded). Every number is mean ± std "
           "over seeds; Δ columns are paired by seed (negative = lower loss than the reference).", ""]
    for i, section in enumerate(sections, start=1):
        plot_names = []
        for fw in sorted({v["framework"] for v in section["variants"]}):
            for axis, field, xlabel in AXES:
                name = f"plot_s{i}_{fw}_{axis}.png"
                _plot(section, fw, axis, field, xlabel, out_dir / name,
                      f"{fw}: held-out eval loss vs {xlabel} (mean ± 1 std over seeds)")
                written.append(out_dir / name)
                plot_names.append(name)
        md += _section_markdown(i, section, plot_names)
    skipped = out_dir / "skipped.json"
    if skipped.is_file():
        done = {(r["key"], r["seed"]) for r in runs}
        missing = [s for s in json.loads(skipped.read_text()) if (s["key"], s["seed"]) not in done]
        if missing:
            md += ["## Skipped runs (--deadline-min of the last invocation)", ""]
            md += [f"* {s['key']} seed {s['seed']}" for s in missing]
            md.append("")
    (out_dir / "results.md").write_text("\n".join(md))
    written.append(out_dir / "results.md")
    (out_dir / "summary.json").write_text(json.dumps([_jsonable(s) for s in sections], indent=1))
    written.append(out_dir / "summary.json")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m benchmarks.quality.report OUT_DIR", file=sys.stderr)
        return 2
    for p in write_report(Path(args[0])):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
