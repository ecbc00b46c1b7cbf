# make setup: venv, dependencies, patched llama.cpp, native build, test models (idempotent)
# make demo:  the main job on the bundled default model
# make test:  the full test suite
# CUDA=1 builds the CUDA backend too (GGML_CUDA=ON).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SDIST_PINS := scripts/pins.json
CUDA ?= 0

export CCACHE_BASEDIR := $(CURDIR)
export GGML_CUDA := $(if $(filter 1 ON on yes,$(CUDA)),ON,OFF)

.PHONY: setup deps build models demo test clean

setup: build models

$(VENV)/.deps: pyproject.toml $(SDIST_PINS)
	$(PYTHON) -m venv $(VENV)
	command -v ccache >/dev/null || (apt-get update -qq && apt-get install -y -qq ccache) || echo "ccache not installed: rebuilds will be slower"
	$(PIP) install --quiet "scikit-build-core>=0.10" "numpy>=1.24" "gguf==0.19.0" "tqdm>=4.66" "matplotlib>=3.8" \
		"fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "jsonschema>=4.20" "pytest>=8" "openai>=1.40" "httpx>=0.27"
	# llama-cpp-python's Python code only, from the pinned, verified sdist: our build provides libllama.
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install --quiet "$$($(PY) scripts/fetch_llama.py --print-sdist)"
	touch $@

deps: $(VENV)/.deps

build: deps
	$(PIP) install --quiet --no-deps --no-build-isolation -e .

models: deps
	$(PY) scripts/fetch_models.py

demo: setup
	$(VENV)/bin/triattention-gguf demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf build third_party src/triattention_gguf/lib
