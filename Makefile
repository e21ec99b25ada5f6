# Two commands from a fresh checkout: `make run` (demo) and `make test` (whole suite); `make docs` builds the docs site.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test docs install clean-runs help

help:
	@echo "make run    - install into $(VENV) if needed, benchmark every method and both baselines on noisy digits (one seed, one budget), print the leaderboard"
	@echo "make test   - install into $(VENV) if needed, run the whole test suite"
	@echo "make docs   - install into $(VENV) if needed, build the docs site into site/ (warnings are errors)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/metacorrect bench configs/suites/digits-quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site
	@echo "docs built: open $(CURDIR)/site/index.html (or serve them: $(BIN)/python -m mkdocs serve)"

clean-runs:
	rm -rf runs mlruns data
