"""A wall-clock budget for benchmarks that run many rows in one process (``benchmarks/step.py``).

The GPU runner kills a step at its timeout and a device call has a hard limit, so a long script must stop
*starting* rows before its time is out and keep what it measured. :class:`Budget` answers "does a row that is
expected to take ``s`` seconds still fit?". A row's expected time is its prior (a guess written next to the
benchmark) times a scale learned from the rows already run (the median of their measured / prior times), so
one slow or fast machine corrects every later estimate. A row that does not fit is skipped and its record
says why.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

__all__ = ["Budget"]


class Budget:
    """``total_s`` seconds from construction (``None``: unlimited)."""

    def __init__(self, total_s: Optional[float], clock: Callable[[], float] = time.monotonic):
        if total_s is not None and not total_s > 0:
            raise ValueError(f"total_s: expected None or a number > 0, got {total_s!r}")
        self.total_s = total_s
        self._clock = clock
        self._t0 = clock()
        self._ratios: list[float] = []

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def left(self) -> float:
        """Seconds left (``inf`` without a budget)."""
        return float("inf") if self.total_s is None else self.total_s - self.elapsed()

    @property
    def scale(self) -> float:
        """Median of measured / prior over the rows observed so far, clamped to [0.25, 4]; 1 before two rows
        (the first row also pays for process start-up: CUDA context, library handles, lazy imports)."""
        return min(4.0, max(0.25, statistics.median(self._ratios))) if len(self._ratios) >= 2 else 1.0

    def expected(self, prior_s: float) -> float:
        return prior_s * self.scale

    def observe(self, prior_s: float, seconds: float) -> None:
        """A row whose prior was ``prior_s`` took ``seconds``."""
        if prior_s > 0 and seconds > 0:
            self._ratios.append(seconds / prior_s)

    def fits(self, prior_s: float, share_left: Optional[float] = None) -> Optional[str]:
        """``None`` when a row of prior ``prior_s`` fits what is left (and ``share_left``, a sub-budget, if
        given), else the reason it is skipped."""
        need = self.expected(prior_s)
        left = self.left() if share_left is None else min(self.left(), share_left)
        if need > left:
            return f"deadline: {max(left, 0.0):.0f} s left, the row is expected to take {need:.0f} s"
        return None
