# Two commands for a fresh machine:
#   make demo   install, train the default model, export it, score PTB test, generate a sample
#   make test   install, lint, and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CELL ?= lstm
BUDGET ?= 20
# The CPU build of torch; on a CUDA machine set TORCH="torch" (or the build you want) instead.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/rnnlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[train,server,dev]'
	touch $@

install: $(BIN)/rnnlm

demo: install
	$(BIN)/rnnlm train --cell $(CELL) --time-budget $(BUDGET) --force
	$(BIN)/rnnlm export --cell $(CELL)
	$(BIN)/rnnlm score "$$($(BIN)/rnnlm data --path)/ptb.test.txt" --model models/$(CELL)
	$(BIN)/rnnlm generate --model models/$(CELL) --prompt "the stock market" --max-tokens 30 --temperature 0.8 --seed 7

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

bench: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/http_load.py --model models/$(CELL)
	$(BIN)/python bench/ddp_throughput.py --data-dir "$$($(BIN)/rnnlm data --path)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
