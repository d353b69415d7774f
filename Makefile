PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m compileall -q chachaml_ops
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo
	$(BIN)/chachaml-ops demo demo
	@echo
	@echo '== chachaml-ops verify --db demo/chachaml.db =='
	@$(BIN)/chachaml-ops verify --db demo/chachaml.db; rc=$$?; echo; \
	  echo "verify exited $$rc: 2 is the expected result, the demo store has planted faults"; \
	  test $$rc -eq 2
	@echo
	@echo '== chachaml-ops orphans --db demo/chachaml.db =='
	@$(BIN)/chachaml-ops orphans --db demo/chachaml.db; rc=$$?; echo; \
	  echo "orphans exited $$rc: 1 is the expected result, the demo store has planted orphans"; \
	  test $$rc -eq 1
	@echo
	@echo 'Demo done. Try: $(BIN)/chachaml-ops verify --db demo/chachaml.db --json'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache .hypothesis
