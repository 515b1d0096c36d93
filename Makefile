# Two entry points, both idempotent: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# test processes (pytest-xdist): the suite took 15.5 min in one process on a 2-core machine, 10.2 in two
TEST_WORKERS ?= 2

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,triton]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m nlcompile.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) benchmarks/bench_chunkwise.py

clean:
	rm -rf $(VENV) build *.egg-info
