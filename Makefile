# Two commands a newcomer needs: `make demo` (train on synthetic faces) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

demo: install
	$(PYTHON) run_training.py --demo

test: install
	$(PYTHON) -m pytest
