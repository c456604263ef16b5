"""Carrying wheels to the GPU machine: split a wheel too large for one device call, join it there with its
sha256 checked, install the carried wheels, and the ``.pth`` entries ``pip --target`` leaves unprocessed.

The GPU machine has no registry: a Python package travels as a wheel inside the working tree of a device call,
and one call carries at most 64 MiB (tracked files, untracked non-ignored files and the ``carry`` paths
together). The cutlass DSL's libraries wheel is ~88 MB, so it travels in parts over back-to-back calls while the
machine is warm (ignored files already there are kept between calls) and is joined on the last one::

    python -m benchmarks.harness.wheels split /tmp/wheels/nvidia_cutlass_dsl_libs_cu12-...whl --out .whl/parts/
    python -m benchmarks.harness.wheels plan .whl/                   # the carry list of each device call
    python -m benchmarks.harness.wheels join .whl/parts/ --out /tmp/cggr-wheels/      # on the GPU machine
    python -m benchmarks.harness.wheels pth /tmp/cggr-site/site-packages   # the sys.path entries its .pth add

``split`` writes ``<wheel>.partNNN`` files and ``<wheel>.parts.json`` (the whole wheel's size and sha256, and each
part's); ``join`` refuses (:class:`WheelPartsError`, a ``ValueError``) a missing, truncated or corrupted part or a
joined file whose sha256 differs, naming the file. ``benchmarks/run.py`` does the join, the install and the
``.pth`` processing itself (:func:`install_carried`); ``benchmarks/ANCHORS.md`` has the whole recipe.

Two facts of the GPU machine this module encodes (issue 18):

* ``pip install --target DIR`` does not process the ``.pth`` files it writes into ``DIR`` (only site
  directories are scanned). The cutlass DSL's ``nvidia_cutlass_dsl_packages.pth`` is an ``import`` line that
  puts ``<DIR>/nvidia_cutlass_dsl/dsl_packages`` on ``sys.path``; without it ``import cutlass`` fails.
  :func:`pth_paths` runs ``site.addsitedir(DIR)`` in a child interpreter and returns what it added (path lines
  and ``import`` lines alike, read from the installed files, nothing hard-coded), for ``PYTHONPATH``.
* QuACK (0.6.2 and later) fingerprints its GEMM epilogues and treats a function as installed library code only
  when its file lies under a ``site-packages`` or ``dist-packages`` folder; from any other folder it walks the
  cutlass DSL's mutable globals and fails at import (``epilogue fn depends on <Logger CUTE_DSL>`` ... "has no
  fail-closed semantic key"). The install target therefore ends in ``site-packages`` (:data:`DEFAULT_TARGET`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["DEFAULT_TARGET", "DEFAULT_JOINED", "DEFAULT_PART_MIB", "CALL_LIMIT_MIB", "WheelPartsError",
           "sha256_of", "split", "join_one", "join", "pth_paths", "carried_wheels", "install_carried",
           "carry_plan", "main"]

#: pip's ``--target`` on the GPU machine: a ``site-packages`` folder, so that QuACK's epilogue fingerprinting
#: sees the cutlass DSL as installed code (see the module docstring).
DEFAULT_TARGET = Path("/tmp/cggr-site/site-packages")
#: where ``join`` puts the wheels it rebuilt from parts on the GPU machine (outside the working tree: never
#: carried back, never installed twice from ``.whl/``).
DEFAULT_JOINED = Path("/tmp/cggr-wheels")
#: part size: a device call carries ≤ 64 MiB including the working tree (~9 MiB of tracked files), so a part
#: of 48 MiB leaves room for the tree and the small wheels.
DEFAULT_PART_MIB = 48
CALL_LIMIT_MIB = 64
_MIB = 1 << 20
_MANIFEST_SUFFIX = ".parts.json"
_SCHEMA = "cggr-wheel-parts/1"


class WheelPartsError(ValueError):
    """A wheel's parts cannot be joined into the wheel their manifest describes."""


def sha256_of(path: Path, chunk: int = 8 * _MIB) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def split(wheel: Path, out: Path, part_mib: float = DEFAULT_PART_MIB) -> Path:
    """Cut ``wheel`` into ``<out>/<wheel name>.partNNN`` files of at most ``part_mib`` MiB and write
    ``<out>/<wheel name>.parts.json``; returns the manifest's path. Earlier parts of the same wheel are
    removed first (a re-split with another size must not leave stale parts behind)."""
    wheel, out = Path(wheel), Path(out)
    if not wheel.is_file():
        raise ValueError(f"wheel: {wheel} is not a file")
    if not wheel.name.endswith(".whl"):
        raise ValueError(f"wheel: expected a .whl file, got {wheel.name!r}")
    if not part_mib > 0:
        raise ValueError(f"part_mib: expected a positive size in MiB, got {part_mib!r}")
    part_bytes = max(1, int(part_mib * _MIB))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{wheel.name}.part[0-9][0-9][0-9]"):
        stale.unlink()
    parts = []
    whole = hashlib.sha256()
    with wheel.open("rb") as f:
        i = 0
        while True:
            block = f.read(part_bytes)
            if not block and i > 0:
                break
            name = f"{wheel.name}.part{i:03d}"
            (out / name).write_bytes(block)
            whole.update(block)
            parts.append({"name": name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            i += 1
            if len(block) < part_bytes:
                break
    manifest = {"schema": _SCHEMA, "wheel": wheel.name, "size": wheel.stat().st_size,
                "sha256": whole.hexdigest(), "part_bytes": part_bytes, "parts": parts}
    path = out / (wheel.name + _MANIFEST_SUFFIX)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _manifests(parts_dir: Path) -> list[Path]:
    return sorted(Path(parts_dir).glob("*" + _MANIFEST_SUFFIX))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise WheelPartsError(f"{path}: not a readable parts manifest ({err})") from None
    if m.get("schema") != _SCHEMA or not isinstance(m.get("parts"), list) or not m.get("wheel"):
        raise WheelPartsError(f"{path}: not a {_SCHEMA} manifest")
    return m


def join_one(manifest: Path, out: Path) -> Path:
    """Rebuild the wheel that ``manifest`` (a ``*.parts.json``) describes from the parts beside it into ``out``,
    each part and the whole checked against the manifest's sizes and sha256; returns the wheel's path. Raises
    :class:`WheelPartsError` naming every missing or mismatching part (nothing is written then); a wheel already
    in ``out`` with the right sha256 is kept as it is."""
    manifest, out = Path(manifest), Path(out)
    m = _read_manifest(manifest)
    parts_dir = manifest.parent
    out.mkdir(parents=True, exist_ok=True)
    target = out / m["wheel"]
    if target.is_file() and target.stat().st_size == m["size"] and sha256_of(target) == m["sha256"]:
        return target
    problems = []
    for p in m["parts"]:
        f = parts_dir / p["name"]
        if not f.is_file():
            problems.append(f"{p['name']} missing")
        elif f.stat().st_size != p["size"]:
            problems.append(f"{p['name']} has {f.stat().st_size} bytes, the manifest says {p['size']}")
        elif sha256_of(f) != p["sha256"]:
            problems.append(f"{p['name']} sha256 differs from the manifest's")
    if problems:
        raise WheelPartsError(f"{m['wheel']}: cannot join from {parts_dir}: " + "; ".join(problems)
                              + " (carry those parts again, in calls close enough that the machine stays warm)")
    tmp = target.with_name(target.name + ".joining")
    h = hashlib.sha256()
    with tmp.open("wb") as dst:
        for p in m["parts"]:
            block = (parts_dir / p["name"]).read_bytes()
            h.update(block)
            dst.write(block)
    if h.hexdigest() != m["sha256"] or tmp.stat().st_size != m["size"]:
        tmp.unlink()
        raise WheelPartsError(f"{m['wheel']}: the joined parts' sha256 {h.hexdigest()} differs from the "
                              f"manifest's {m['sha256']}: refused")
    os.replace(tmp, target)
    return target


def join(parts_dir: Path, out: Path) -> list[Path]:
    """:func:`join_one` for every ``*.parts.json`` in ``parts_dir``; returns the wheels' paths. Raises
    :class:`WheelPartsError` when ``parts_dir`` holds no manifest or a wheel cannot be joined."""
    parts_dir = Path(parts_dir)
    if not parts_dir.is_dir():
        raise WheelPartsError(f"parts_dir: {parts_dir} is not a folder")
    manifests = _manifests(parts_dir)
    if not manifests:
        raise WheelPartsError(f"parts_dir: no *{_MANIFEST_SUFFIX} in {parts_dir}")
    return [join_one(m, out) for m in manifests]


_PTH_PROBE = r"""
import json, site, sys
target = sys.argv[1]
before = list(sys.path)
site.addsitedir(target)
added = [p for p in sys.path if p not in before and p != target]
print(json.dumps(added))
"""


def pth_paths(target: Path, python: Optional[str] = None) -> list[str]:
    """The ``sys.path`` entries that the ``.pth`` files in ``target`` add (``site.addsitedir`` in a child
    interpreter, ``python`` or this one: plain path lines and ``import`` lines both, whatever the installed files
    say), in ``sys.path`` order, ``target`` itself left out. Raises ``ValueError`` when the probe fails."""
    target = Path(target)
    if not target.is_dir():
        raise ValueError(f"target: {target} is not a folder")
    if not list(target.glob("*.pth")):
        return []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the target alone decides
    proc = subprocess.run([python or sys.executable, "-c", _PTH_PROBE, str(target)], capture_output=True,
                          text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise ValueError(f"target: processing the .pth files of {target} failed: {proc.stderr.strip()[-800:]}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("[")]
    if not lines:
        raise ValueError(f"target: no result from the .pth probe of {target}: {proc.stdout[-400:]}")
    return [str(p) for p in json.loads(lines[-1])]


def install_carried(wheel_dir: Path, target: Path = DEFAULT_TARGET, joined_dir: Path = DEFAULT_JOINED,
                    python: Optional[str] = None) -> dict[str, Any]:
    """What ``benchmarks/run.py`` does with carried wheels before its steps: join the parts in
    ``<wheel_dir>/parts`` (if any) into ``joined_dir``, ``pip install --no-index --no-deps --target target`` the
    wheels of ``wheel_dir``, of its subfolders (``.whl/anchors/``) and the joined ones, and process the target's
    ``.pth`` files. Returns a report for
    the run's manifest: ``wheels``, ``joined``, ``target``, ``pythonpath`` (the entries to prepend to the steps'
    ``PYTHONPATH``: the target, then the ``.pth`` entries), ``errors`` (each failure with its reason: a baseline
    whose wheel did not arrive is then recorded as not importable, with that reason, by its benchmark)."""
    wheel_dir, target = Path(wheel_dir), Path(target)
    report: dict[str, Any] = {"target": str(target), "wheels": [], "joined": [], "pythonpath": [], "errors": []}
    wheels = carried_wheels(wheel_dir)
    parts = wheel_dir / "parts"
    for mpath in _manifests(parts) if parts.is_dir() else []:  # one wheel at a time: a broken one must not
        try:                                                      # stop the others
            w = join_one(mpath, joined_dir)
        except WheelPartsError as err:
            report["errors"].append(f"join: {err}")
            continue
        report["joined"].append(w.name)
        wheels.append(w)
    if not wheels:
        return report
    report["wheels"] = [w.name for w in wheels]
    by_dist: dict[str, list[str]] = {}
    for w in wheels:  # wheel file names: <distribution>-<version>-...; pip refuses two versions of one
        by_dist.setdefault(w.name.split("-", 1)[0].lower(), []).append(w.name)
    doubles = {d: names for d, names in by_dist.items() if len(names) > 1}
    if doubles:
        report["errors"].append("two versions of one distribution carried (remove the stale ones on the GPU "
                                "machine, e.g. rm -f .whl/parts/*<old version>*): "
                                + "; ".join(", ".join(n) for n in doubles.values()))
        return report
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([python or sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
                          + [str(w) for w in wheels], capture_output=True, text=True)
    if proc.returncode != 0:
        report["errors"].append(f"pip install --target {target} failed (rc {proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
        return report
    report["pythonpath"] = [str(target)]
    try:
        report["pythonpath"] += pth_paths(target, python)
    except ValueError as err:
        report["errors"].append(f"pth: {err}")
    return report


def carried_wheels(wheel_dir: Path) -> list[Path]:
    """The wheels of ``wheel_dir`` and of its subfolders one level down (``.whl/anchors/*.whl``: a group that
    travels as one ``carry`` path), never the parts folder's files."""
    wheel_dir = Path(wheel_dir)
    return sorted(wheel_dir.glob("*.whl")) + sorted(w for w in wheel_dir.glob("*/*.whl") if w.parent.name != "parts")


def carry_plan(wheel_dir: Path, tree_mib: float, limit_mib: float = CALL_LIMIT_MIB) -> list[list[str]]:
    """The ``carry`` list of each device call (paths relative to the repository root, ``.whl/...``), packed in
    order so that each call's carried bytes plus ``tree_mib`` (the working tree that travels anyway) stay within
    ``limit_mib``, with at most 8 paths a call (the device tool's limit). The units: each part of
    ``<wheel_dir>/parts`` (the first one with its wheel's ``.parts.json``: files carried by an earlier call stay on
    the warm machine), each wheel of ``wheel_dir``, and each subfolder holding wheels as one path. Raises
    ``ValueError`` when one unit alone does not fit."""
    wheel_dir = Path(wheel_dir)
    if not wheel_dir.is_dir():
        raise ValueError(f"wheel_dir: {wheel_dir} is not a folder")
    budget = (limit_mib - tree_mib) * _MIB
    rel = lambda p: f"{wheel_dir.name}/{p.relative_to(wheel_dir).as_posix()}"  # noqa: E731
    parts_dir = wheel_dir / "parts"
    units: list[tuple[list[str], int, str]] = []  # (paths, bytes, name for the error)
    for mpath in _manifests(parts_dir) if parts_dir.is_dir() else []:
        for i, p in enumerate(_read_manifest(mpath)["parts"]):
            f = parts_dir / p["name"]
            paths = ([rel(mpath)] if i == 0 else []) + [rel(f)]
            units.append((paths, p["size"] + (mpath.stat().st_size if i == 0 else 0), p["name"]))
    for w in sorted(wheel_dir.glob("*.whl")):
        units.append(([rel(w)], w.stat().st_size, w.name))
    for sub in sorted(d for d in wheel_dir.iterdir() if d.is_dir() and d.name != "parts"):
        files = [f for f in sub.rglob("*") if f.is_file()]
        if any(f.suffix == ".whl" for f in files):
            units.append(([rel(sub)], sum(f.stat().st_size for f in files), sub.name + "/"))
    calls: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for paths, size, name in units:
        if size > budget:
            raise ValueError(f"tree_mib: {name} ({size / _MIB:.1f} MiB) does not fit one call of {limit_mib} MiB "
                             f"with a {tree_mib} MiB working tree; split it smaller (--part-mib)")
        if cur and (used + size > budget or len(cur) + len(paths) > 8):
            calls.append(cur)
            cur, used = [], 0
        cur += paths
        used += size
    if cur or not calls:
        calls.append(cur)
    return calls


def _tree_mib(root: Path) -> float:
    """Tracked + untracked-not-ignored files of the git checkout at ``root``, MiB (what a device call sends)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, timeout=60)
    if out.returncode != 0:
        raise ValueError(f"root: {root} is not a git checkout")
    total = 0
    for name in out.stdout.split(b"\0"):
        p = root / name.decode(errors="replace")
        if name and p.is_file():
            total += p.stat().st_size
    return total / _MIB


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness.wheels", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut a wheel into parts + a sha256 manifest")
    s.add_argument("wheel", type=Path)
    s.add_argument("--out", type=Path, default=Path(".whl/parts"))
    s.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB)
    j = sub.add_parser("join", help="rebuild the wheels from their parts, sha256 checked (on the GPU machine)")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("--out", type=Path, default=DEFAULT_JOINED)
    t = sub.add_parser("pth", help="the sys.path entries the .pth files of a pip --target folder add")
    t.add_argument("target", type=Path)
    pl = sub.add_parser("plan", help="the carry list of each device call for the parts and wheels of a folder")
    pl.add_argument("wheel_dir", type=Path, nargs="?", default=Path(".whl"))
    pl.add_argument("--tree-mib", type=float, default=None,
                    help="size of the working tree that travels anyway (default: measured with git)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            m = split(args.wheel, args.out, args.part_mib)
            man = json.loads(m.read_text())
            print(f"{man['wheel']}: {man['size'] / _MIB:.1f} MiB, sha256 {man['sha256']}, "
                  f"{len(man['parts'])} part(s) in {args.out}")
            for p in man["parts"]:
                print(f"  {p['name']}  {p['size'] / _MIB:.1f} MiB")
        elif args.cmd == "join":
            for w in join(args.parts_dir, args.out):
                print(f"joined {w} ({w.stat().st_size / _MIB:.1f} MiB, sha256 checked)")
        elif args.cmd == "pth":
            for p in pth_paths(args.target):
                print(p)
        else:
            tree = args.tree_mib if args.tree_mib is not None else _tree_mib(Path.cwd())
            calls = carry_plan(args.wheel_dir, tree)
            print(f"# working tree {tree:.1f} MiB; {len(calls)} device call(s), back to back while the machine is "
                  f"warm; the last one runs the benchmark")
            for i, c in enumerate(calls, 1):
                print(f"call {i}: carry {json.dumps(c)}")
    except ValueError as err:  # WheelPartsError included: a clear message, exit status 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
