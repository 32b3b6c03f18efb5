# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install
# everything from PyPI with the exact versions in constraints.txt (torch first, so that the
# CPU build on this machine's disk is used instead of a multi-GB CUDA download).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rcl-dist demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/loss_timing.py --out benchmarks/results/loss_timing_cpu.md

clean:
	rm -rf $(VENV) .pytest_cache
