# Two entry points, each doing all set-up from nothing on a fresh machine:
#   make demo   - trains a tiny GPT with CGGRLoss vs plain cross-entropy (PyTorch and JAX/Flax), writes a plot
#   make test   - runs the whole test suite (CPU; kernels in interpreter mode)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,jax,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) examples/demo.py

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) build *.egg-info
