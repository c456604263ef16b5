"""``benchmarks/harness/wheels.py``: carrying wheels to the GPU machine (issue 18). Split / join round trip with
the sha256 checks (a corrupted, truncated or missing part is refused, naming it), the ``.pth`` entries that
``pip --target`` leaves unprocessed (path lines and ``import`` lines, as the cutlass DSL's), the whole
``install_carried`` path of ``benchmarks/run.py`` on a tiny wheel built here, and the carry plan. CPU only."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import wheels  # noqa: E402

KIB = 1024


def _blob(path: Path, size: int, seed: int = 0) -> Path:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.write_bytes(data[:size])
    return path


def _split(tmp_path: Path, size: int = 100 * KIB, part_kib: float = 30) -> tuple[Path, Path, dict]:
    whl = _blob(tmp_path / "big_pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl", size)
    parts = tmp_path / ".whl" / "parts"
    manifest = wheels.split(whl, parts, part_mib=part_kib / 1024)
    return whl, parts, json.loads(manifest.read_text())


def test_split_join_round_trip(tmp_path):
    whl, parts, man = _split(tmp_path)
    assert [p["name"] for p in man["parts"]] == [f"{whl.name}.part{i:03d}" for i in range(4)]  # 30+30+30+10 KiB
    assert [p["size"] for p in man["parts"]] == [30 * KIB] * 3 + [10 * KIB]
    assert man["size"] == whl.stat().st_size and man["sha256"] == hashlib.sha256(whl.read_bytes()).hexdigest()
    assert not list(parts.glob("*.whl")), "parts must not look like wheels to the runner's *.whl install"
    (joined,) = wheels.join(parts, tmp_path / "joined")
    assert joined.name == whl.name and joined.read_bytes() == whl.read_bytes()
    assert wheels.join(parts, tmp_path / "joined") == [joined]  # already there and right: kept
    # a re-split with another size leaves no stale parts behind
    wheels.split(whl, parts, part_mib=60 / 1024)
    assert len(list(parts.glob("*.part[0-9][0-9][0-9]"))) == 2


def test_split_of_an_exact_multiple_and_a_tiny_wheel(tmp_path):
    whl, parts, man = _split(tmp_path, size=60 * KIB, part_kib=30)
    assert [p["size"] for p in man["parts"]] == [30 * KIB, 30 * KIB]
    tiny = _blob(tmp_path / "t-1-py3-none-any.whl", 5)
    m = json.loads(wheels.split(tiny, tmp_path / "p2").read_text())
    assert len(m["parts"]) == 1 and m["size"] == 5
    assert wheels.join(tmp_path / "p2", tmp_path / "j2")[0].read_bytes() == tiny.read_bytes()


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "missing"])
def test_join_refuses_a_damaged_part(tmp_path, damage):
    whl, parts, man = _split(tmp_path)
    victim = parts / man["parts"][1]["name"]
    if damage == "corrupt":
        b = bytearray(victim.read_bytes())
        b[100] ^= 0xFF
        victim.write_bytes(bytes(b))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    out = tmp_path / "joined"
    with pytest.raises(wheels.WheelPartsError, match=victim.name) as info:
        wheels.join(parts, out)
    assert {"corrupt": "sha256 differs", "truncate": "bytes, the manifest says", "missing": "missing"}[damage] \
        in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (out / whl.name).exists() and not list(out.glob("*.joining"))
    # the command line: a clear message and exit status 2
    p = subprocess.run([sys.executable, "-m", "benchmarks.harness.wheels", "join", str(parts), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error:" in p.stderr and victim.name in p.stderr


def test_join_refuses_a_whole_sha256_mismatch(tmp_path):
    """Parts that match their own entries but not the whole wheel's sha256 (a manifest of another build)."""
    whl, parts, man = _split(tmp_path)
    mpath = parts / (whl.name + ".parts.json")
    man["sha256"] = "0" * 64
    mpath.write_text(json.dumps(man))
    with pytest.raises(wheels.WheelPartsError, match="refused"):
        wheels.join(parts, tmp_path / "joined")
    assert not (tmp_path / "joined" / whl.name).exists()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="wheel: .* is not a file"):
        wheels.split(tmp_path / "nope.whl", tmp_path / "p")
    with pytest.raises(ValueError, match="wheel: expected a .whl file"):
        wheels.split(_blob(tmp_path / "x.tar.gz", 10), tmp_path / "p")
    with pytest.raises(ValueError, match="part_mib: expected a positive size"):
        wheels.split(_blob(tmp_path / "x-1-py3-none-any.whl", 10), tmp_path / "p", part_mib=0)
    with pytest.raises(wheels.WheelPartsError, match="no \\*.parts.json"):
        wheels.join(tmp_path, tmp_path / "j")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "w.whl.parts.json").write_text("{not json")
    with pytest.raises(wheels.WheelPartsError, match="not a readable parts manifest"):
        wheels.join(tmp_path / "bad", tmp_path / "j")
    with pytest.raises(ValueError, match="target: .* is not a folder"):
        wheels.pth_paths(tmp_path / "absent")


def _fake_dsl_target(target: Path) -> None:
    """What ``pip install --target`` leaves for the cutlass DSL: a package and a ``.pth`` whose ``import`` line
    puts ``<package>/dsl_packages`` on ``sys.path``; plus a ``.pth`` with a plain (relative) path line."""
    (target / "fake_dsl" / "dsl_packages" / "fake_inner").mkdir(parents=True)
    (target / "fake_dsl" / "__init__.py").write_text("")
    (target / "fake_dsl" / "dsl_packages" / "fake_inner" / "__init__.py").write_text("VALUE = 42\n")
    (target / "fake_dsl_packages.pth").write_text(
        "import sys, os, fake_dsl; sys.path.insert(0, os.path.join(fake_dsl.__path__[0], 'dsl_packages'))\n")
    (target / "plain_dir").mkdir()
    (target / "zz_plain.pth").write_text("# a comment\nplain_dir\nmissing_dir\n")


def test_pth_paths_reads_path_and_import_lines(tmp_path):
    target = tmp_path / "site-packages"
    target.mkdir()
    assert wheels.pth_paths(target) == []  # no .pth: nothing to add
    _fake_dsl_target(target)
    got = wheels.pth_paths(target)
    assert str(target / "fake_dsl" / "dsl_packages") in got
    assert str(target / "plain_dir") in got
    assert not any("missing_dir" in p for p in got) and str(target) not in got
    # with those entries on PYTHONPATH, the package the .pth exposes imports (what the runner's steps get)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + got))
    p = subprocess.run([sys.executable, "-c", "import fake_inner; print(fake_inner.VALUE)"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "42", p.stderr
    # without them it does not: the problem pip --target leaves
    env = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run([sys.executable, "-c", "import fake_inner"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "fake_inner" in p.stderr


def test_pth_paths_reports_a_failing_import_line(tmp_path):
    (tmp_path / "broken.pth").write_text("import sys; sys.path.insert(0, '/x'); raise SystemExit(3)\n")
    with pytest.raises(ValueError, match="target: processing the .pth files"):
        wheels.pth_paths(tmp_path)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_dsl_wheel(path: Path) -> Path:
    """A valid wheel of the cutlass DSL's shape: ``fake_dsl/dsl_packages/fake_inner`` and a top-level ``.pth``."""
    files = {
        "fake_dsl/__init__.py": b"",
        "fake_dsl/dsl_packages/fake_inner/__init__.py": b"VALUE = 7\n",
        "fake_dsl_packages.pth": b"import sys, os, fake_dsl; "
                                 b"sys.path.insert(0, os.path.join(fake_dsl.__path__[0], 'dsl_packages'))\n",
        "fake_dsl-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fake-dsl\nVersion: 1.0\n",
        "fake_dsl-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n",
        "fake_dsl-1.0.dist-info/top_level.txt": b"fake_dsl\n",
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    record += "fake_dsl-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("fake_dsl-1.0.dist-info/RECORD", record)
    return path


def test_install_carried_joins_installs_and_applies_the_pth(tmp_path):
    """The runner's path end to end: a wheel carried in parts is joined (sha256 checked), installed with
    ``pip --target`` into a ``site-packages`` folder, and its ``.pth`` entry is handed to the steps."""
    whl = _fake_dsl_wheel(tmp_path / "fake_dsl-1.0-py3-none-any.whl")
    carried = tmp_path / ".whl"
    wheels.split(whl, carried / "parts", part_mib=0.5 / 1024)  # several parts of 512 bytes
    assert len(list((carried / "parts").glob("*.part[0-9][0-9][0-9]"))) > 1
    target = tmp_path / "t" / "site-packages"
    report = wheels.install_carried(carried, target=target, joined_dir=tmp_path / "joined")
    assert report["errors"] == [] and report["joined"] == [whl.name] and report["wheels"] == [whl.name]
    assert report["pythonpath"] == [str(target), str(target / "fake_dsl" / "dsl_packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(report["pythonpath"]))
    p = subprocess.run([sys.executable, "-c", "import fake_inner; print(fake_inner.VALUE)"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "7", p.stderr


def test_install_carried_reports_a_wheel_that_did_not_arrive(tmp_path):
    """A part lost between calls (the machine went cold): the others install, the error names the part."""
    whl = _fake_dsl_wheel(tmp_path / "fake_dsl-1.0-py3-none-any.whl")
    carried = tmp_path / ".whl"
    man = json.loads(wheels.split(whl, carried / "parts", part_mib=0.5 / 1024).read_text())
    (carried / "parts" / man["parts"][0]["name"]).unlink()
    report = wheels.install_carried(carried, target=tmp_path / "site-packages", joined_dir=tmp_path / "j")
    assert report["wheels"] == [] and report["pythonpath"] == []
    (err,) = report["errors"]
    assert err.startswith("join: ") and man["parts"][0]["name"] in err and "missing" in err


def test_carry_plan_packs_parts_and_small_wheels_per_call(tmp_path):
    carried = tmp_path / ".whl"
    big = _blob(tmp_path / "libs-1-cp312-cp312-manylinux_2_28_x86_64.whl", 90 * KIB)
    wheels.split(big, carried / "parts", part_mib=40 / 1024)  # 40 + 40 + 10 KiB
    _blob(carried / "liger_kernel-0.6.5-py3-none-any.whl", 8 * KIB, seed=2)
    (carried / "anchors").mkdir()
    for i, name in enumerate(("quack_kernels-0.6.5-py3-none-any.whl", "nvidia_cutlass_dsl-4.7.1-py3-none-any.whl",
                              "a-1-py3-none-any.whl", "b-1-py3-none-any.whl", "c-1-py3-none-any.whl",
                              "d-1-py3-none-any.whl", "e-1-py3-none-any.whl", "f-1-py3-none-any.whl")):
        _blob(carried / "anchors" / name, KIB, seed=10 + i)
    # a "call" of 64 KiB (limit and tree in MiB scaled down: 0.0625 MiB limit, 0.01 MiB tree)
    calls = wheels.carry_plan(carried, tree_mib=0.01, limit_mib=0.0625)
    m, p = f".whl/parts/{big.name}.parts.json", f".whl/parts/{big.name}.part"
    assert calls == [[m, p + "000"], [p + "001", p + "002"], [".whl/liger_kernel-0.6.5-py3-none-any.whl",
                                                               ".whl/anchors"]]
    sizes = {f".whl/{f.relative_to(carried).as_posix()}": f.stat().st_size for f in carried.rglob("*") if f.is_file()}
    sizes[".whl/anchors"] = 8 * KIB
    for c in calls:
        assert sum(sizes[x] for x in c) + 0.01 * 1024 * KIB <= 0.0625 * 1024 * KIB and len(c) <= 8
    # the runner installs the subfolder's wheels too, never the parts
    assert [w.name for w in wheels.carried_wheels(carried)][:1] == ["liger_kernel-0.6.5-py3-none-any.whl"]
    assert len(wheels.carried_wheels(carried)) == 9
    with pytest.raises(ValueError, match="does not fit one call"):
        wheels.carry_plan(carried, tree_mib=0.03, limit_mib=0.0625)
    with pytest.raises(ValueError, match="wheel_dir: .* is not a folder"):
        wheels.carry_plan(tmp_path / "absent", tree_mib=1)


def test_carry_plan_respects_the_eight_paths_limit(tmp_path):
    carried = tmp_path / ".whl"
    carried.mkdir()
    for i in range(10):
        _blob(carried / f"w{i}-1-py3-none-any.whl", 10, seed=i)
    calls = wheels.carry_plan(carried, tree_mib=1)
    assert [len(c) for c in calls] == [8, 2]


def test_install_carried_refuses_two_versions_of_one_distribution(tmp_path):
    """Parts of an earlier try stay on the warm machine: two versions of one wheel are named, nothing installed."""
    carried = tmp_path / ".whl"
    carried.mkdir()
    a = _fake_dsl_wheel(carried / "fake_dsl-1.0-py3-none-any.whl")
    wheels.split(_fake_dsl_wheel(tmp_path / "fake_dsl-2.0-py3-none-any.whl"), carried / "parts")
    report = wheels.install_carried(carried, target=tmp_path / "site-packages", joined_dir=tmp_path / "j")
    (err,) = report["errors"]
    assert "two versions" in err and a.name in err and "fake_dsl-2.0-py3-none-any.whl" in err
    assert report["pythonpath"] == [] and not (tmp_path / "site-packages").exists()
