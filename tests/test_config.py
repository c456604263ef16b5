"""The shared configuration (cggr/config.py): defaults, validation messages, the dynamic-threshold rule."""
import dataclasses

import pytest

from cggr import CONFIG_FIELDS, SEQUENCE_SELECTIONS, CGGRConfig, check_label_dtype_range


def test_defaults_follow_the_seed_docs():
    cfg = CGGRConfig()
    assert (cfg.scoring, cfg.selection, cfg.dynamic_threshold, cfg.threshold_sensitivity) == \
        ("combined", "stratified", True, 0.5)
    assert (cfg.min_tokens_ratio, cfg.warmup_steps, cfg.num_strata, cfg.min_tokens_per_sequence,
            cfg.ignore_index) == (0.25, 1000, 4, 1, -100)
    assert CONFIG_FIELDS[0] == "scoring" and "ignore_index" in CONFIG_FIELDS


@pytest.mark.parametrize("kwargs, name", [
    (dict(scoring="nope"), "scoring"), (dict(selection="x"), "selection"),
    (dict(dynamic_threshold=1), "dynamic_threshold"), (dict(threshold_sensitivity=-1.0), "threshold_sensitivity"),
    (dict(threshold_sensitivity=float("nan")), "threshold_sensitivity"), (dict(min_tokens_ratio=0.0), "min_tokens_ratio"),
    (dict(min_tokens_ratio=1.5), "min_tokens_ratio"), (dict(min_tokens_ratio=True), "min_tokens_ratio"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(warmup_steps=2.0), "warmup_steps"),
    (dict(num_strata=0), "num_strata"), (dict(min_tokens_per_sequence=-1), "min_tokens_per_sequence"),
    (dict(ignore_index=1.5), "ignore_index"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        CGGRConfig(**kwargs)


def test_unknown_setting_names_the_caller():
    with pytest.raises(ValueError, match=r"CGGRLoss: unknown setting\(s\) \['warmup'\]"):
        CGGRConfig.from_kwargs({"warmup": 3}, caller="CGGRLoss")


def test_dynamic_threshold_rule():
    assert CGGRConfig().uses_dynamic_threshold
    assert not CGGRConfig(dynamic_threshold=False).uses_dynamic_threshold
    assert not CGGRConfig(selection="fixed_quota").uses_dynamic_threshold


def test_frozen_hashable_and_numpy_scalars_normalised():
    np = pytest.importorskip("numpy")
    a = CGGRConfig(min_tokens_ratio=np.float32(0.5), warmup_steps=np.int64(3))
    b = CGGRConfig(min_tokens_ratio=0.5, warmup_steps=3)
    assert a == b and hash(a) == hash(b) and type(a.warmup_steps) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.scoring = "loss"


def test_sequence_selections():
    assert CGGRConfig(selection="topk").for_sequences().selection == "topk"
    with pytest.raises(ValueError, match="^selection: batch splitting"):
        CGGRConfig(selection="stratified").for_sequences()
    assert set(SEQUENCE_SELECTIONS) == {"topk", "fixed_quota", "sampled"}


def test_label_dtype_rule():
    check_label_dtype_range("labels", "int16", -2**15, 2**15 - 1, -100)
    with pytest.raises(ValueError, match=r"^labels: dtype uint8 .* ignore_index=-100"):
        check_label_dtype_range("labels", "uint8", 0, 255, -100)


def test_import_cggr_needs_no_framework():
    import subprocess
    import sys
    code = ("import sys, cggr; assert 'torch' not in sys.modules and 'jax' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'jax'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_torch_api():
    pytest.importorskip("torch")
    import cggr
    import cggr_torch
    assert cggr.CGGRLoss is cggr_torch.CGGRLoss and cggr.create_truncated_router is cggr_torch.create_truncated_router
    with pytest.raises(AttributeError):
        cggr.not_a_name


@pytest.mark.parametrize("package, blocked, extra", [("cggr_torch", "torch", "torch"), ("cggr_jax", "jax", "jax")])
def test_missing_framework_names_the_extra(package, blocked, extra):
    import subprocess
    import sys
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {blocked!r} or name.startswith({blocked!r} + '.'):\n"
        f"            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {package}\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert f"pip install 'cggr-routing[{extra}]'" in res.stderr, res.stderr[-2000:]


def test_excess_is_a_scoring_mode_with_shared_reference_rules():
    import cggr

    assert "excess" in cggr.SCORING_MODES and cggr.REFERENCE_SCORING_MODES == ("excess",)
    cggr.check_reference_arguments("excess", (2, 3), (2, 3))
    cggr.check_reference_arguments("combined", None, (2, 3))
    for args, kwargs, match in [(("excess", None, (2, 3)), {}, r"reference_nll: scoring='excess' needs.*\(2, 3\)"),
                                (("loss", (2, 3), (2, 3)), {}, r"reference_nll: only scoring='excess'.*'loss'"),
                                (("excess", (3,), (2, 3)), {}, r"reference_nll: expected shape \(2, 3\).*\(3,\)"),
                                (("excess", (2, 3), (2, 3)), {"has_targets": False}, "targets: scoring='excess'")]:
        with pytest.raises(ValueError, match=match):
            cggr.check_reference_arguments(*args, **kwargs)
    with pytest.raises(ValueError, match="not supported yet by X; issue 14"):
        cggr.reject_reference_scoring(cggr.CGGRConfig(scoring="excess"), "X")
    cggr.reject_reference_scoring(cggr.CGGRConfig(), "X")


def test_sampled_selection_fields():
    """SPEC §7.4: the sampled strategy and its four validated, documented settings."""
    import numpy as np

    import cggr
    from cggr.config import SAMPLED_SELECTIONS, check_sampling_parameters, reject_sampled_selection

    assert "sampled" in cggr.SELECTION_STRATEGIES and SAMPLED_SELECTIONS == ("sampled",)
    assert "sampled" in cggr.SEQUENCE_SELECTIONS   # SPEC §9.2: sequence-level sampling
    c = CGGRConfig(selection="sampled")
    assert (c.sample_power, c.sample_uniform_mix, c.sample_floor, c.sample_seed) == (1.0, 0.1, 1e-6, 0)
    assert c.uses_dynamic_threshold
    assert CONFIG_FIELDS[-4:] == ("sample_power", "sample_uniform_mix", "sample_floor", "sample_seed")
    ok = CGGRConfig(sample_power=np.float32(0.0), sample_uniform_mix=1, sample_floor=np.float64(0.5),
                    sample_seed=np.uint32(2**32 - 1))
    assert type(ok.sample_power) is float and type(ok.sample_seed) is int and ok.sample_seed == 2**32 - 1
    assert hash(ok) == hash(CGGRConfig(sample_power=0.0, sample_uniform_mix=1.0, sample_floor=0.5,
                                       sample_seed=2**32 - 1))
    for field, bad in [("sample_power", -1e-9), ("sample_power", float("nan")), ("sample_power", float("inf")),
                       ("sample_power", True), ("sample_power", "1"), ("sample_uniform_mix", -0.01),
                       ("sample_uniform_mix", 1.01), ("sample_uniform_mix", float("nan")), ("sample_floor", 0),
                       ("sample_floor", -1.0), ("sample_floor", float("inf")), ("sample_seed", -1),
                       ("sample_seed", 2**32), ("sample_seed", 0.0), ("sample_seed", False)]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            CGGRConfig(**{field: bad})
    with pytest.raises(ValueError, match="^power:"):
        check_sampling_parameters(-1.0, 0.1, 1e-6)
    assert CGGRConfig(selection="sampled").for_sequences().selection == "sampled"
    with pytest.raises(ValueError, match="not supported yet by X"):
        reject_sampled_selection(c, "X")
    reject_sampled_selection(CGGRConfig(), "X")
    assert "sample_ess" in cggr.NUMERIC_METRIC_KEYS and "sample_ess" not in cggr.INT_METRIC_KEYS


def test_sequence_reference_arguments_are_one_rule():
    """SPEC §9.1's static rules, shared by both packages' batch splitting (cggr.check_sequence_reference_arguments)."""
    import numpy as np

    from cggr import check_sequence_reference_arguments as check

    assert check("combined", None, (2, 5), array_type=np.ndarray) is False
    assert check("excess", np.zeros((2, 5), np.float32), (2, 5), array_type=np.ndarray) is True
    assert check("excess", np.zeros(2, np.float32), (2, 5), array_type=np.ndarray) is True
    with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs .*got None \(hint\)"):
        check("excess", None, (2, 5), array_type=np.ndarray, hint=" (hint)")
    with pytest.raises(ValueError, match="only scoring='excess' reads a reference loss"):
        check("loss", np.zeros(2), (2, 5), array_type=np.ndarray)
    with pytest.raises(ValueError, match="expected a floating array"):
        check("excess", [0.0, 1.0], (2, 5), array_type=np.ndarray, kind="array")
    with pytest.raises(ValueError, match=r"expected shape .*\(B, T\) = \(2, 5\).*got \(2, 4\)"):
        check("excess", np.zeros((2, 4)), (2, 5), array_type=np.ndarray)


def test_router_positions_are_validated_once_and_follow_spec_9_3():
    from cggr.config import ROUTER_POSITIONS_ALL, RouterPositions
    from tests import oracle

    assert RouterPositions() == RouterPositions(ROUTER_POSITIONS_ALL, None, None) and RouterPositions().is_full
    assert RouterPositions().scored(9) is None                       # the defaults gather nothing
    for kwargs, name in (({"router_positions": 0}, "router_positions"), ({"router_positions": "every"},
                         "router_positions"), ({"router_positions": 2.0}, "router_positions"),
                         ({"router_positions": True}, "router_positions"), ({"router_samples": 0}, "router_samples"),
                         ({"router_samples": "4"}, "router_samples"), ({"router_prefix": 0}, "router_prefix"),
                         ({"router_prefix": 1.5}, "router_prefix"),
                         ({"router_positions": 1, "router_samples": 4}, "router_samples")):
        with pytest.raises(ValueError, match=name):
            RouterPositions(**kwargs)
    # the scored positions against the oracle's independent SPEC §9.3, over odd and tiny T, causal and not
    for T in (1, 2, 3, 7, 10, 33):
        for kwargs in ({"router_positions": 1}, {"router_positions": 4}, {"router_positions": 40},
                       {"router_samples": 1}, {"router_samples": 3}, {"router_samples": 40}, {"router_prefix": 1},
                       {"router_prefix": 5}, {"router_prefix": 40}, {"router_prefix": 6, "router_positions": 4},
                       {"router_prefix": 8, "router_samples": 5}):
            for shift in (True, False):
                got = RouterPositions(**kwargs).scored(T, shift)
                want = oracle.router_scored_positions(T, shift=shift, **kwargs)
                assert list(got) == want.tolist(), (T, kwargs, shift)
                assert len(set(got)) == len(got) and list(got) == sorted(got)
    rp = RouterPositions(router_prefix=5)
    assert (rp.read_length(9), rp.read_length(3), rp.candidates(9), rp.candidates(5), rp.candidates(5, False)) == \
           (5, 3, 5, 4, 5)
    np = pytest.importorskip("numpy")
    assert RouterPositions(np.int64(4)) == RouterPositions(4) and hash(RouterPositions(np.int64(4))) == \
        hash(RouterPositions(4))
    assert type(RouterPositions(np.int64(4)).router_positions) is int
