# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: on CI's two cores, two (tests/conftest.py gives each its share of the cores)
TEST_WORKERS ?= 2

.PHONY: demo test install schemas evals clean

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
	$(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --dist worksteal --durations=30

schemas: $(STAMP)
	$(BIN)/skillbank schemas generate

# Every skill's eval tasks, run with their reference solutions (about 10 minutes on 2 CPU cores); writes
# skills/<skill>/evals/results/ and BENCHMARK.md. Grade an agent with `skillbank skills eval --agent CMD`.
evals: $(STAMP)
	$(BIN)/skillbank skills eval

clean:
	rm -rf $(VENV) .pytest_cache
