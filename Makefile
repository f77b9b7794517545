# One entry point for a fresh machine. Every target builds what it needs:
#   make demo   - the main job: mecefo-demo, 4 CPU replicas train a tiny LLaMA, one is SIGKILLed and rejoins
#   make test   - the whole test suite (Triton kernels in interpreter mode on CPU)
#   make info   - which backends are live here, and why not the others
#   make bench  - kernel microbenchmarks, appended to bench/results/results.csv
#
# The virtual environment (.venv) is created and filled from requirements/cpu.txt, then this
# project is installed editable with its C++ extension (MECEFO_REQUIRE_EXT=1: a broken
# extension fails the build instead of silently falling back). The newest releases pyproject.toml
# allows, where they differ (requirements/newest.txt), go to .venv/newest, which only the tests that
# check them put on sys.path (tests/packaging/test_newest_allowed.py).

PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements/cpu.txt
NEWEST_REQUIREMENTS := requirements/newest.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.mecefo-installed
PYTEST_ARGS ?=

.PHONY: venv demo test info bench clean

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS) $(NEWEST_REQUIREMENTS) setup.py pyproject.toml $(wildcard csrc/*)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(REQUIREMENTS)
	rm -rf $(VENV)/newest
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/newest -r $(NEWEST_REQUIREMENTS)
	MECEFO_REQUIRE_EXT=1 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m mecefo_kernels.info
	@touch $@

demo: venv
	$(BIN)/mecefo-demo

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

info: venv
	$(BIN)/python -m mecefo_kernels.info

bench: venv
	$(BIN)/python bench/kernel_bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info mecefo_kernels/_C*.so mecefo_kernels/_build_info.json
