"""``OpLog``: a ``TorchDispatchMode`` that records the name of every ATen op run under it (tests that a path
runs no PyTorch compute, or no host read, beyond an allowed set)."""
from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """``with OpLog() as ops: ...`` then ``ops.names``: the ops' overload-packet names, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
