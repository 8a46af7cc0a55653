# Two commands for a fresh clone: `make run` (the embedded default, end to end) and `make test` (the suite);
# `make test-fast` is the daily subset (everything not marked heavy).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# the generated dataset and other caches stay in the checkout (`make clean` removes them); installed: ~/.cache/alignclip
export ALIGNCLIP_CACHE ?= $(CURDIR)/.cache

# Three pytest workers, one test file each at a time, longest files first (tests/conftest.py); TEST_WORKERS=0: serial
TEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup run test test-fast wheel clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m alignclip.run_default

test: setup
	$(PY) -m pytest -q $(XDIST) tests

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not heavy" tests

wheel: setup
	$(PY) -m pip wheel --no-deps -q -w dist .

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
