# Each target does its own set-up: a virtual environment in .venv with everything installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on a machine with a local CPU build of it pip takes that; elsewhere PyPI's (CUDA on Linux).
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo-model
PORT ?= 8000

.PHONY: install browser serve test demo bench bench-multiturn bench-grammar lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Debian's chromium, for the chat page test (playwright drives it; no browser download). Installing it
# needs root (as in CI); without it that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium is not installed: the chat page test will be skipped"

serve: install
	$(PY) server.py --config config.yaml

test: install browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# A tiny random-weight Phi-3 built locally (no download), served on $(PORT): it answers gibberish,
# through every real code path.
demo: install
	test -f $(DEMO_DIR)/config.json || $(PY) -m ptserve.tinymodel $(DEMO_DIR) --hidden 256 --layers 4 --heads 8 --intermediate 704
	$(PY) server.py --config config.yaml --model $(DEMO_DIR) --port $(PORT)

# Serving benchmark against `transformers serve --continuous-batching` on a random-weight Phi-3 (hidden 512, 8 layers, Phi-3.5's tokenizer: 58.5M parameters).
bench: install
	$(PY) bench/serve.py --out bench/out/results.json

# Multi-turn chat (4 conversations x 8 turns at once, ~2.1k-token prompts by turn 8): TTFT per turn of ptserve
# with and without its prefix cache, and of vLLM's CPU build with and without its own (/tmp/vllm-venv).
bench-multiturn: install
	$(PY) bench/multiturn.py --out bench/out/multiturn.json

# What a JSON-schema grammar costs per token in a 16-request batch (32k vocabulary).
bench-grammar: install
	$(PY) bench/grammar.py --out bench/out/grammar.json

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
