# cxr-workbook: `make workbook` runs every notebook, `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.  `make teach` runs the classroom
# profile and keeps its executed notebooks in results/teach; `make html` renders them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := cxr-workbook
PROFILE ?= teach
# Where the upstream sources live; empty means: use $CXR_DATA_DIR.
DATA ?=
PYTEST_ARGS ?=
# Extra runner arguments, e.g. ARGS="-p balance=down --only 01 02".
ARGS ?=

.PHONY: install workbook test lab teach teach-data html clean-runs gpu-check

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-grid.txt requirements-track.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt -r requirements-grid.txt -r requirements-track.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"
	touch $@

install: $(VENV)/.installed

workbook: install
	$(PY) -m nbhelpers run --profile $(PROFILE) $(if $(DATA),--data-dir $(DATA)) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The teaching profile's films, without credentials, into DATA (then: make workbook DATA=...).
teach-data: install
	@test -n "$(DATA)" || { echo "make teach-data needs DATA=FOLDER, the folder to fill"; exit 2; }
	$(VENV)/bin/workbook download --to $(DATA) --teach

# Jupyter refuses to start as root unless told; containers and CI often run as root.
lab: install
	$(if $(DATA),CXR_DATA_DIR=$(DATA)) $(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# The committed classroom run: executed into results/runs/teach (checkpoints and caches stay
# there, ignored), its notebooks and timings copied to results/teach, then rendered.
TEACH_RUN := results/runs/teach
teach: install
	$(PY) -m nbhelpers run --profile teach $(if $(DATA),--data-dir $(DATA)) --out $(TEACH_RUN) $(ARGS)
	$(PY) -m nbhelpers html $(TEACH_RUN) --publish results/teach

html: install
	$(PY) -m nbhelpers html results/teach --out results/teach/html

clean-runs:
	rm -rf results/runs results/cache

# The GPU check with the machine's own python3 (build gpu_cache/ first: workbook gpu-check build-cache).
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)
