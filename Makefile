# `make test` and `make demo` work from a fresh clone: they create .venv and install
# everything they need (torch pinned to the CPU wheel 2.13.0).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PIP     := $(VPY) -m pip install --disable-pip-version-check -q

.PHONY: venv test test-fast lint demo demo-sagemaker bench chaos docs clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml Makefile
	$(PIP) --upgrade pip
	$(PIP) 'torch==2.13.0'
	$(PIP) -e '.[test,all,docs]' 'torch==2.13.0'
	touch $(STAMP)

venv: $(STAMP)

# The RGW leg (tests/servers/rgw.py): as root (CI) it must run, so a failed bring-up fails
# the suite instead of skipping it; elsewhere it is skipped with one [rgw] line.
REQUIRE_RGW ?= $(if $(filter 0,$(shell id -u)),1,0)

# The Docker leg (tests/docker/: the image built offline and run on a private dockerd,
# tests/servers/docker_engine.py): the same rule; elsewhere it is skipped with one [docker] line.
REQUIRE_DOCKER ?= $(if $(filter 0,$(shell id -u)),1,0)

# Workers for pytest-xdist. Most of the suite's time is real subprocesses waiting (imports,
# training, signals, servers), so more workers than the 2 cores still pay: README "The two commands".
WORKERS ?= 3

# The whole suite, what CI runs: the import contracts, then every test (the docs build with
# warnings as errors is one of them: tests/docs/test_docs_site.py).
test: lint
	SPOTCKPT_REQUIRE_RGW=$(REQUIRE_RGW) SPOTCKPT_REQUIRE_DOCKER=$(REQUIRE_DOCKER) KERAS_BACKEND=torch $(VPY) -m pytest -q -n $(WORKERS) --dist worksteal $(PYTEST_ARGS)

# The inner loop (<= 5 min): everything but the tests marked slow (real training runs,
# chaos and fault families, framework end-to-end runs, the Docker leg) and the RGW leg.
test-fast: lint
	SPOTCKPT_TEST_RGW=0 KERAS_BACKEND=torch $(VPY) -m pytest -q -n $(WORKERS) --dist worksteal -m "not slow" -k "not rgw" $(PYTEST_ARGS)

# Imports point down the layers only (docs/design.md "Layout"): import-linter's contracts in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/lint-imports

demo: $(STAMP)
	$(VPY) examples/demo.py

# A script written for SageMaker (SM_* variables, /opt/ml paths) under `spotckpt spot` with the
# container contract: channel download, interruptions, model.tar.gz upload (~40 s).
demo-sagemaker: $(STAMP)
	$(VPY) examples/demo_sagemaker.py

# Benchmarks against the S3 test server on loopback; writes BENCHMARKS.md (see bench/run.py). The
# schedule part (every="auto" against fixed intervals, bench/schedule.py) runs the emulator on file://.
# QUICK=1: scaled-down sizes, under 10 minutes (8.3 min on a quiet machine: docs/performance.md).
bench: $(STAMP)
	$(VPY) bench/run.py $(if $(filter-out 0,$(QUICK)),--quick)

# The reliability suites with more iterations: 500 random SIGKILLs and longer S3-fault runs
# (about 20 minutes), and every combination of the signal-at-every-phase family (180 cases,
# a third of them on RGW too). Figures print as [chaos] and [faults] lines (docs/guarantees.md).
chaos: $(STAMP)
	SPOTCKPT_CHAOS_ITERATIONS=500 $(VPY) -m pytest -q -s --timeout=7200 tests/checkpointer/test_chaos_crash.py \
		tests/remote/test_faults_s3.py tests/commit/test_faults_disk.py tests/commit/test_corruption.py \
		tests/remote/test_hostile_remote.py tests/commit/test_concurrency.py tests/remote/test_secrets.py \
		tests/supervisor/test_signal_at_every_phase.py $(PYTEST_ARGS)

# The documentation site (docs/: Sphinx, MyST Markdown, autodoc, sphinx-argparse, furo) into
# docs/_build/html; any warning fails the build.
docs: $(STAMP)
	$(VPY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) demo-work
