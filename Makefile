VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench emulator clean

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m tools.serve

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m tools.bench
	$(PY) -m tools.bench --configs callbacks,sqlite-2 --requests 10000 --generation-time 12 --spread 10

emulator: $(STAMP)
	$(PY) -m tools.emulator --port 9000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
