# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install
# everything from PyPI with the exact versions in constraints.txt (torch first, so that the
# CPU build on this machine's disk is used instead of a multi-GB CUDA download).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench crosscheck clean

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

# deepinv needs torchvision, which does not import beside torch 2.13.0: its own environment (~5.6 GB, from
# this machine's disk), with rcl_dist's core imported from the checkout (benchmarks/deepinv_crosscheck.py)
CROSS ?= .venv-crosscheck
$(CROSS)/.installed:
	$(PYTHON) -m venv $(CROSS)
	$(CROSS)/bin/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(CROSS)/bin/python -m pip install deepinv==0.5.0 scikit-image pyarrow pyyaml
	touch $(CROSS)/.installed

crosscheck: $(CROSS)/.installed
	$(CROSS)/bin/python benchmarks/deepinv_crosscheck.py --out benchmarks/results/deepinv_crosscheck_cpu --seeds 0 1 --threads 1

clean:
	rm -rf $(VENV) $(CROSS) .pytest_cache
