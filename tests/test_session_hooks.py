"""tests/conftest.py's guard against a poisoned CUDA context (a device-side assertion in one GPU test used to fail
every later test of its pytest-xdist worker)."""
from __future__ import annotations

import types

import pytest

from tests import conftest


class _FakeCuda:
    def __init__(self, available=True, initialized=True, error=None):
        self.available, self.initialized, self.error, self.synced = available, initialized, error, 0

    def is_available(self):
        return self.available

    def is_initialized(self):
        return self.initialized

    def synchronize(self):
        self.synced += 1
        if self.error is not None:
            raise self.error


def _torch(**kw):
    return types.SimpleNamespace(cuda=_FakeCuda(**kw))


def test_a_sticky_cuda_error_is_detected():
    fake = _torch(error=RuntimeError("CUDA error: device-side assert triggered"))
    assert conftest.cuda_context_poisoned(fake)
    assert fake.cuda.synced == 1


@pytest.mark.parametrize("kw", [dict(), dict(available=False), dict(initialized=False),
                                dict(error=ValueError("something else"))])
def test_no_error_no_cuda_or_no_context_is_not_poisoned(kw):
    fake = _torch(**kw)
    assert not conftest.cuda_context_poisoned(fake)
    if not kw.get("available", True) or not kw.get("initialized", True):
        assert fake.cuda.synced == 0          # never initialises CUDA by synchronising an unused device


def test_without_torch_imported_nothing_is_checked(monkeypatch):
    monkeypatch.delitem(conftest.sys.modules, "torch", raising=False)
    assert not conftest.cuda_context_poisoned()


@pytest.mark.parametrize("worker, poisoned, ends", [("gw1", True, True), ("gw0", False, False),
                                                    ("", True, False)])
def test_teardown_ends_only_a_poisoned_xdist_worker(monkeypatch, capsys, worker, poisoned, ends):
    exits = []
    monkeypatch.setattr(conftest.os, "_exit", exits.append)
    monkeypatch.setattr(conftest, "cuda_context_poisoned", lambda: poisoned)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    conftest.pytest_runtest_teardown(types.SimpleNamespace(nodeid="tests/x.py::t"), None)
    assert exits == ([3] if ends else [])
    assert ("tests/x.py::t left the CUDA context" in capsys.readouterr().err) == ends
