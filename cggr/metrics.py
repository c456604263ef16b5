"""The names of the metrics every CGGR entry point reports (SPEC §10), shared by both packages."""
from __future__ import annotations

__all__ = ["METRIC_KEYS", "NUMERIC_METRIC_KEYS", "INT_METRIC_KEYS"]

#: SPEC §10, in the order of the seed docs.
METRIC_KEYS: tuple[str, ...] = (
    "step", "token_ratio", "effective_ratio", "tokens_selected", "tokens_total", "tokens_nonfinite",
    "tokens_out_of_range", "avg_confidence", "avg_entropy", "avg_difficulty", "sample_ess", "selection",
    "scoring",
)
#: The metrics that are numbers (the last two are the configuration's strings).
NUMERIC_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS[:-2]
#: The integer-valued metrics (counts); the others are float32.
INT_METRIC_KEYS: frozenset[str] = frozenset(
    {"step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"})
