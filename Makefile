PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo
	$(BIN)/chachaml-ops demo demo
	@echo
	@echo '== chachaml-ops verify (exit 2 is expected: the demo store has planted faults) =='
	-$(BIN)/chachaml-ops verify --db demo/chachaml.db --min-age 1h
	@echo
	@echo '== chachaml-ops orphans (exit 1 is expected: the demo store has planted orphans) =='
	-$(BIN)/chachaml-ops orphans --db demo/chachaml.db
	@echo
	@echo 'Demo done: verify exits 2 and orphans exits 1 on this store, as planted. Try --json.'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache .hypothesis
