# Two entry points, each doing all set-up from nothing on a fresh machine:
#   make demo   - trains a tiny GPT seven ways (standard; random, CGGR and excess token selection; random, CGGR and excess batch splitting) in PyTorch and JAX/Flax; plot, curves and a verdict in out/demo/
#   make test   - runs the whole test suite (CPU; kernels in interpreter mode)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

# PyPI's Linux torch wheel is the CUDA build (and pulls ~2 GB of CUDA packages); only PyTorch's own CPU index
# serves the CPU build. Use it when it answers, and fall back to PyPI alone (as in CI) when it does not.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PROBE := import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$$(uname -s)" = Linux ] && $(PY) -c "$(PROBE)" "$(TORCH_CPU_INDEX)/torch/" 2>/dev/null; then \
		echo "setup: CPU PyTorch from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q -c constraints.txt --extra-index-url $(TORCH_CPU_INDEX) -e ".[torch,jax,dev]"; \
	else \
		echo "setup: $(TORCH_CPU_INDEX) unreachable or not Linux; installing from the default index"; \
		$(PY) -m pip install -q -c constraints.txt -e ".[torch,jax,dev]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) examples/demo.py

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile -q -o console_output_style=count --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
