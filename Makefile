# edgefl: the two commands are `make demo` and `make test`. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
ASYNCAPI_SPECS_VERSION := 6.11.1
ASYNCAPI_SCHEMA := .cache/asyncapi/asyncapi-3.0.0.json
JCS_VERSION := 2.1.0
JCS_MODULE := .cache/jcs/node_modules/canonicalize/package.json

.PHONY: demo test venv services lint check-python role-venvs

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgefl needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'

# torch is installed first and pinned: an open range would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[edge,train,cloud,demo,test]'
	touch $@

venv: $(VENV)/.installed

# A device installs only the edge extra, a cloud host only the cloud extra: the tests run
# each role from such a venv (editable, so they run the code of this checkout).
EDGE_VENV := .cache/venv-edge
CLOUD_VENV := .cache/venv-cloud

$(EDGE_VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip --disable-pip-version-check install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip --disable-pip-version-check install --quiet -e '.[edge]'
	touch $@

$(CLOUD_VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(CLOUD_VENV)
	$(CLOUD_VENV)/bin/python -m pip --disable-pip-version-check install --quiet --upgrade pip
	$(CLOUD_VENV)/bin/python -m pip --disable-pip-version-check install --quiet torch==2.13.0
	$(CLOUD_VENV)/bin/python -m pip --disable-pip-version-check install --quiet -e '.[cloud]'
	touch $@

# The TFLite converter (litert-torch) pins packages the cloud cannot share: its own venv,
# which the optimizer runs as a subprocess (EDGEFL_CONVERTER_PYTHON).
CONVERT_VENV := .cache/venv-convert

$(CONVERT_VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/python -m pip --disable-pip-version-check install --quiet --upgrade pip
	$(CONVERT_VENV)/bin/python -m pip --disable-pip-version-check install --quiet torch==2.13.0
	$(CONVERT_VENV)/bin/python -m pip --disable-pip-version-check install --quiet -e '.[convert]'
	touch $@

role-venvs: $(EDGE_VENV)/.installed $(CLOUD_VENV)/.installed $(CONVERT_VENV)/.installed

# Servers the tests start (Mosquitto; VictoriaMetrics, which speaks the InfluxDB v2 write
# API): installed with apt-get when missing and we are root. The tests start their own
# instances on free ports; the packages' system services are not used.
services:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v victoria-metrics >/dev/null || missing="$$missing victoria-metrics"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "The tests need:$$missing (sudo apt-get install$$missing)" >&2; exit 1; \
	fi

# The official AsyncAPI 3.0 JSON Schema, from the npm package @asyncapi/specs.
$(ASYNCAPI_SCHEMA):
	@command -v npm >/dev/null || { echo "npm is required to fetch @asyncapi/specs (apt-get install npm)" >&2; exit 1; }
	mkdir -p .cache/asyncapi
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/asyncapi @asyncapi/specs@$(ASYNCAPI_SPECS_VERSION)
	cp '.cache/asyncapi/node_modules/@asyncapi/specs/schemas/3.0.0-without-$$id.json' $@

# An independent RFC 8785 implementation (npm `canonicalize`): the tests verify release
# signatures with it and node:crypto, as a non-Python consumer would.
$(JCS_MODULE):
	@command -v npm >/dev/null || { echo "npm is required to fetch canonicalize (apt-get install npm)" >&2; exit 1; }
	mkdir -p .cache/jcs
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/jcs canonicalize@$(JCS_VERSION)

demo: venv
	$(VENV)/bin/edgefl demo

test: venv services $(ASYNCAPI_SCHEMA) $(JCS_MODULE) role-venvs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
