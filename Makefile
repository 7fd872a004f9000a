# The two commands a fresh machine needs: `make demo` (the main job) and `make test` (the suite).
# Both do all set-up themselves: a virtualenv in .venv, the pinned torch pair, the package, the data.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair that imports together on this machine kind (see docs/decisions.md).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup data demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,sweep,slurm,wandb,faiss-cpu]'
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST comes from Debian's package (the real original idx files); apt needs root.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (or set dataset.root=...)"; exit 1; fi; \
	fi

demo: setup data
	$(VENV)/bin/ickd demo

# pytest exits 5 when it collected no test; that is not a failure of the suite's set-up.
test: setup data
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) outputs multirun demo-runs .pytest_cache
