"""cggr_torch.curriculum against the oracle and the docs' numbers (SPEC §5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr_torch.curriculum import dynamic_ratio, linear_warmup_ratio, num_selected
from tests import oracle


def test_docs_curriculum_examples():
    f = linear_warmup_ratio(0.25, 1000)
    assert f(0) == np.float32(1.0)
    assert f(500) == np.float32(0.625)
    assert f(1000) == np.float32(0.25) and f(5000) == np.float32(0.25)
    assert isinstance(f(500), np.float32)
    assert linear_warmup_ratio(0.4, 0)(0) == np.float32(0.4)
    assert linear_warmup_ratio(0.4, 0)(123) == np.float32(0.4)


@pytest.mark.parametrize("min_ratio,warmup", [(0.25, 1000), (0.1, 7), (0.9, 3), (1.0, 10), (0.3, 1), (1e-3, 0)])
def test_schedule_bit_identical_to_oracle(min_ratio, warmup):
    f, g = linear_warmup_ratio(min_ratio, warmup), oracle.linear_warmup_ratio(min_ratio, warmup)
    for step in list(range(0, 40)) + [warmup - 1, warmup, warmup + 1, 10**6, 2**31 + 5]:
        if step < 0:
            continue
        assert f(step) == g(step), step
        assert f(np.int64(step)) == g(step)
    assert f(torch.tensor(5)) == g(5)  # a CPU integer tensor is read on the host


def test_dynamic_ratio_docs_table():
    for conf, expected in [(0.3, 0.3375), (0.7, 0.2875), (0.9, 0.2625)]:
        r = dynamic_ratio(0.25, conf, 0.5)
        assert r.dtype == torch.float32 and r.shape == ()
        assert float(r) == pytest.approx(expected, abs=1e-7)
        assert np.float32(r) == oracle.dynamic_ratio(np.float32(0.25), np.float32(conf), 0.5)


def test_dynamic_ratio_clamps_and_accepts_tensors():
    assert float(dynamic_ratio(0.9, 0.0, 1.0)) == 1.0  # 0.9·2 clamped
    base = torch.tensor(0.25)
    conf = torch.tensor(0.3)
    assert float(dynamic_ratio(base, conf, 0.5)) == float(dynamic_ratio(0.25, 0.3, 0.5))
    assert float(dynamic_ratio(0.25, conf, torch.tensor(0.5))) == float(np.float32(0.3375))
    assert float(dynamic_ratio(0.5, 0.2, 0.0)) == 0.5  # sensitivity 0 → base


@settings(max_examples=40, deadline=None)
@given(base=st.floats(2.0**-14, 1.0, width=32), conf=st.floats(0.0, 1.0, width=32), sens=st.floats(0.0, 1.0))
def test_dynamic_ratio_bit_identical_to_oracle(base, conf, sens):
    got = dynamic_ratio(torch.tensor(np.float32(base)), torch.tensor(np.float32(conf)), sens)
    assert np.float32(got) == oracle.dynamic_ratio(np.float32(base), np.float32(conf), sens)


def test_num_selected_docs_examples():
    assert num_selected(256, 0.625) == 160
    assert num_selected(10, 0.25) == 3          # 2.5 rounds up
    assert num_selected(1, 1e-6) == 1           # at least one
    assert num_selected(0, 0.5) == 0
    assert num_selected(7, 1.0) == 7
    k = num_selected(torch.tensor(256), torch.tensor(0.625))
    assert k.dtype == torch.int32 and k.shape == () and int(k) == 160  # k is int32 in both packages
    assert int(num_selected(torch.tensor(0), 0.3)) == 0
    assert int(num_selected(5, torch.tensor(0.5))) == 3  # 2.5 → 3


def test_num_selected_half_cases_and_quantisation():
    # r_q·n + 2^15 lands exactly on a multiple of 2^16: round half up; ratio·2^16 half-integers round to even
    r = np.float32(0.5 + 2**-17)  # r·2^16 = 32768.5 → 32768 (even)
    assert oracle.num_selected(3, r) == num_selected(3, float(r)) == int(num_selected(torch.tensor(3), torch.tensor(r)))
    r2 = np.float32(0.5 + 3 * 2**-17)  # 32769.5 → 32770 (even)
    for n in (1, 2, 3, 65535, 65536, 2**31 - 1):
        assert num_selected(n, float(r2)) == oracle.num_selected(n, r2)
        assert int(num_selected(torch.tensor(n), torch.tensor(r2))) == oracle.num_selected(n, r2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 2**31 - 1), ratio=st.floats(2.0**-20, 1.0, width=32))
def test_num_selected_identical_to_oracle(n, ratio):
    r = np.float32(ratio)
    k = oracle.num_selected(n, r)
    assert num_selected(n, float(r)) == k
    assert int(num_selected(torch.tensor(n), torch.tensor(r))) == k
    assert int(num_selected(torch.tensor(n, dtype=torch.int32), r)) == k


def test_schedule_is_picklable():
    import pickle

    f = pickle.loads(pickle.dumps(linear_warmup_ratio(0.3, 50)))
    assert f(25) == oracle.linear_warmup_ratio(0.3, 50)(25)
