# protloc: `make demo` runs the main job on synthetic data, `make test` the test suite.
# Both create .venv when it is missing. Without an NVIDIA GPU, torch's CPU build is installed
# (a plain `pip install torch` would pull a multi-GB CUDA build); override with TORCH=...
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
DEMO := demo

.PHONY: venv test test-all demo pictures bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,plot]"
	touch $@

test: venv
	$(PY) -m ruff check protloc kernels cli tests benchmarks
	$(PY) -m pytest -q

test-all: venv  # the slow tests too
	$(PY) -m pytest -q -m "not gpu"

# The study's story on synthetic cells: DINO pretraining with the default recipe (`--recipe small`,
# protloc/recipes.py: vit_tiny/8 with 4 blocks, KoLeo; 600 steps), then its features side by side
# with raw pixels and with the same ViT at random init, by k-NN and by the linear probe of
# `protloc finetune --freeze` (the study's frozen-backbone protocol): macro F1, 5 folds grouped by
# protein (benchmarks/real_data_eval.py scores the run). One setting differs from the recipe:
# --normalize image, because synth gives each protein an expression level over two orders of
# magnitude that says nothing about its class (with the recipe's dataset normalization the same
# 1200-step run scores 0.13 -> 0.26: README, Results). random.npz is for the pictures.
# About 7 min on 2 idle cores; on a busy machine give OMP_NUM_THREADS=1 (torch's second thread
# waits for a busy core: the pretraining ran 6x slower with 2 threads at load average 6).
demo: venv
	rm -rf $(DEMO)/cells
	$(VENV)/bin/protloc synth $(DEMO)/cells --n 320 --size 96 --seed 0
	$(VENV)/bin/protloc pretrain $(DEMO)/cells -o $(DEMO)/dino.pt --steps 600 --normalize image \
		--log $(DEMO)/train.jsonl --force
	$(VENV)/bin/protloc embed $(DEMO)/cells --weights $(DEMO)/dino.pt -o $(DEMO)/dino.npz --force
	$(VENV)/bin/protloc embed $(DEMO)/cells --weights random --arch vit_tiny --patch 8 --depth 4 --size 64 \
		-o $(DEMO)/random.npz --force
	@echo "== macro F1 on 320 synthetic fields (10 classes, chance 0.10): raw pixels | random init | DINO, 600 steps"
	@$(PY) benchmarks/real_data_eval.py --sets synth --synth $(DEMO)/cells --checkpoint $(DEMO)/dino.pt

pictures: venv  # the pictures in docs/ (runs `make demo` first when demo/ is missing)
	bash docs/make_pictures.sh

bench: venv
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/real_data_eval.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
