# Two commands set everything up on a fresh machine (each creates or reuses .venv):
#   make demo   - the main job: an end-to-end run on local MedMNIST data
#   make test   - the test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# MedMNIST files: $MEDMNIST_ROOT if set, else ../shared/medmnist beside the checkout when it exists,
# else medmnist's default root (~/.medmnist, downloading when online).
SHARED_MEDMNIST := $(abspath ../shared/medmnist)
export MEDMNIST_ROOT ?= $(if $(wildcard $(SHARED_MEDMNIST)/*.npz),$(SHARED_MEDMNIST),)

.PHONY: demo test lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/zoo demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/import_cycles.py
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/import_cycles.py

# Benchmarks are scripts of the checkout that import the installed package (python -m from the repo root).
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.baseline_resnet18_28
	$(BIN)/python -m benchmarks.distill_overhead
	$(BIN)/python -m benchmarks.export_latency
	$(BIN)/python -m benchmarks.dinomx_knn --build
	$(BIN)/python -m benchmarks.dinomx_strategies
	$(BIN)/python -m benchmarks.dinomx_vs_lightly
	$(BIN)/python -m benchmarks.dinomx_pointing
	$(BIN)/python -m benchmarks.serve_load
	$(BIN)/python -m benchmarks.serve_load --format onnx-int8 --out benchmarks/results/serve_load_int8
	$(BIN)/python -m benchmarks.report

clean-venv:
	rm -rf $(VENV)
