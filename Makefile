# mmkit: two commands do all the set-up (see README.md).
#   make demo   create .venv, install mmkit, launch the main job
#   make test   create .venv, install mmkit[dev], run the tests and the notebooks (SMOKE=1)
# Both are safe to re-run: the install step runs again only when pyproject.toml changes.
#
# CPU-only machine? Avoid the multi-GB CUDA build of torch by naming PyTorch's CPU wheel index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV   ?= .venv
TORCH_INDEX ?=
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install env

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "mmkit needs Python 3.10+, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --quiet torch torchvision --index-url "$(TORCH_INDEX)"; fi
	$(PIP) install --quiet -e ".[dev,data]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mmkit demo

test: install
	SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest -q tests --nbmake notebooks

env: install
	$(VENV)/bin/mmkit env
