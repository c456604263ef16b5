#!/usr/bin/env bash
# Checks the Makefile's CPU-index install path (issue 19) on a machine that cannot reach download.pytorch.org:
# a local PEP 503 index serving a CPU torch wheel stands in for PyTorch's CPU index, pip's own configuration is
# switched off (PyPI only, as for a user), and `make setup` must install that wheel and no CUDA package.
# Not part of `.ci/run` (it downloads ~1 GB from PyPI). Usage: .ci/check_cpu_index.sh /path/to/torch-*+cpu-*.whl
set -euo pipefail
wheel=$(readlink -f "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
mkdir -p "$tmp/simple/torch"
cp "$wheel" "$tmp/simple/torch/"
name=$(basename "$wheel")
printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "$name" "$name" >"$tmp/simple/torch/index.html"
port=$((20000 + RANDOM % 20000))
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$tmp" >"$tmp/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 1
git clone -q "$repo" "$tmp/clone"
cd "$tmp/clone"
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_INDEX_URL= \
    make setup TORCH_CPU_INDEX="http://127.0.0.1:$port/simple" | tee "$tmp/setup.log"
grep -q "setup: CPU PyTorch from http://127.0.0.1:$port/simple" "$tmp/setup.log"
version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
cuda=$(.venv/bin/pip list 2>/dev/null | grep -ci nvidia || true)
echo "torch $version; CUDA packages installed: $cuda"
[[ "$version" == *+cpu ]] && [[ "$cuda" == 0 ]]
.venv/bin/python -c "from cggr import CGGRLoss, CGGRModel, create_truncated_router; print('import cggr: ok')"
