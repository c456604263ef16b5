"""Each op script's own JSON (``--out``) → harness records.

The op scripts keep their detailed JSON (sweeps, checks, notes: the raw file stays next to the records);
this module maps its rows onto the one record schema, so that new runs and the migrated historical files
(``benchmarks/results/h200/2026-11-24_*``) are read the same way by ``benchmarks/report.py``. One function
per script family; unknown numeric fields are kept as metrics rather than dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.harness.records import make_record

__all__ = ["SUITE_OF_OP", "convert", "kind_of"]

SUITE_OF_OP = {"scoring": "kernels", "selective_ce": "kernels", "selection": "kernels",
               "fused_linear": "heads", "batch_split": "models", "token_stats": "heads"}

_SHAPE_KEYS = ("n", "vocab", "N", "V", "d", "batch_size", "seq_len", "shape", "ratio")
_SKIP = {"name", "method", "mode", "dtype", "kind", "sync", "exact", "strategy", "path", "agrees_with_default",
         "buckets", "router_path", "router_path_reason", "floor_kind", "config", "configs", "error"}


def kind_of(raw: dict[str, Any], filename: str = "") -> Optional[str]:
    """``<op>_<framework>`` of a script's JSON, from its ``benchmark`` field or its file name."""
    b = str(raw.get("benchmark") or "")
    for k in ("scoring_torch", "scoring_jax", "selective_ce_torch", "selective_ce_jax", "selection_torch"):
        if b == k:
            return k
    if b == "bench_batch_split_jax":
        return "batch_split_jax"
    if raw.get("op") == "token_stats" and raw.get("framework") in ("torch", "jax"):
        return f"token_stats_{raw['framework']}"
    name = filename.rsplit("/", 1)[-1]
    for op in ("batch_split", "fused_linear", "selective_ce", "scoring", "selection", "token_stats"):
        for fw in ("torch", "jax"):
            if name.startswith(f"bench_{op}_{fw}") or name.startswith(f"{op}_{fw}"):
                return f"{op}_{fw}"
    if name.startswith("bench_torch"):  # run 6's combined torch file: the selection script embeds the other two
        return "selection_torch"
    if name.startswith("bench_jax"):
        return "selective_ce_jax"
    return None


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics(row: dict[str, Any], ratio_keys: dict[str, str]) -> dict[str, Any]:
    m = {}
    for k, v in row.items():
        if k in _SKIP or k in _SHAPE_KEYS or k in ratio_keys:
            continue
        if _num(v):
            m[k] = v
    return m


def _ratios(row: dict[str, Any], ratio_keys: dict[str, str], invert: tuple[str, ...] = ()) -> dict[str, float]:
    out = {}
    for k, name in ratio_keys.items():
        v = row.get(k)
        if _num(v) and v:
            out[name] = 1.0 / v if k in invert else float(v)
    return out


def _tokens(metrics: dict[str, Any], ms: Optional[float], input_tokens: Optional[float],
            trained_tokens: Optional[float]) -> None:
    if ms and ms > 0:
        if input_tokens:
            metrics.setdefault("input_tokens_per_s", input_tokens / (ms * 1e-3))
        if trained_tokens:
            metrics.setdefault("trained_tokens_per_s", trained_tokens / (ms * 1e-3))


def _rows_ops(raw: dict[str, Any], op: str, fw: str, ratio_keys: dict[str, str], base: dict[str, Any],
              is_baseline: Callable[[str], bool], invert: tuple[str, ...] = (),
              ratio_of_selection: Optional[float] = None) -> list[dict[str, Any]]:
    out = []
    for row in raw.get("results") or []:
        if not isinstance(row, dict):
            continue
        if "configs" in row:  # a sweep block: one record per variant
            for c in row["configs"]:
                if "median_ms" not in c:
                    continue
                out.append(make_record(op=op, framework=fw, case=f"sweep {c.get('config')}",
                                       shape={"vocab": row.get("vocab")}, dtype=None,
                                       metrics=_metrics(c, ratio_keys), ratios=_ratios(c, ratio_keys, invert),
                                       extra={"sweep": True}, **base))
            continue
        if "parts" in row:  # selective CE (torch): device time of each part of the fused path, CUDA graphs
            for part in row["parts"]:
                if part.get("gpu_us") is None:
                    continue
                out.append(make_record(op=op, framework=fw, case=f"part: {str(part['name']).strip()}",
                                       shape={"vocab": row.get("vocab")}, dtype=None,
                                       metrics={"gpu_us": part["gpu_us"]},
                                       ratios={"floor": part["x_floor"]} if part.get("x_floor") else {},
                                       extra={"part": True}, **base))
            continue
        name = row.get("name") or row.get("method") or row.get("mode")
        if name is None:
            continue
        metrics = _metrics(row, ratio_keys)
        if not metrics:
            continue
        shape = {k: row[k] for k in ("n", "vocab", "shape") if k in row}
        ms = row.get("median_ms")
        n = row.get("n")
        sel_ratio = row.get("ratio", ratio_of_selection)
        if op in ("scoring",) and n:
            _tokens(metrics, ms, n, None)
        elif op == "selective_ce" and n:
            # the dynamic threshold keeps more than the nominal ratio: no trained-token figure for those rows
            nominal = sel_ratio and "dynamic" not in str(name).lower()
            _tokens(metrics, ms, n, (n * sel_ratio) if nominal else None)
        is_sweep = str(name).strip().lower().startswith(("sweep", "pallas sweep"))
        out.append(make_record(op=op, framework=fw, case=str(name), shape=shape, dtype=row.get("dtype"),
                               metrics=metrics, ratios=_ratios(row, ratio_keys, invert),
                               baseline=is_baseline(str(name)), extra={"sweep": True} if is_sweep else None,
                               **base))
    return out


def _fused(raw: dict[str, Any], fw: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    shape = dict(raw.get("shape") or {})
    n, ratio = shape.get("N"), shape.get("ratio")
    keys = {"vs_liger": "liger_flce", "matmul_equivalents": "one_matmul"}
    out = []
    for row in raw.get("rows") or []:
        name = row.get("method") or row.get("name")
        metrics = _metrics(row, keys)
        if not name or not metrics:
            continue
        _tokens(metrics, row.get("median_ms"), n, (n * ratio) if n and ratio else None)
        out.append(make_record(op="fused_linear", framework=fw, case=str(name),
                               shape={k: v for k, v in shape.items() if k != "dtype"}, dtype=shape.get("dtype"),
                               metrics=metrics, ratios=_ratios(row, keys),
                               baseline=str(name) in ("liger_flce", "cce", "plain", "matmul", "xla_optax",
                                                      "torch_plain", "apple_cce"), **base))
    return out


def _batch_split(raw: dict[str, Any], fw: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = dict(raw.get("config") or {})
    rows = [r for r in raw.get("results") or [] if isinstance(r, dict) and "step_ms_median" in r]
    by_mode = {str(r.get("mode")): r["step_ms_median"] for r in rows}
    baselines = {k: by_mode[k] for k in ("standard", "random_sequence") if k in by_mode}
    out = []
    for r in rows:
        mode = str(r.get("mode"))
        b = r.get("batch_size", cfg.get("batch_size"))
        t = r.get("seq_len", cfg.get("seq_len"))
        metrics = _metrics(r, {})
        metrics["median_ms"] = r["step_ms_median"]
        if "tokens_per_s" in r:
            metrics["input_tokens_per_s"] = r["tokens_per_s"]
            kept = r.get("sequences_trained_median", r.get("sequences_kept_median"))
            if kept is not None and b:
                metrics["trained_tokens_per_s"] = r["tokens_per_s"] * kept / b
        # speed-up convention of the model benchmarks: baseline step time / this step time (higher is better)
        rat = {f"speedup_vs_{k}": v / r["step_ms_median"] for k, v in baselines.items() if k != mode}
        out.append(make_record(op="batch_split", framework=fw, case=mode,
                               shape={"batch_size": b, "seq_len": t}, dtype=cfg.get("dtype") or cfg.get("precision"),
                               metrics=metrics, ratios=rat, baseline=mode in ("standard", "random_sequence"),
                               **base))
    return out


#: token_stats: the materialised baseline of each framework (TRL's classic path; its JAX transcription), the
#: fused alternatives (issue 17's ρ = 1 goal) and our methods.
TOKEN_STATS_MATERIALISED = {"torch": "trl_materialised", "jax": "materialised"}
TOKEN_STATS_FUSED_ALTERNATIVES = ("trl_chunked", "liger_grpo")
TOKEN_STATS_OURS = ("cggr_token_stats", "cggr_policy_gradient", "cggr_policy_gradient_256mib",
                    "cggr_policy_gradient_512mib", "cggr_policy_gradient_1024mib")


def _method_and_ratio(name: str) -> tuple[str, Optional[float]]:
    """``"cggr_policy_gradient[0.2]"`` -> ``("cggr_policy_gradient", 0.2)``."""
    if name.endswith("]") and "[" in name:
        method, rho = name[:-1].split("[", 1)
        try:
            return method, float(rho)
        except ValueError:
            return name, None
    return name, None


def _token_stats(raw: dict[str, Any], fw: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """``benchmarks/ops/token_stats_<fw>.py``'s JSON: one record per method and ρ. Metrics: the time (median, p10,
    p90), ``input_tokens_per_s`` (``N`` per call), ``trained_tokens_per_s`` (the ``round(ρ·valid)`` tokens in the
    loss), ``peak_extra_gib`` (PyTorch: peak allocated during one call beyond the inputs and the gradients; JAX: the
    compiled program's temporary memory). Ratios, at the same ρ: ``materialised`` (time / the materialised path's),
    ``materialised_memory`` (extra memory / its) and, for our methods, ``fastest_fused`` (time / the fastest fused
    alternative's at that ρ: TRL's chunked head, Liger's GRPO loss). A method that failed (out of memory) or a
    baseline that could not run (its note) is a record with its reason."""
    shape = dict(raw.get("shape") or {})
    n, valid = shape.get("N"), shape.get("valid_tokens")
    rows: dict[str, dict[str, Any]] = {k: v for k, v in (raw.get("results") or {}).items() if isinstance(v, dict)}
    ref_name = TOKEN_STATS_MATERIALISED[fw]

    def ok(line: Optional[dict[str, Any]]) -> bool:
        return bool(line) and _num(line.get("median_ms")) and line["median_ms"] > 0

    def memory(line: dict[str, Any]) -> Optional[float]:
        v = line.get("peak_extra_gib", line.get("temp_gib"))
        return float(v) if _num(v) else None
    out = []
    for name, line in rows.items():
        method, rho = _method_and_ratio(name)
        rec_shape = {k: v for k, v in shape.items() if k not in ("dtype",)}
        rec_shape["ratio"] = rho
        extra: dict[str, Any] = {"method": method,
                                 "memory_method": ("torch.cuda.max_memory_allocated beyond inputs and grads"
                                                   if fw == "torch" else "compiled memory_analysis temp_size")}
        note = (raw.get("notes") or {}).get(method)
        if note:
            extra["note"] = note
        is_base = method == ref_name or method in TOKEN_STATS_FUSED_ALTERNATIVES
        if not ok(line):
            extra.update(status="failed", reason=str(line.get("error", "no timing"))[:500])
            out.append(make_record(op="token_stats", framework=fw, case=name, shape=rec_shape,
                                   dtype=shape.get("dtype"), metrics={"failed": 1.0}, baseline=is_base,
                                   extra=extra, **base))
            continue
        ms = line["median_ms"]
        metrics = {k: v for k, v in line.items() if _num(v) and k not in ("temp_gib",)}
        mem = memory(line)
        if mem is not None:
            metrics["peak_extra_gib"] = mem
        trained = None
        if valid and rho is not None:
            trained = valid if rho >= 1.0 else max(1, int(round(rho * valid)))
        _tokens(metrics, ms, n, trained)
        ratios: dict[str, float] = {}
        ref = rows.get(f"{ref_name}[{name.split('[')[-1]}") if rho is not None else None
        if method != ref_name and ok(ref):
            ratios["materialised"] = ms / ref["median_ms"]
            ref_mem = memory(ref)
            if mem is not None and ref_mem:
                ratios["materialised_memory"] = mem / ref_mem
        if method in TOKEN_STATS_OURS and rho is not None:
            fused = [r["median_ms"] for k, r in rows.items() if ok(r)
                     and _method_and_ratio(k)[0] in TOKEN_STATS_FUSED_ALTERNATIVES and _method_and_ratio(k)[1] == rho]
            if fused:
                ratios["fastest_fused"] = ms / min(fused)
        extra["status"] = "ok"
        out.append(make_record(op="token_stats", framework=fw, case=name, shape=rec_shape, dtype=shape.get("dtype"),
                               metrics=metrics, ratios=ratios, baseline=is_base, extra=extra, **base))
    for method, note in (raw.get("notes") or {}).items():  # baselines that could not run here
        if isinstance(note, str) and note.startswith("skipped") and not any(
                _method_and_ratio(k)[0] == method for k in rows):
            out.append(make_record(op="token_stats", framework=fw, case=method,
                                   shape={k: v for k, v in shape.items() if k != "dtype"}, dtype=shape.get("dtype"),
                                   metrics={"skipped": 1.0}, baseline=True,
                                   extra={"method": method, "status": "skipped", "reason": note[:500]}, **base))
    return out


def convert(raw: dict[str, Any], kind: str, *, suite: Optional[str] = None, commit: str, gpu: str, date: str,
            command: str) -> list[dict[str, Any]]:
    """Records of one script JSON. ``kind`` is ``<op>_<framework>`` (see :func:`kind_of`)."""
    op, fw = kind.rsplit("_", 1)
    base = dict(suite=suite or SUITE_OF_OP[op], commit=commit, gpu=gpu, date=date, command=command)
    args = raw.get("args") or {}
    if op == "scoring":
        keys = {"x_read_once_floor": "read_once_floor", "x_floor_round1": "copy_half", "x_floor_best": "best_floor"}
        return _rows_ops(raw, op, fw, keys, base,
                         lambda n: n.startswith(("copy", "read only", "torch.compile", "reference", "xla_")))
    if op == "selective_ce":
        keys = {"x_liger": "liger_ce", "x_floor": "floor", "x_backward_floor": "backward_floor",
                "speedup_vs_optax_dense": "optax_dense"}
        return _rows_ops(raw, op, fw, keys, base,
                         lambda n: n.lower().startswith(("liger", "torch.compile", "eager", "optax", "floor")),
                         invert=("speedup_vs_optax_dense",), ratio_of_selection=args.get("ratio"))
    if op == "selection":
        return _rows_ops(raw, op, fw, {}, base, lambda n: "reference" in n or "torch.sort" in n)
    if op == "fused_linear":
        return _fused(raw, fw, base)
    if op == "batch_split":
        return _batch_split(raw, fw, base)
    if op == "token_stats":
        return _token_stats(raw, fw, base)
    raise ValueError(f"kind: unknown benchmark kind {kind!r}")


def parse_pytest(log: str) -> dict[str, float]:
    """Counts from pytest's last summary line (``3 failed, 97 passed, 1 skipped in 49.1s``)."""
    import re

    counts: dict[str, float] = {}
    for line in reversed(log.splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", line) and " in " in line:
            for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", line):
                counts[what.rstrip("s") if what.startswith("error") else what] = float(n)
            m = re.search(r" in ([\d.]+)s", line)
            if m:
                counts["pytest_s"] = float(m.group(1))
            break
    return counts


def verify_log_record(log_path: Path, *, commit: str, gpu: str, date: str, command: str) -> Optional[dict[str, Any]]:
    """A ``verify`` record from a pytest log or a GPU-check log (``ALL PASS`` / ``PASS: 0 failed`` / ``FAIL``)."""
    text = log_path.read_text(errors="replace")
    name = log_path.stem
    fw = "jax" if "jax" in name else "torch" if "torch" in name else "both"
    if name.startswith("pytest"):
        metrics = parse_pytest(text)
        if not metrics:
            return None
        metrics["rc"] = float(1 if metrics.get("failed") or metrics.get("error") else 0)
        op = "pytest"
    else:
        tail = "\n".join(text.splitlines()[-40:])
        if "ALL PASS" in tail or "PASS: 0 failed" in tail:
            rc = 0.0
        elif "FAIL" in tail or "Traceback" in tail:
            rc = 1.0
        else:
            return None
        metrics, op = {"rc": rc}, "check"
    return make_record(suite="verify", op=op, framework=fw, case=name, metrics=metrics, commit=commit, gpu=gpu,
                       date=date, command=command, extra={"tail": "\n".join(text.splitlines()[-8:])[-1500:]})


def rebuild_migrated(root: Path) -> int:
    """Re-derive the records of the migrated runs (``manifest.json`` with ``"migrated": true``) from their raw
    JSON, e.g. after this converter improved: ``python -m benchmarks.harness.convert benchmarks/results``."""
    import json

    from benchmarks.harness.records import write_records

    n = 0
    for man_path in sorted(Path(root).glob("*/*/manifest.json")):
        man = json.loads(man_path.read_text())
        if not man.get("migrated"):
            continue
        folder = man_path.parent
        for old in folder.glob("*/*.jsonl"):
            old.unlink()
        label = man["archive_run"]
        for raw_path in sorted(folder.glob("*/raw/*.json")):
            raw = json.loads(raw_path.read_text())
            kind = kind_of(raw, raw_path.name)
            if kind is None:
                continue
            cmd = (f"{man['legacy_case']}  (legacy script {raw_path.stem}; {label[:3]} {label[3:]} of "
                   f"RESULTS_ARCHIVE.md)")
            recs = convert(raw, kind, commit=man["commit"], gpu=man["gpu"], date=man["date"], command=cmd)
            for r in recs:
                r.setdefault("extra", {}).update(archive_run=label)
            write_records(recs, raw_path.parent.parent / f"{kind}.jsonl")
            n += len(recs)
            # Run 6's session embedded the other benchmarks' JSON in one file (the transfer limit): the selection
            # file carries torch scoring + selective CE, the selective-CE JAX file carries JAX scoring.
            embedded = []
            if kind == "selective_ce_jax" and isinstance(raw.get("scoring"), dict):
                embedded.append((raw["scoring"], "scoring_jax", "scoring"))
            if kind == "selection_torch" and isinstance(raw.get("included"), dict):
                for name, data in raw["included"].items():
                    k = kind_of(data, name) if isinstance(data, dict) and data.get("results") else None
                    if k:
                        embedded.append((data, k, f"included/{name}"))
            for data, k, where in embedded:
                if not data.get("results") or (raw_path.parent / f"bench_{k}.json").exists():
                    continue  # nothing there, or the same run also kept the file itself
                sub = convert(data, k, commit=man["commit"], gpu=man["gpu"], date=man["date"],
                              command=f"{cmd} [embedded: {where}]")
                for r in sub:
                    r.setdefault("extra", {}).update(archive_run=label)
                write_records(sub, raw_path.parent.parent / f"{k}.jsonl")
                n += len(sub)
        for log_path in sorted(folder.glob("verify/raw/*.log")):
            cmd = f"{man['legacy_case']}  ({log_path.name}; {label[:3]} {label[3:]} of RESULTS_ARCHIVE.md)"
            rec = verify_log_record(log_path, commit=man["commit"], gpu=man["gpu"], date=man["date"], command=cmd)
            if rec is not None:
                rec["extra"]["archive_run"] = label
                write_records([rec], folder / "verify" / f"{rec['op']}_{log_path.stem}.jsonl")
                n += 1
    return n


if __name__ == "__main__":
    import sys

    print(rebuild_migrated(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")), "records")
