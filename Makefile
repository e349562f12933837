# zipserve: the two commands a user needs.
#   make serve   set up, then serve the embedded default model (issue 7 adds the HTTP server; until then this
#                runs the engine on the default model with a demo prompt)
#   make test    set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup test test-all serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build).
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" --timeout=900

test-all: setup
	$(PY) -m pytest -q --timeout=3600

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
