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
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/baseline_resnet18_28.py
	$(BIN)/python benchmarks/distill_overhead.py
	$(BIN)/python benchmarks/export_latency.py
	$(BIN)/python benchmarks/dinomx_knn.py --build
	$(BIN)/python benchmarks/dinomx_strategies.py
	$(BIN)/python benchmarks/dinomx_vs_lightly.py
	$(BIN)/python benchmarks/dinomx_pointing.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/serve_load.py --precision int8 --out benchmarks/results/serve_load_int8
	$(BIN)/python benchmarks/report.py

clean-venv:
	rm -rf $(VENV)
