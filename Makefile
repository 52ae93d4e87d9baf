# fatr_seg: `make demo` and `make test` each install the environment first when it is missing.
#
#   make install   .venv with torch, mmcv (compiled ops), mmengine, mmsegmentation, timm, fatr_seg
#   make test      ruff check, then the whole test suite (slow tests included)
#   make lint      ruff check and ruff format --check
#   make demo      the main job
#   make clean     build/test caches (keeps .venv and the mmcv wheel cache)
#   make distclean clean, and remove .venv
#
# Variables: PYTHON (interpreter for a new .venv; python3.11 if found, else python3).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.ONESHELL:

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Re-install when any of these change; the stamp file holds their hash.
INSTALL_INPUTS := $(sort $(wildcard requirements/*.txt)) setup.py tools/install_mmcv.sh
STAMP := $(VENV)/.fatr_seg-install-stamp
# Keeps a torch that is already in .venv (e.g. a user's CUDA build) from being replaced by pip.
TORCH_PIN := $(VENV)/torch-constraint.txt
CHECK_IMPORTS := import fatr_seg, mmseg.models, mmcv.ops, timm

.PHONY: help install test lint demo clean distclean

help:
	@sed -n '2,10p' Makefile | sed 's/^# \{0,1\}//'

install:
	@start=$$(date +%s)
	log() { printf '[make install] %s\n' "$$*"; }
	key=$$(cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$key" ] \
	        && $(PY) -c "$(CHECK_IMPORTS)" 2>/dev/null; then
	    log "environment up to date ($(VENV), requirements hash $$key): nothing to do"
	    exit 0
	fi
	if [ ! -x $(PY) ]; then
	    log "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	    $(PYTHON) -m venv $(VENV)
	fi
	if $(PY) -c "import torch" 2>/dev/null; then
	    log "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"
	else
	    log "installing torch (requirements/torch.txt)"
	    $(PIP) install -r requirements/torch.txt
	fi
	# Public version only: pip (23.x) finds no candidate for a pin with a local label (+cu130), and
	# `==2.14.1` still matches the installed 2.14.1+cu130.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(TORCH_PIN)
	log "installing requirements/{build,openmmlab,runtime,dev}.txt"
	$(PIP) install -c $(TORCH_PIN) -r requirements/build.txt -r requirements/openmmlab.txt \
	    -r requirements/runtime.txt -r requirements/dev.txt
	log "installing mmcv with compiled ops (tools/install_mmcv.sh)"
	bash tools/install_mmcv.sh $(PY)
	log "installing fatr_seg (editable)"
	$(PIP) install --no-deps --no-build-isolation -e .
	log "checking: $(CHECK_IMPORTS)"
	$(PY) -c "$(CHECK_IMPORTS)"
	echo "$$key" > $(STAMP)
	log "done in $$(( $$(date +%s) - start ))s"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# Needs only ruff: installs the dev tools into .venv without the full environment.
lint:
	@[ -x $(VENV)/bin/ruff ] || { [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	    $(PIP) install -r requirements/dev.txt; }
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	@if [ -f tools/demo.py ]; then \
	    $(PY) tools/demo.py; \
	else \
	    echo "[make demo] demo not implemented yet (tools/demo.py is missing); the environment is installed."; \
	fi

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
