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

# The study's story on synthetic cells: a random-init ViT, then the same ViT after a short DINO
# pretraining (`--recipe small`, protloc/recipes.py: vit_tiny/8 with 4 blocks, batch norm in the head, 64-px
# global crops, no local crops; 600 steps; embed then views images at the recipe's 64 px), compared side by side
# by k-NN and by a linear head trained on the frozen embeddings (`protloc finetune --freeze`, the study's
# frozen-backbone protocol): macro F1, 5 folds grouped by protein.
# 8 min 41 s on 2 cores shared with other jobs (OMP_NUM_THREADS=1 make demo; on a busy machine torch's second
# thread waits for a busy core and the default 2 threads ran the pretraining 6x slower).
TINY := --arch vit_tiny --patch 8 --depth 4
demo: venv
	rm -rf $(DEMO)/cells
	$(VENV)/bin/protloc synth $(DEMO)/cells --n 320 --size 96 --seed 0
	$(VENV)/bin/protloc embed $(DEMO)/cells --weights random $(TINY) --size 64 -o $(DEMO)/random.npz --force
	$(VENV)/bin/protloc pretrain $(DEMO)/cells -o $(DEMO)/dino.pt --recipe small --steps 600 \
		--log $(DEMO)/train.jsonl --force
	$(VENV)/bin/protloc embed $(DEMO)/cells --weights $(DEMO)/dino.pt -o $(DEMO)/dino.npz --force
	@echo "== k-NN macro F1: $(DEMO)/random.npz (random init) | $(DEMO)/dino.npz (DINO, 600 steps)"
	@$(VENV)/bin/protloc knn $(DEMO)/random.npz $(DEMO)/dino.npz --labels $(DEMO)/cells/labels.csv -k 5,10,20 -q
	@echo "== frozen linear head macro F1 (protloc finetune --freeze)"
	@for emb in random dino; do printf '%-8s' $$emb; $(VENV)/bin/protloc finetune $(DEMO)/$$emb.npz --freeze \
		--labels $(DEMO)/cells/labels.csv --seeds 3 -q | grep '^macro F1'; done

pictures: venv  # the pictures in docs/ (runs `make demo` first when demo/ is missing)
	bash docs/make_pictures.sh

bench: venv
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/pretrain_evidence.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
