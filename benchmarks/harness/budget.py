"""A wall-clock budget for benchmarks that run many rows in one process (``benchmarks/step.py``).

The GPU runner kills a step at its timeout and the device call has a hard limit, so a long script must stop
*starting* rows before its time is out and keep what it measured. :class:`Budget` answers "does a row that is
expected to take ``s`` seconds still fit?"; the expected time of a row kind is what the last row of that kind
took (its prior until one ran). A row that does not fit is skipped and its record says why.
"""
from __future__ import annotations

import time
from typing import Optional

__all__ = ["Budget"]


class Budget:
    """``total_s`` seconds from construction (``None``: unlimited). ``priors``: expected seconds of a row kind
    before one has run; a kind with no prior and no observation is expected to take ``default_s``."""

    def __init__(self, total_s: Optional[float], priors: Optional[dict[str, float]] = None,
                 default_s: float = 60.0, clock=time.monotonic):
        if total_s is not None and not total_s > 0:
            raise ValueError(f"total_s: expected None or a number > 0, got {total_s!r}")
        self.total_s = total_s
        self._clock = clock
        self._t0 = clock()
        self._priors = dict(priors or {})
        self._seen: dict[str, float] = {}
        self.default_s = float(default_s)

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def left(self) -> float:
        """Seconds left (``inf`` without a budget)."""
        return float("inf") if self.total_s is None else self.total_s - self.elapsed()

    def expected(self, kind: str) -> float:
        """Expected seconds of a row of ``kind``: the last observed one, else its prior, else ``default_s``."""
        return self._seen.get(kind, self._priors.get(kind, self.default_s))

    def observe(self, kind: str, seconds: float) -> None:
        self._seen[kind] = float(seconds)

    def fits(self, kind: str, share_left: Optional[float] = None) -> Optional[str]:
        """``None`` when a row of ``kind`` fits what is left (and ``share_left``, a sub-budget, if given), else
        the reason it is skipped."""
        need = self.expected(kind)
        left = self.left() if share_left is None else min(self.left(), share_left)
        if need > left:
            return f"deadline: {max(left, 0.0):.0f} s left, a {kind} row is expected to take {need:.0f} s"
        return None
