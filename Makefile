# The README's two commands: `make demo` (set up + run the pipeline on the embedded default, offline)
# and `make test` (set up + run the whole test suite). Both work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip picks the CPU build of 2.13.0 lying on this disk; choose another torch with `make TORCH=torch==X demo`.
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: install demo test test-fast lint bootstrap clean audit

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/detoxflow run --config $(CONFIG)

# The guard rails: ruff, and the layers contract (import-linter, pyproject.toml [tool.importlinter]).
# import-linter reads packages from disk, and detoxflow.models/tasks/flows live in top-level folders
# (package-dir), so the installed package's shape is laid out in a scratch folder first.
LINT_TREE := .lint-tree
lint: install
	$(VENV)/bin/ruff check .
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE) && cp -r detoxflow $(LINT_TREE)/ \
	  && for p in models tasks flows; do cp -r $$p $(LINT_TREE)/detoxflow/$$p; done
	cd $(LINT_TREE) && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports ../pyproject.toml

test: install lint
	$(VENV)/bin/python -m pytest -q

# Known vulnerabilities in the installed (pinned) set: pip-audit asks PyPI's JSON API (AUDIT_SERVICE=osv: OSV).
# --strict: a package the service does not answer for fails the audit (without it, pip-audit skips such
# packages and still says "No known vulnerabilities found"). Non-zero on a finding or on no answer.
AUDIT_SERVICE ?= pypi
audit: install
	$(PY) -m pip install -q pip-audit
	$(VENV)/bin/pip-audit --strict --skip-editable --progress-spinner off --vulnerability-service $(AUDIT_SERVICE)

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow and not integration"

bootstrap: install
	$(VENV)/bin/detoxflow bootstrap all

clean:
	rm -rf .detoxflow .pytest_cache $(LINT_TREE)
