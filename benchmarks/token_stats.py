#!/usr/bin/env python
"""The token_stats benchmark (SPEC §14, issue 17):
``python benchmarks/token_stats.py --framework torch|jax [--quick] [implementation options]``.

Runs ``benchmarks/ops/token_stats_<framework>.py`` directly (``--help`` lists its options). Not yet wired into
:mod:`benchmarks.harness.front` / ``benchmarks/run.py`` suites: it writes its own JSON to ``--out``.
"""
import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)  # benchmarks/<op>.py must not shadow top-level modules of the same name
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    framework = None
    for i, a in enumerate(argv):
        if a == "--framework" and i + 1 < len(argv):
            framework = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--framework="):
            framework = a.split("=", 1)[1]
            del argv[i]
            break
    if framework not in ("torch", "jax"):
        print("usage: python benchmarks/token_stats.py --framework torch|jax [--quick] [options]", file=sys.stderr)
        return 2
    return importlib.import_module(f"benchmarks.ops.token_stats_{framework}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
