#!/usr/bin/env python
"""The token_stats benchmark (SPEC §14, issue 17):
``python benchmarks/token_stats.py --framework torch|jax [--quick] [implementation options]``.

Per-token log-probs + entropy + the policy-gradient backward of a Qwen-style LM head (N = 16384, d = 4096,
V = 151936, bf16) at ρ = 0.2 and ρ = 1, against TRL's materialised path and the fused alternatives. Runs
``benchmarks/ops/token_stats_<framework>.py`` through the shared front (:mod:`benchmarks.harness.front`):
records under ``benchmarks/results/<gpu>/<date>_<commit>/heads/token_stats_<framework>.jsonl`` (suite
``heads``); ``--help`` lists every option.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)  # benchmarks/<op>.py must not shadow top-level modules of the same name
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root

from benchmarks.harness.front import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("token_stats"))
