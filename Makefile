# Two commands a newcomer needs: `make demo` (train on synthetic faces) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install demo test gpu-check gpu-check-dry

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

demo: install
	$(PYTHON) run_training.py --demo

test: install
	$(PYTHON) -m pytest

# On a GPU machine, with that machine's own python and nothing installed (docs/gpu.md):
#   make gpu-check PYTHON=python3 [GPU_CHECK_FLAGS="--report PATH --budget SECONDS"]
gpu-check:
	$(PYTHON) gpu_check.py $(GPU_CHECK_FLAGS)

# The same steps at tiny sizes on the CPU: the check works before a GPU is at hand.
gpu-check-dry:
	$(PYTHON) gpu_check.py --dry $(GPU_CHECK_FLAGS)
