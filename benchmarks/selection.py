#!/usr/bin/env python
"""The selection benchmark:
``python benchmarks/selection.py --framework torch|jax [--quick] [implementation options]``.

Runs ``benchmarks/ops/selection_<framework>.py`` through the shared front (:mod:`benchmarks.harness.front`):
records under ``benchmarks/results/<gpu>/<date>_<commit>/<suite>/``; ``--help`` lists every option.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)  # benchmarks/<op>.py must not shadow top-level modules of the same name
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root

from benchmarks.harness.front import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("selection"))
