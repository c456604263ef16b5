"""The mirror, checked: both packages expose the names and signatures that CONTRIBUTING.md's table lists.

CONTRIBUTING.md's section "The mirror" is the source of truth. Each row of its first table is
``| `module` | `name`, `name`, ... |``; both ``cggr_torch.<module>`` and ``cggr_jax.<module>`` must define
every name, list it in ``__all__``, and list nothing else there. For every name that is callable in both
packages the parameters (names, kinds, defaults) must agree, except for the differences its second table
("Documented differences": ``| `module.name` | torch | jax | why |``) names. Framework-only names live in the
third table (``| `module` | `name`, ... | torch or jax | why |``). A new public name, a renamed argument or a
changed default in one package only makes this test fail until the table says why.
"""
from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TICKED = re.compile(r"`([^`]+)`")


def _tables() -> list[list[list[str]]]:
    """The markdown tables of CONTRIBUTING.md's "## The mirror" section, as rows of cells."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## The mirror", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows[1:])  # drop the header row
            rows = []
    return tables


TABLES = _tables()
MIRRORED = {_TICKED.findall(r[0])[0]: _TICKED.findall(r[1]) for r in TABLES[0]}
DIFFERENCES = {_TICKED.findall(r[0])[0] for r in TABLES[1]}
ONLY = {(_TICKED.findall(r[0])[0], r[2].strip()): _TICKED.findall(r[1]) for r in TABLES[2]}


def _module(pkg: str, name: str):
    return importlib.import_module(f"{pkg}.{name}" if name != "__init__" else pkg)


def _exported(pkg: str, module: str) -> set[str]:
    mod = _module(pkg, module)
    assert hasattr(mod, "__all__"), f"{pkg}.{module} has no __all__"
    return set(mod.__all__)


def test_tables_parse():
    assert len(TABLES) >= 3 and MIRRORED, "CONTRIBUTING.md's mirror section lost its tables"


@pytest.mark.parametrize("module", sorted(MIRRORED))
@pytest.mark.parametrize("pkg, side", [("cggr_torch", "torch"), ("cggr_jax", "jax")])
def test_exports_match_the_table(module, pkg, side):
    listed = set(MIRRORED[module]) | set(ONLY.get((module, side), []))
    exported = _exported(pkg, module)
    mod = _module(pkg, module)
    missing = sorted(n for n in listed if not hasattr(mod, n))
    assert not missing, f"{pkg}.{module} lacks {missing} (CONTRIBUTING.md lists them)"
    assert exported == listed, (f"{pkg}.{module}.__all__ drifted from CONTRIBUTING.md: "
                                f"unlisted {sorted(exported - listed)}, not exported {sorted(listed - exported)}")


def _params(obj) -> list[tuple[str, str, object]]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values() if p.name != "self"]


def _same_default(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - arrays/tensors as defaults: compare by identity only
        return a is b


@pytest.mark.parametrize("module", sorted(MIRRORED))
def test_signatures_agree(module):
    problems = []
    for name in MIRRORED[module]:
        if f"{module}.{name}" in DIFFERENCES:
            continue
        a, b = getattr(_module("cggr_torch", module), name), getattr(_module("cggr_jax", module), name)
        if not (callable(a) and callable(b)):
            if type(a) is not type(b) or (isinstance(a, (str, int, float, tuple)) and a != b):
                problems.append(f"{name}: torch {a!r} vs jax {b!r}")
            continue
        try:
            pa, pb = _params(a), _params(b)
        except (TypeError, ValueError):
            continue  # builtins without a signature
        if [(n, k) for n, k, _ in pa] != [(n, k) for n, k, _ in pb]:
            problems.append(f"{name}: parameters torch {[(n, k) for n, k, _ in pa]} vs jax {[(n, k) for n, k, _ in pb]}")
            continue
        for (n, _, da), (_, _, db) in zip(pa, pb):
            if not _same_default(da, db):
                problems.append(f"{name}({n}=): default torch {da!r} vs jax {db!r}")
    assert not problems, f"{module}: undocumented differences (add them to CONTRIBUTING.md's table or fix):\n" + \
        "\n".join(problems)


def test_documented_differences_are_real_names():
    for entry in DIFFERENCES:
        module, name = entry.rsplit(".", 1)
        assert name in MIRRORED.get(module, []), f"{entry}: listed as a difference but not in the mirror table"
