# cxr-workbook: `make workbook` runs every notebook, `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := cxr-workbook
PROFILE ?= full
# Where the upstream sources live; empty means: use $CXR_DATA_DIR.
DATA ?=
PYTEST_ARGS ?=
# Extra runner arguments, e.g. ARGS="-p balance=down --only 01 02".
ARGS ?=

.PHONY: install workbook test lab clean-runs

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"
	touch $@

install: $(VENV)/.installed

workbook: install
	$(PY) -m nbhelpers run --profile $(PROFILE) $(if $(DATA),--data-dir $(DATA)) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf results/runs results/cache
