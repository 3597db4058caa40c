# icbd: `make demo` and `make test` install what is missing themselves.
VENV   := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP  := $(VENV)/.installed

.PHONY: setup test test-quick demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-packages
	scripts/install-packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q tests

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow" tests

demo: setup
	$(VENV)/bin/python -m bench.demo

bench: setup
	$(VENV)/bin/icbd bench

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build bench-out demo-out
