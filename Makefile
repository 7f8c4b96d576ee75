# `make demo` and `make test` each set up .venv on first use (scripts/setup.sh).
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/lora train configs/demo-smollm2.yaml --overwrite
	$(BIN)/lora generate runs/demo-smollm2 --compare-base --max-new-tokens 60 \
		--prompt "What is the capital of France?" --prompt "How do I make tea?"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests
