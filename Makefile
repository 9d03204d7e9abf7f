# `make test` and `make demo` work from a fresh clone: they create .venv and install
# everything they need (torch pinned to the CPU wheel 2.13.0).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PIP     := $(VPY) -m pip install --disable-pip-version-check -q

.PHONY: venv test demo clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml Makefile
	$(PIP) --upgrade pip
	$(PIP) 'torch==2.13.0'
	$(PIP) -e '.[test,all]' 'torch==2.13.0'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	KERAS_BACKEND=torch $(VPY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) examples/demo.py

clean:
	rm -rf $(VENV) demo-work
