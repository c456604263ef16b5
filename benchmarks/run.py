#!/usr/bin/env python
"""The ONE GPU runner of the CGGR benchmarks: named suites, one results folder, one archive back.

    python -m benchmarks.run --list                          # suites, their steps and expected times
    python -m benchmarks.run verify kernels --dry-run        # the commands, nothing run
    python -m benchmarks.run verify kernels --trim --commit <sha> --out-tar $OUT/results.tgz
    python -m benchmarks.run quality -- --scale S --round round2 --deadline-s 530

Suites (``--list`` prints the steps):

* ``verify``  - the GPU tests of both packages, compiled (``pytest tests/torch``, ``tests/jax``, ``tests/parity``
  without ``TRITON_INTERPRET``, whole), the real-size kernel checks ``verify_torch.py`` / ``verify_jax.py``,
  and on ≥ 2 GPUs the data-parallel checks ``verify_dp_torch.py`` / ``verify_dp_jax.py``;
* ``kernels`` - scoring, selective cross-entropy and selection (both frameworks; N = 16384, V = 128256 and
  131072, bf16), every baseline (copy floors, Liger CE, torch.compile CE, optax) measured in the same run;
* ``heads``   - the fused LM head + selective CE (N = 16384, d = 2048, V = 128256), both frameworks; per-token
  log-probs + entropy + the policy-gradient backward (``token_stats``, issue 17: a Qwen-style head, N = 16384,
  d = 4096, V = 151936, bf16, ρ = 0.2 and 1) against TRL's materialised path and the fused alternatives whose
  packages are importable (TRL's chunked head, Liger's GRPO loss: carry their wheels), both frameworks;
* ``models``  - batch splitting, whole training step (134.5M Llama-style, B = 64, T = 1024), both frameworks;
* ``step``    - the whole training step users run (issue 16): Hugging Face Llama (PyTorch, eager and
  ``torch.compile``) and ``DecoderLM`` (JAX, ``jit``) at the Llama-3.2-1B, SmolLM-135M and Qwen-vocabulary
  shapes, bf16, AdamW: standard, Liger, ``CGGRLoss``, the fused head, ``CGGRModel`` (router 1/2/4 layers and
  the cheaper routers of SPEC §9.3: a 1-layer router with ``router_positions``, ``router_samples``,
  ``router_prefix``, ``router_compile``), a random subset (``benchmarks/step.py``; its default row selection).
  One step per framework and shape; one device call fits one shape in both frameworks (``step --deadline-min
  9`` runs the 1B shape, ``--only step_torch_135m,step_jax_135m`` the next);
* ``quality`` - delegates to ``python -m benchmarks.quality.study`` with the arguments after ``--``
  (``benchmarks/quality/README.md``; the study's own results live in ``benchmarks/quality/results``);
* ``anchors`` - issue 18's external anchors beside ours in one process (``benchmarks/ops/anchors_torch.py``):
  QuACK's CE (autograd and ``inplace_backward``) and linear CE, Liger's CE and fused linear CE, against
  ``CGGRLoss`` topk and the fused LM head at N = 16384, V = 128256 (d = 2048 and 4096), bf16. QuACK needs the
  cutlass DSL, carried as wheels in parts: ``benchmarks/ANCHORS.md`` has the recipe and the device commands.

Everything a run writes goes under ONE folder, ``benchmarks/results/<gpu>/<date>_<commit>/`` (``--run-folder``
to change it): ``manifest.json`` (commit, GPU, software, clocks/power before and after, every step's command,
exit status and wall time), ``<suite>/<op>_<framework>.jsonl`` (records), ``<suite>/raw/`` (each script's own
JSON), ``<suite>/logs/<step>.log``. ``--out-tar`` packs that folder (paths relative to the repository root,
so ``tar xzf results.tgz`` at the root puts it in place); the device tool brings back at most 8 files.

The correctness steps of ``verify`` (the three pytest runs and the two real-size checks) run at the same time
on the one GPU (nothing in them is timed; ``--serial`` to run them one by one); benchmarks always run alone.
``--deadline-min`` bounds the whole call: a step is started only if its expected time fits what is left, and
each step's timeout is cut to what is left, so the archive is always written. ``--trim`` runs the cheaper
variant of each step (no launch sweeps, one vocabulary size, ``--skip-big`` checks). On the GPU machine the
working tree has no ``.git``: pass ``--commit`` (or set ``CGGR_COMMIT``). Carried wheels in ``.whl/``
(liger-kernel, cut-cross-entropy, QuACK and the cutlass DSL) and the wheels joined from ``.whl/parts/`` (sha256
checked) are installed into ``/tmp/cggr-site/site-packages`` first and the ``.pth`` files pip leaves there
unprocessed are applied to the steps' ``PYTHONPATH`` (``benchmarks/harness/wheels.py``); the manifest's
``carried_wheels`` says what was installed and what failed. Nothing is fetched.

Back here, ``python -m benchmarks.run --unpack results.tgz`` unpacks a call's archive at the repository root and
merges its ``manifest.json`` with one already there (an earlier call of the same commit and day, on another
machine) instead of overwriting it (``benchmarks.harness.records.unpack_results``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make the repository importable
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path.pop(0)
    sys.path.insert(0, os.path.dirname(_here))

from benchmarks.harness import env as _env  # noqa: E402
from benchmarks.harness.convert import parse_pytest  # noqa: E402,F401  (re-exported: the runner's records)
from benchmarks.harness import wheels as _wheels  # noqa: E402
from benchmarks.harness.records import (RESULTS_ROOT, make_record, manifest_calls, run_dir,  # noqa: E402
                                        unpack_results, write_records)

ROOT = _env.REPO_ROOT
PY = "python"  # replaced by sys.executable when run; kept literal in --dry-run output for copy-paste


@dataclass
class Step:
    """One command of a suite. ``est_s``/``trim_est_s``: expected wall time on one H200 (seconds, including
    imports and compilation) - from the step limits and logs of the earlier sessions (RESULTS_ARCHIVE.md),
    rounded up. ``argv`` may use ``{run}`` (the run folder), ``{commit}``, ``{py}``."""

    name: str
    argv: list[str]
    est_s: int
    timeout_s: int
    trim_argv: Optional[list[str]] = None  # None: the same command when trimmed
    trim_est_s: Optional[int] = None
    kind: str = "op"  # "op" (writes records itself) | "pytest" | "check"
    framework: str = "both"
    min_gpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    parallel: Optional[str] = None  # consecutive steps with the same group run at the same time
    # pytest steps: their share of --pytest-workers (the JAX tests compile on the CPU for most of their time, and the
    # GPU machine has 16 cores for the three concurrent pytest runs)
    xdist_scale: float = 1.0


    def command(self, trim: bool) -> list[str]:
        return list(self.trim_argv) if trim and self.trim_argv is not None else list(self.argv)

    def estimate(self, trim: bool) -> int:
        return self.trim_est_s if trim and self.trim_est_s is not None else self.est_s


def _op(op: str, fw: str, extra: Sequence[str] = (), trim_extra: Optional[Sequence[str]] = None, *, est: int,
        trim_est: Optional[int] = None, timeout: int, note: str = "") -> Step:
    base = ["{py}", f"benchmarks/{op}.py", "--framework", fw, "--run-folder", "{run}", "--commit", "{commit}"]
    return Step(name=f"{op}_{fw}", argv=base + list(extra),
                trim_argv=None if trim_extra is None else base + list(trim_extra), est_s=est,
                trim_est_s=trim_est, timeout_s=timeout, kind="op", framework=fw, note=note)


def _step_op(fw: str, shape: str, deadline_s: int) -> Step:
    """One shape of the whole-step benchmark (``benchmarks/step.py``) in one framework: its records go to
    ``step/step_<shape>_<framework>.jsonl``, so the shapes can run in separate calls into one run folder.
    ``--trim``: the eager rows only (PyTorch) / the baselines and the goal rows (JAX)."""
    base = ["{py}", "benchmarks/step.py", "--framework", fw, "--run-folder", "{run}", "--commit", "{commit}",
            "--shapes", shape]
    trim = (["--eager-only", "--deadline-s", "100"] if fw == "torch" else
            ["--rows", "standard,cggr_fused,random_subset,batch_split_L4", "--deadline-s", "150"])
    return Step(name=f"step_{fw}_{shape}", argv=base + ["--deadline-s", str(deadline_s)], trim_argv=base + trim,
                est_s=deadline_s + 25, trim_est_s=(125 if fw == "torch" else 175), timeout_s=deadline_s + 150,
                kind="op", framework=fw,
                note=f"--deadline-s {deadline_s}: rows that do not fit are recorded as skipped")


#: Correctness steps share the GPU and run at the same time (16 CPU cores; JAX compiles dominate): nothing in
#: them is timed, and JAX must not preallocate 75 % of the GPU in each process.
_CHECK_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _pytest(name: str, paths: list[str], fw: str, est: int, timeout: int, xdist_scale: float = 1.0) -> Step:
    # --durations: the log names the slowest tests, so the next GPU run can be made shorter where it matters
    return Step(name=name, argv=["{py}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra", "--durations=25",
                                 "{xdist}"] + paths,
                est_s=est, timeout_s=timeout, kind="pytest", framework=fw, env=dict(_CHECK_ENV), parallel="checks",
                note="compiled (TRITON_INTERPRET unset), whole directory", xdist_scale=xdist_scale)


SUITES: dict[str, tuple[str, list[Step]]] = {
    "verify": ("GPU tests of both packages compiled (whole), real-size kernel checks, data-parallel checks", [
        _pytest("pytest_jax", ["tests/jax"], "jax", est=300, timeout=480, xdist_scale=5 / 3),
        _pytest("pytest_torch", ["tests/torch"], "torch", est=200, timeout=480),
        _pytest("pytest_parity", ["tests/parity"], "both", est=90, timeout=300),
        Step("verify_torch", ["{py}", "benchmarks/verify_torch.py"], est_s=130, timeout_s=300, kind="check",
             framework="torch", trim_argv=["{py}", "benchmarks/verify_torch.py", "--skip-big"], trim_est_s=100,
             env=dict(_CHECK_ENV), parallel="checks", note="--trim: without the N·V > 2^31 case"),
        Step("verify_jax", ["{py}", "benchmarks/verify_jax.py"], est_s=120, timeout_s=300, kind="check",
             framework="jax", env=dict(_CHECK_ENV), parallel="checks"),
        Step("verify_dp_torch", ["{py}", "benchmarks/verify_dp_torch.py", "--out", "{run}/verify/raw/dp_torch.json"],
             est_s=150, timeout_s=300, kind="check", framework="torch", min_gpus=2,
             trim_argv=["{py}", "benchmarks/verify_dp_torch.py", "--skip-perf", "--out",
                        "{run}/verify/raw/dp_torch.json"], trim_est_s=60),
        Step("verify_dp_jax", ["{py}", "benchmarks/verify_dp_jax.py", "--out", "{run}/verify/raw/dp_jax.json"],
             est_s=150, timeout_s=300, kind="check", framework="jax", min_gpus=2,
             trim_argv=["{py}", "benchmarks/verify_dp_jax.py", "--skip-perf", "--out", "{run}/verify/raw/dp_jax.json"],
             trim_est_s=60),
    ]),
    "kernels": ("scoring, selective CE, selection at N = 16384, V = 128256 / 131072 bf16, same-run baselines", [
        _op("scoring", "torch", [], ["--no-sweep", "--vocab", "128256"], est=60, trim_est=25, timeout=200),
        _op("scoring", "jax", [], ["--no-sweep", "--vocab", "128256"], est=100, trim_est=35, timeout=240),
        _op("selective_ce", "torch", ["--compile"], ["--no-sweep", "--vocab", "128256"], est=120, trim_est=45,
            timeout=300, note="--compile: the torch.compile CE baseline (full only)"),
        _op("selective_ce", "jax", ["--scoring-json", "{run}/kernels/raw/scoring_jax.json"],
            ["--no-sweep", "--vocab", "128256"], est=130, trim_est=50, timeout=300),
        _op("selection", "torch", [], ["--sizes", "16384"], est=40, trim_est=25, timeout=150),
    ]),
    "heads": ("fused LM head + selective CE (N = 16384, d = 2048, V = 128256 bf16); per-token log-probs + entropy "
              "+ policy-gradient backward (N = 16384, d = 4096, V = 151936 bf16, rho 0.2 and 1); both frameworks", [
        _op("fused_linear", "torch", ["--budgets", "0.5"], ["--budgets"], est=150, trim_est=80, timeout=300),
        _op("fused_linear", "jax", [], ["--budgets"], est=110, trim_est=70, timeout=250),
        # token_stats: 7-9 methods (TRL materialised, our two paths at each rho; TRL chunked / Liger GRPO when
        # importable), each one call for the peak memory, 2 warm-ups and ~2 s of timed calls; JAX compiles 6
        # programs (~15 s each). --trim: ~0.6 s of timed calls per method.
        _op("token_stats", "torch", [], ["--budget-ms", "600"], est=90, trim_est=60, timeout=300,
            note="issue 17; --trim: --budget-ms 600"),
        _op("token_stats", "jax", [], ["--budget-ms", "600"], est=150, trim_est=120, timeout=330,
            note="issue 17; --trim: --budget-ms 600"),
    ]),
    "models": ("batch splitting, whole training step with AdamW (134.5M, B = 64, T = 1024 bf16)", [
        _op("batch_split", "torch", ["--batch-size", "64", "--router-layers", "2,4", "--router-path", "auto",
                                     "--warmup", "10", "--steps", "60"],
            ["--batch-size", "64", "--router-layers", "4", "--router-path", "auto", "--steps", "20"],
            est=200, trim_est=100, timeout=330),
        _op("batch_split", "jax", ["--batch-size", "64", "--router-layers", "2,4", "--router-path", "auto"],
            ["--batch-size", "64", "--router-layers", "4", "--router-path", "auto"], est=230, trim_est=130,
            timeout=330),
    ]),
    "step": ("whole training step (fwd + bwd + AdamW, bf16), PyTorch eager/compiled and JAX jit, one step per shape "
             "and framework", [
        # One device call fits one shape in both frameworks (~8.5 min); the other shapes: --only their steps.
        # Each script stops starting rows at its --deadline-s (skipped rows are records with the reason).
        # PyTorch: step.py's default rows (DEFAULT_ROWS: 24 at 1B incl. the cheaper routers; 235 s measured for
        # the 16 earlier rows + ~40 s estimated for the 8 new ones); JAX: its default rows in budget order (the
        # 1B budget reaches its first rows, the rest are recorded as skipped).
        _step_op("torch", "1b", 300), _step_op("jax", "1b", 190),
        _step_op("torch", "135m", 300), _step_op("jax", "135m", 190),
        _step_op("torch", "qwen", 300), _step_op("jax", "qwen", 190),
    ]),
    "quality": ("the quality study: python -m benchmarks.quality.study <arguments after -->", [
        Step("quality", ["{py}", "-m", "benchmarks.quality.study", "{quality_args}"], est_s=420, timeout_s=590,
             kind="check", framework="both", note="the estimate depends on the arguments (--deadline-s)"),
    ]),
    "anchors": ("QuACK CE / linear CE and Liger CE / FLCE beside CGGRLoss topk and the fused head, one process "
                "(N = 16384, V = 128256, d = 2048 and 4096 bf16; carry the wheels: benchmarks/ANCHORS.md)", [
        # CE: 7 rows of ~2-6 ms (~1 s each with warm-up and the 200 ms budget, plus QuACK's first compile,
        # ~20-40 s per kernel variant); linear CE: 5 rows x 2 widths of 25-95 ms x 14 calls (~1.5 s each) plus
        # compiles. --trim: d = 2048 only and shorter budgets.
        Step("anchors_torch", ["{py}", "benchmarks/ops/anchors_torch.py", "--run-folder", "{run}", "--commit",
                               "{commit}"],
             trim_argv=["{py}", "benchmarks/ops/anchors_torch.py", "--run-folder", "{run}", "--commit", "{commit}",
                        "--d", "2048", "--budget-ms", "100", "--iters", "6"],
             est_s=200, trim_est_s=120, timeout_s=420, kind="op", framework="torch",
             note="rows that cannot import or run are recorded with the reason"),
    ]),
}


def gpu_count() -> int:
    if os.environ.get("CGGR_GPU_COUNT"):
        return int(os.environ["CGGR_GPU_COUNT"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def scale_workers(xdist: Sequence[str], scale: float) -> list[str]:
    """``xdist`` (``-n N --dist ...``) with ``N`` scaled by ``scale`` (at least 1); anything else unchanged."""
    out = list(xdist)
    if scale != 1.0 and "-n" in out:
        i = out.index("-n") + 1
        out[i] = str(max(1, round(int(out[i]) * scale)))
    return out


def expand(step: Step, *, trim: bool, run: Path, commit: str, py: str, quality_args: Sequence[str],
           xdist: Sequence[str], quick: bool = False) -> list[str]:
    out: list[str] = []
    for a in step.command(trim):
        if a == "{quality_args}":
            qa = list(quality_args)
            if "--out" not in qa:
                qa += ["--out", str(run / "quality")]
            out += qa
        elif a == "{xdist}":
            out += scale_workers(xdist, step.xdist_scale)
        else:
            out.append(a.replace("{run}", str(run)).replace("{commit}", commit).replace("{py}", py))
    if quick and step.kind == "op":
        out.append("--quick")  # the op scripts' CPU script check (tests/test_benchmarks.py)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("suites", nargs="*", help=f"suites to run, in order: {', '.join(SUITES)}")
    p.add_argument("--list", action="store_true", help="list suites, steps and expected times")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the expected time only")
    p.add_argument("--trim", action="store_true", help="the cheaper variant of every step (see --list)")
    p.add_argument("--only", default=None, help="comma-separated step names to run (others skipped)")
    p.add_argument("--skip", default=None, help="comma-separated step names to skip")
    p.add_argument("--commit", default=None, help="commit of the figures (default $CGGR_COMMIT or git)")
    p.add_argument("--run-folder", type=Path, default=None,
                   help="default benchmarks/results/<gpu>/<date>_<commit>")
    p.add_argument("--out-tar", type=Path, default=None, help="pack the run folder into this .tgz at the end")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="whole-call budget: start a step only if its estimate fits, cut its timeout to what is left")
    p.add_argument("--serial", action="store_true", help="run the verify steps one after another")
    p.add_argument("--pytest-workers", type=int, default=3,
                   help="pytest-xdist workers for the verify suite when xdist is installed (0: none)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (script checks; not for figures)")
    p.add_argument("--quick", action="store_true", help="pass --quick to the op benchmarks (CPU script checks)")
    p.add_argument("--unpack", type=Path, default=None, metavar="TGZ",
                   help="here, after a device call: unpack its results archive at the repository root, merging "
                        "manifest.json with the one already there (no suites run)")
    return p


def batches(steps: Sequence[Step], serial: bool) -> list[list[Step]]:
    """Consecutive steps of one ``parallel`` group form one batch (all started together); others alone."""
    out: list[list[Step]] = []
    for st in steps:
        if not serial and st.parallel and out and out[-1][0].parallel == st.parallel:
            out[-1].append(st)
        else:
            out.append([st])
    return out


def expected_s(steps: Sequence[Step], trim: bool, serial: bool) -> int:
    """Expected wall time: a parallel batch costs its longest step plus 20 % for sharing the GPU and CPUs."""
    total = 0.0
    for b in batches(steps, serial):
        total += b[0].estimate(trim) if len(b) == 1 else 1.2 * max(s.estimate(trim) for s in b)
    return int(total)


def list_suites(trim: bool) -> None:
    for name, (desc, steps) in SUITES.items():
        total = expected_s([s for s in steps if s.min_gpus <= 1], trim, False)
        print(f"{name}: {desc}\n  expected on one H200{' (--trim)' if trim else ''}: ~{total / 60:.1f} min")
        for s in steps:
            gpus = f", needs {s.min_gpus} GPUs" if s.min_gpus > 1 else ""
            gpus += ", concurrent with the other checks" if s.parallel else ""
            print(f"  - {s.name:18s} ~{s.estimate(trim):4d} s (timeout {s.timeout_s} s{gpus})"
                  f"{'  ' + s.note if s.note else ''}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quality_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, quality_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if args.list:
        list_suites(args.trim)
        return 0
    if args.unpack is not None:
        if args.suites:
            print("error: --unpack runs no suites; name none", file=sys.stderr)
            return 2
        try:
            folders = unpack_results(args.unpack, ROOT)
        except (OSError, ValueError, tarfile.TarError) as err:  # unreadable archive, unsafe member
            print(f"error: --unpack {args.unpack}: {err}", file=sys.stderr)
            return 2
        for f in folders:
            calls = manifest_calls(json.loads((f / "manifest.json").read_text()))
            print(f"unpacked {f} ({len(calls)} call(s) in its manifest)")
        return 0
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown or not args.suites:
        print(f"error: name suites among {', '.join(SUITES)} (got {args.suites}); --list shows them", file=sys.stderr)
        return 2
    t_start = time.time()
    deadline = None if args.deadline_min is None else t_start + 60 * args.deadline_min
    commit = _env.commit(args.commit)
    gpu = _env.gpu_name()
    n_gpus = gpu_count()
    date = _env.today()
    run = args.run_folder or run_dir(RESULTS_ROOT, gpu, date, commit)
    run = Path(run).resolve() if not args.dry_run else Path(run)
    py = PY if args.dry_run else sys.executable
    has_xdist = importlib.util.find_spec("xdist") is not None
    xdist = ["-n", str(args.pytest_workers), "--dist", "loadfile"] if has_xdist and args.pytest_workers > 0 else []
    if args.dry_run and not xdist and args.pytest_workers > 0:
        xdist = [f"[-n {args.pytest_workers} --dist loadfile if pytest-xdist is installed]"]
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    plan = []
    for suite in args.suites:
        for st in SUITES[suite][1]:
            why = None
            if only is not None and st.name not in only:
                why = "not in --only"
            elif st.name in skip:
                why = "--skip"
            elif st.min_gpus > (max(n_gpus, 1) if args.dry_run or args.allow_cpu else n_gpus):
                why = f"needs {st.min_gpus} GPUs, this machine has {n_gpus}"
            plan.append((suite, st, why))
    total = expected_s([st for _, st, why in plan if why is None], args.trim, args.serial)

    if args.dry_run:
        print(f"# run folder: {run}\n# commit {commit}, gpu {gpu}, {n_gpus} GPU(s); expected ~{total / 60:.1f} min"
              f"{' (--trim)' if args.trim else ''}")
        for b in batches([st for _, st, why in plan if why is None], args.serial):
            if len(b) > 1:
                print(f"# concurrently (one batch, ~{int(1.2 * max(s.estimate(args.trim) for s in b))} s): "
                      + ", ".join(s.name for s in b))
        for suite, st, why in plan:
            cmd = expand(st, trim=args.trim, run=run, commit=commit, py=py, quality_args=quality_args,
                         xdist=xdist if st.kind == "pytest" else (), quick=args.quick)
            prefix = f"# [{suite}/{st.name}] ~{st.estimate(args.trim)} s, timeout {st.timeout_s} s"
            print(prefix + (f" - SKIPPED: {why}" if why else ""))
            if not why:
                print(" ".join(shlex.quote(c) for c in cmd))
        if args.out_tar:
            print(f"# then: tar czf {args.out_tar} -C {ROOT} <run folder relative to the repository root>")
        return 0

    if n_gpus == 0 and not args.allow_cpu:
        print("error: no GPU found (nvidia-smi); --allow-cpu runs the steps anyway (script checks only)",
              file=sys.stderr)
        return 2
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for k in ("TRITON_INTERPRET", "JAX_PLATFORMS") if not args.allow_cpu else ():
        env.pop(k, None)  # compiled kernels, JAX on the GPU
    env.update(PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", CGGR_COMMIT=commit)
    pypath = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    carried = None
    if (ROOT / ".whl").is_dir():  # baselines and anchors carried as wheels (no registry on the GPU machine)
        carried = _wheels.install_carried(ROOT / ".whl")
        pypath += carried["pythonpath"]  # the target, then what its .pth files add (pip --target skips them)
        for err in carried["errors"]:
            print(f"carried wheels: {err}", file=sys.stderr, flush=True)
    env["PYTHONPATH"] = os.pathsep.join(pypath)

    manifest = {"schema": "cggr-bench-run/1", "commit": commit, "gpu": gpu, "gpus": n_gpus, "date": date,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv)
                + (" -- " + " ".join(shlex.quote(a) for a in quality_args) if quality_args else ""),
                "trim": args.trim, "suites": args.suites, "expected_s": total,
                "software": _software(env), "carried_wheels": carried, "telemetry_before": _env.telemetry(),
                "steps": []}
    mpath = run / "manifest.json"
    if mpath.exists():  # a second call for the same commit on the same day: keep the earlier calls' manifests
        try:
            manifest["earlier_calls"] = manifest_calls(json.loads(mpath.read_text()))
        except ValueError:
            pass
    print(f"run folder {run}\ncommit {commit}, {gpu} x{n_gpus}; expected ~{total / 60:.1f} min", flush=True)
    failures = 0
    suite_of = {id(st): suite for suite, st, _ in plan}
    why_of = {id(st): why for _, st, why in plan}
    for batch in batches([st for _, st, _ in plan], args.serial):
        running = []
        to_run = [st.estimate(args.trim) for st in batch if why_of[id(st)] is None]
        estimate = max(to_run) if to_run else 0  # the batch's longest step that will run
        for st in batch:
            suite, why = suite_of[id(st)], why_of[id(st)]
            entry = {"suite": suite, "step": st.name, "estimate_s": st.estimate(args.trim)}
            if why is None and deadline is not None:
                left = deadline - time.time()
                if left < estimate * 0.8 + 10:
                    why = f"deadline: {left:.0f} s left, step expects {st.estimate(args.trim)} s"
            if why is not None:
                entry["skipped"] = why
                print(f"=== {suite}/{st.name}: SKIPPED ({why})", flush=True)
                manifest["steps"].append(entry)
                continue
            running.append(_start(st, suite, entry, args, run, commit, quality_args, xdist, env, deadline))
        finished: dict[int, tuple[int, float]] = {}  # index in running -> (rc, wall s), in finishing order
        while len(finished) < len(running):
            for i, (st, suite, entry, proc, log, t0, timeout) in enumerate(running):
                if i in finished:
                    continue
                rc = proc.poll()
                if rc is None and time.time() - t0 > timeout:
                    os.killpg(proc.pid, 9)  # the step's own process group (started by _start), nothing else
                    proc.wait()
                    rc = 124
                if rc is not None:
                    finished[i] = (rc, time.time() - t0)
                    print(f"... {suite}/{st.name} finished: rc={rc} in {finished[i][1]:.0f} s", flush=True)
            if len(finished) < len(running):
                time.sleep(0.5)
        for i in finished:  # report in finishing order
            st, suite, entry, proc, log, t0, timeout = running[i]
            rc, wall = finished[i]
            text = log.read_text(errors="replace")
            tail = "\n".join(text.splitlines()[-15:])
            print(f"--- {suite}/{st.name} (log tail)\n{tail}\n=== {suite}/{st.name} rc={rc} in {wall:.0f} s",
                  flush=True)
            entry.update(rc=rc, wall_s=round(wall, 1), timed_out=rc == 124)
            failures += int(rc != 0)
            if st.kind in ("pytest", "check"):
                metrics: dict[str, float] = {"rc": float(rc), "wall_s": wall}
                if st.kind == "pytest":
                    metrics.update(parse_pytest(text))
                rec = make_record(suite=suite if suite in ("verify", "quality") else "verify", op=st.kind,
                                  framework=st.framework, case=st.name, metrics=metrics, commit=commit, gpu=gpu,
                                  date=date, command=entry["command"], extra={"tail": tail[-2000:]})
                out = run / suite / f"{st.kind}_{st.name}.jsonl"
                if out.exists():
                    out.unlink()
                write_records([rec], out)
            manifest["steps"].append(entry)
            mpath.write_text(json.dumps(manifest, indent=2) + "\n")  # a run cut short keeps what it did
    manifest.update(telemetry_after=_env.telemetry(), wall_s=round(time.time() - t_start, 1), failures=failures)
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done in {time.time() - t_start:.0f} s, {failures} failing step(s); {run}")
    if args.out_tar:
        args.out_tar.parent.mkdir(parents=True, exist_ok=True)
        try:
            arc = run.relative_to(ROOT)
        except ValueError:
            arc = Path(run.name)
        with tarfile.open(args.out_tar, "w:gz") as tar:
            tar.add(run, arcname=str(arc), filter=lambda ti: None if "/cache" in ti.name else ti)
        print(f"wrote {args.out_tar} ({args.out_tar.stat().st_size / 1e6:.1f} MB; extract at the repository root)")
    return 1 if failures else 0


def _start(st: Step, suite: str, entry: dict, args: argparse.Namespace, run: Path, commit: str,
           quality_args: Sequence[str], xdist: Sequence[str], env: dict[str, str], deadline: Optional[float]):
    """Start one step in its own process group, output to ``<run>/<suite>/logs/<step>.log``."""
    cmd = expand(st, trim=args.trim, run=run, commit=commit, py=sys.executable, quality_args=quality_args,
                 xdist=xdist if st.kind == "pytest" else (), quick=args.quick)
    timeout = st.timeout_s if deadline is None else max(10, min(st.timeout_s, int(deadline - time.time() - 5)))
    log = run / suite / "logs" / f"{st.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    (run / suite / "raw").mkdir(parents=True, exist_ok=True)
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"=== {suite}/{st.name} ({time.strftime('%H:%M:%S')}, ~{st.estimate(args.trim)} s, timeout {timeout} s)"
          f"\n{line}", flush=True)
    entry["command"] = line
    f = log.open("w")
    f.write("$ " + line + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **st.env}, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)
    f.close()  # the child holds its own descriptor
    return st, suite, entry, proc, log, time.time(), timeout


def _software(env: dict[str, str]) -> dict[str, str]:
    """Installed versions (package metadata: nothing imported, so this is instant), including the carried
    wheels in ``/tmp/site`` when they were installed."""
    from importlib import metadata

    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + sys.path
    out = {}
    for dist in ("torch", "triton", "jax", "jaxlib", "flax", "optax", "transformers", "liger-kernel",
                 "cut-cross-entropy", "pytest-xdist", "quack-kernels", "nvidia-cutlass-dsl",
                 "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core", "nvidia-cutlass-dsl-libs-cu12",
                 "nvidia-cutlass-dsl-libs-cu13", "apache-tvm-ffi", "torch-c-dlpack-ext"):
        found = next(iter(metadata.distributions(name=dist, path=paths)), None)
        out[dist] = found.version if found is not None else "absent"
    return out


if __name__ == "__main__":
    sys.exit(main())
