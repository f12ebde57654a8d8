# `make run` and `make test` set up .venv from the requirements when missing or changed, then act.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all setup clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamlit run dashboard.py

test: $(STAMP)
	$(PY) -m pytest

# Everything, slow tests included (longer real training runs).
test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

clean-venv:
	rm -rf $(VENV)
