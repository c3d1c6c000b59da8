# protloc: `make demo` runs the main job on synthetic data, `make test` the test suite.
# Both create .venv when it is missing. Without an NVIDIA GPU, torch's CPU build is installed
# (a plain `pip install torch` would pull a multi-GB CUDA build); override with TORCH=...
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
DEMO := demo

.PHONY: venv test test-all demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: venv
	$(PY) -m ruff check protloc kernels cli tests benchmarks
	$(PY) -m pytest -q

test-all: venv  # the slow tests too
	$(PY) -m pytest -q -m "not gpu"

demo: venv
	$(VENV)/bin/protloc synth $(DEMO)/cells --n 240 --size 128 --seed 0 --force
	$(VENV)/bin/protloc embed $(DEMO)/cells --weights random --arch vit_tiny --patch 8 -o $(DEMO)/random.npz --force
	$(VENV)/bin/protloc knn $(DEMO)/random.npz --labels $(DEMO)/cells/labels.csv -k 1,5,10,20

bench: venv
	$(PY) benchmarks/bench_embed.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
