# sambench. Every target depends on `install`, so each one works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BENCH := $(VENV)/bin/bench
# Pin torch here when your platform needs a particular build, e.g.
#   make install TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# Left empty, pip picks the newest torch your platform gets.
TORCH_SPEC ?=
SMOKE := results/smoke

.PHONY: install test smoke reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install $(TORCH_SPEC); fi
	$(PY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# The demo (real digits with label noise, ~1.5 min) and the smoke preset (every built table end to end on
# synthetic data, < 1 min), then the report: results/smoke/report.md.
smoke: install
	rm -rf $(SMOKE)
	$(BENCH) reproduce --preset demo --results-dir $(SMOKE) --device cpu
	$(BENCH) reproduce --preset smoke --results-dir $(SMOKE) --device cpu
	@if $(PY) -c "import os, sys; from tasks.fashion_mnist import find_folder; sys.exit(find_folder(os.environ.get('SAMBENCH_DATA_DIR', 'data')) is None)"; then \
	  OMP_NUM_THREADS=1 $(BENCH) reproduce fmnist --preset fmnist --results-dir $(SMOKE) --device cpu; \
	else echo "fmnist demo skipped: no Fashion-MNIST data (apt-get install dataset-fashion-mnist, or the four idx files in data/FashionMNIST/raw/)"; fi
	$(BENCH) report --results-dir $(SMOKE) --preset demo --preset smoke --preset fmnist

# Every paper table with the papers' recipes (GPU-days; resumable: re-run to continue).
reproduce: install
	$(BENCH) reproduce --preset full
	$(BENCH) report

clean:
	rm -rf $(VENV) *.egg-info $(SMOKE)
