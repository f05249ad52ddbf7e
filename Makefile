# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install schemas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the project's dependencies change.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/skillbank demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

schemas: $(STAMP)
	$(BIN)/skillbank schemas generate

clean:
	rm -rf $(VENV) .pytest_cache
