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
	$(PY) serve.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench.py
	$(PY) bench.py --configs callbacks --requests 10000 --generation-time 12 --spread 10

emulator: $(STAMP)
	$(PY) emulator.py --port 9000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
