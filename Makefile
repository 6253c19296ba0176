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

.PHONY: install test smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install $(TORCH_SPEC); fi
	$(PY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# Fake CIFAR-10 in torchvision's format, ResNet-20, 2 epochs, SGD vs SAM vs ASAM on the CPU (~1 minute).
smoke: install
	rm -rf $(SMOKE)
	$(BENCH) data fake cifar10 $(SMOKE)/data --train 1000 --test 500
	for m in sgd sam asam; do \
	  $(BENCH) run cifar10 --model resnet20 --minimizer $$m --epochs 2 --device cpu \
	    --data-dir $(SMOKE)/data --results-dir $(SMOKE) || exit 1; \
	done
	$(BENCH) show cifar10 --results-dir $(SMOKE)

clean:
	rm -rf $(VENV) *.egg-info $(SMOKE)
