# The two commands of the README: `make demo` and `make test`. Each builds its own
# virtual environment on a fresh machine; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a local CPU build; a bare `torch` would pull several GB of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[server,torch,keras,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchd demo

test: $(STAMP)
	$(BIN)/ruff check client server tests benchmarks
	$(BIN)/ruff format --check client server tests benchmarks
	$(BIN)/mypy
	KERAS_BACKEND=torch $(BIN)/pytest

reliability: $(STAMP)
	KERAS_BACKEND=torch $(BIN)/pytest -m reliability

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
