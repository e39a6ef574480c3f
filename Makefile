# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
THREADS ?= 2

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m edgetrain bench --config benchmarks/demo.yaml --threads $(THREADS) --out runs/demo --force

# the venv's bin on PATH: torch builds the compiled AMSim kernel with the venv's ninja
test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-slow: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
