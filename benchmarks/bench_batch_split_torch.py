"""Transitional alias of ``benchmarks/ops/batch_split_torch.py`` (the batch-split benchmark moved there, issue 13).

Kept only because ``tests/torch/test_cggr_model.py::test_benchmark_quick_mode_runs`` loads this path and that
file belongs to the PyTorch package's tests; once that test loads ``benchmarks/ops/batch_split_torch.py``
(or runs ``benchmarks/batch_split.py --framework torch --quick``), delete this file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.ops.batch_split_torch import *  # noqa: E402,F401,F403
from benchmarks.ops.batch_split_torch import main  # noqa: E402,F401

if __name__ == "__main__":
    main()
