# Two commands on a fresh machine: `make bench` (the benchmark suite, default configuration) and
# `make test`. Each creates .venv if needed and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.fastlstm-built
EXT_SOURCES := $(shell find csrc -name "*.cpp" -o -name "*.cu" -o -name "*.h" -o -name "*.cuh") csrc/sources.txt setup.py

.PHONY: test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements/dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

# Builds fastlstm._C (C++ CPU kernels, plus CUDA kernels when nvcc and a CUDA torch are present).
$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

bench: $(BUILD_STAMP)
	$(PY) -m fastlstm bench

clean:
	rm -rf build *.egg-info fastlstm/*.so $(BUILD_STAMP)
