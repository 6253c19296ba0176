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
DEMO := results/demos
# make demo measured from a fresh clone on 2 cores (AMD EPYC, 2026-12-05): 10 min 46 s
DEMO_MINUTES := 11
# One worker process per core (at most 8), each with its share of the cores as torch threads (bench.sweep.launch).
CORES := $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)
LOCAL_WORKERS := --launcher local --workers-per-node $(CORES)

.PHONY: install test smoke demo reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install $(TORCH_SPEC); fi
	$(PY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# The digits demo (real digits with label noise, 27 runs) and the smoke preset (every table end to end on synthetic
# data, 51 runs), then the report, results/smoke/report.md: 3 minutes on 2 cores (one CPU worker per core).
smoke: install
	rm -rf $(SMOKE)
	$(BENCH) reproduce demo --preset demo --results-dir $(SMOKE) --device cpu $(LOCAL_WORKERS)
	$(BENCH) reproduce --preset smoke --results-dir $(SMOKE) --device cpu $(LOCAL_WORKERS)
	$(BENCH) report --results-dir $(SMOKE) --preset demo --preset smoke

# The longer real-data demos: Fashion-MNIST under label noise in the memorising regime, the ASAM paper's
# sharpness study on digits, where to spend SAM's second pass on digits; then results/demo/report.md.
demo: install
	@echo "make demo: about $(DEMO_MINUTES) minutes on 2 cores (less with more: one CPU worker per core)"
	$(BENCH) reproduce fmnist --preset fmnist --results-dir $(DEMO) --device cpu $(LOCAL_WORKERS)
	$(BENCH) reproduce asam-correlation --preset demo --results-dir $(DEMO) --device cpu $(LOCAL_WORKERS)
	$(BENCH) reproduce frontier --preset frontier --results-dir $(DEMO) --device cpu $(LOCAL_WORKERS)
	$(BENCH) report --results-dir $(DEMO) --preset fmnist --preset demo --preset frontier

# Every paper table with the papers' recipes (GPU-days; resumable: re-run to continue).
reproduce: install
	$(BENCH) reproduce --preset full
	$(BENCH) report

clean:
	rm -rf $(VENV) *.egg-info $(SMOKE)
