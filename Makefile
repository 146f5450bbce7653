# Quick start: `make demo` and `make test` install into .venv when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# where torch comes from: pip's configured index by default (this project's machines serve the CPU build);
# elsewhere on Linux, TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" avoids the CUDA wheels
TORCH_INDEX ?=

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 $(TORCH_INDEX)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,nudenet,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metaunlearn demo

# two workers of one torch thread each (tests/conftest.py), a test file per worker: the suite's wall time on
# a 2-core machine is about 0.6x that of one process
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST) --durations=12

test-all: $(STAMP)
	$(PYTEST) -m ""

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
