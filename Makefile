# Two commands do all the set-up:
#   make demo   - virtual environment + install + demo dataset + the whole pipeline on it
#   make test   - virtual environment + install + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo-data
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean-demo

$(BIN)/maskcontrast: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/maskcontrast

$(DEMO)/README.txt: stages/data/demo.py | setup  # rewritten when the generator changes
	$(BIN)/maskcontrast data make-demo $(DEMO)

demo: setup $(DEMO)/README.txt
	$(BIN)/maskcontrast --config configs/demo.yaml --set data.root=$(DEMO) run

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the slow and real-data tests too (needs ../shared for the real-data ones)
test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO) store
