VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: `make run` installs only what running needs (requirements.txt); `make test` adds the test tools.
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: run test bench emulator clean

$(VENV)/bin/python:
	python3 -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# --no-compile: the modules the service imports are compiled on first use, not every module of every package.
$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	touch $(RUNTIME)

$(DEV): requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(RUNTIME) $(DEV)

run: $(RUNTIME)
	$(PY) -m tools.serve

test: $(DEV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(DEV)
	$(PY) -m tools.bench
	$(PY) -m tools.bench --configs callbacks,sqlite-2 --requests 10000 --generation-time 12 --spread 10

emulator: $(RUNTIME)
	$(PY) -m tools.emulator --port 9000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
