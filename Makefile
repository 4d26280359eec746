# Two commands do everything on a fresh clone:
#   make reports   set up .venv, then regenerate reports/ on the embedded default dataset
#   make test      set up .venv, then run the notebook tests and pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so that pip takes the wheels this machine keeps on disk; override for another platform,
# e.g. make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= small
# Two templates at a time, one thread each: small CPU models use a second core poorly inside one process.
JOBS ?= 2
STAMP := $(VENV)/.installed

.PHONY: install test reports lab export clean-nbs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, kornia, timm, nbdev, papermill" 
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name python3 >/dev/null
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

reports: $(STAMP)
	$(VENV)/bin/attnssl reproduce --profile $(PROFILE) --jobs $(JOBS)

# JupyterLab on the notebooks (adds the optional `lab` extra)
lab: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,lab]" 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/jupyter lab nbs

# Developer helpers: notebooks are the source of truth; attnssl/ is generated.
export: $(STAMP)
	$(VENV)/bin/nbdev-export
clean-nbs: $(STAMP)
	$(VENV)/bin/nbdev-clean
