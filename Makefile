# Two commands a newcomer needs: `make demo` (train on synthetic faces) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install demo demo-score test test-gpu-versions gpu-check gpu-check-dry

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

# The demo (docs/demo.md): train on synthetic faces, then score the run with the commands a user types.
DEMO_DATA ?= demo_data
DEMO_OUT ?= checkpoint/demo
demo: install
	$(PYTHON) run_training.py --demo --data-dir $(DEMO_DATA) --out $(DEMO_OUT)
	$(MAKE) --no-print-directory demo-score

demo-score: install
	$(PYTHON) predict.py submit --checkpoint $(DEMO_OUT)/best.ckpt --test-dir $(DEMO_DATA)/test \
		--out $(DEMO_OUT)/submission.csv
	$(PYTHON) predict.py evaluate --submission $(DEMO_OUT)/submission.csv --labels $(DEMO_DATA)/test_labels.csv \
		--checkpoint $(DEMO_OUT)/best.ckpt
	$(PYTHON) predict.py verify --checkpoint $(DEMO_OUT)/best.ckpt \
		--pairs $(DEMO_DATA)/verification/verification_pairs.csv --images $(DEMO_DATA)/verification/known \
		--roc $(DEMO_OUT)/roc.png
	$(PYTHON) predict.py identify --checkpoint $(DEMO_OUT)/best.ckpt --known $(DEMO_DATA)/verification/known \
		--unknown $(DEMO_DATA)/verification/unknown_test --out $(DEMO_OUT)/verification.csv \
		--calibrate $(DEMO_DATA)/verification/unknown_dev --labels $(DEMO_DATA)/verification/verification_dev.csv
	$(PYTHON) predict.py evaluate --submission $(DEMO_OUT)/verification.csv \
		--labels $(DEMO_DATA)/verification/verification_test.csv --open-set

test: install
	$(PYTHON) -m pytest

# The suite under the GPU machine's versions (requirements-gpu.txt: torch 2.11, no wandb, no nbmake),
# in a venv of its own, the notebooks left out: code that passes here runs there.
GPU_VENV ?= .venv-gpu
test-gpu-versions: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python -m pytest -o addopts="-ra --durations=15" tests

$(GPU_VENV)/.installed: requirements-gpu.txt
	python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -r requirements-gpu.txt
	touch $@

# On a GPU machine, with that machine's own python and nothing installed (docs/gpu.md):
#   make gpu-check PYTHON=python3 [GPU_CHECK_FLAGS="--report PATH --budget SECONDS"]
gpu-check:
	$(PYTHON) -m tools.gpu_check $(GPU_CHECK_FLAGS)

# The same steps at tiny sizes on the CPU: the check works before a GPU is at hand.
gpu-check-dry:
	$(PYTHON) -m tools.gpu_check --dry $(GPU_CHECK_FLAGS)
