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

.PHONY: install demo test test-fast test-floor lint mutation audit bootstrap clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/detoxflow --home .detoxflow run --config $(CONFIG)

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

# The suite at the floor of every range in pyproject.toml (each "name>=X" pinned to X, the rest resolved by pip),
# in its own venv: the floors claim only what this ran. Not part of `make test`. Its own PREFECT_HOME: a Prefect
# database that a newer Prefect migrated is one an older Prefect cannot open. Torch's floor comes from PyPI
# (a CUDA build); PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU one.
FLOOR_VENV ?= .venv-floor
FLOOR_PINS = import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
  [print(m.group(1) + "==" + f.group(1)) for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)", d)) \
   and (f := re.search(r">=([0-9][0-9A-Za-z.]*)", d))]
test-floor:
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	python3 -c '$(FLOOR_PINS)' > $(FLOOR_VENV)/floor-pins.txt
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/floor-pins.txt -e ".[dev]"
	$(FLOOR_VENV)/bin/python -m pip check
	PREFECT_HOME=$(abspath $(FLOOR_VENV))/prefect-home $(FLOOR_VENV)/bin/python -m pytest -q

# Known vulnerabilities in the installed (pinned) set: pip-audit asks PyPI's JSON API (AUDIT_SERVICE=osv: OSV).
# --strict: a package the service does not answer for fails the audit (without it, pip-audit skips such
# packages and still says "No known vulnerabilities found"). Non-zero on a finding or on no answer.
AUDIT_SERVICE ?= pypi
audit: install
	$(PY) -m pip install -q pip-audit
	$(VENV)/bin/pip-audit --strict --skip-editable --progress-spinner off --vulnerability-service $(AUDIT_SERVICE)

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow and not integration"

# Mutation testing (not in CI; an hour or more on 2 cores): cosmic-ray over models/ppo.py and the trainer's
# reward/loss code, config tests/mutation/cosmic-ray.toml. cosmic-ray edits files in place, so it runs in a
# scratch copy laid out like the installed package and put first on PYTHONPATH: the working tree is never
# mutated, even by an interrupted run. `make mutation` again resumes the session; MUTATION_FRESH=1 starts over.
MUTATION_TREE := .mutation
mutation: install
	@if [ -n "$(MUTATION_FRESH)" ] || [ ! -f $(MUTATION_TREE)/session.sqlite ]; then \
	  rm -rf $(MUTATION_TREE) && mkdir -p $(MUTATION_TREE) && cp -r detoxflow tests $(MUTATION_TREE)/ \
	  && for p in models tasks flows; do cp -r $$p $(MUTATION_TREE)/detoxflow/$$p; done \
	  && cd $(MUTATION_TREE) && PYTHONPATH=. $(abspath $(VENV))/bin/cosmic-ray init tests/mutation/cosmic-ray.toml session.sqlite \
	  && PYTHONPATH=. $(abspath $(PY)) tests/mutation/scope.py session.sqlite detoxflow/models/trainer.py \
	  && $(abspath $(VENV))/bin/cr-filter-operators session.sqlite tests/mutation/cosmic-ray.toml; fi
	cd $(MUTATION_TREE) && PYTHONPATH=. $(abspath $(PY)) -c "import detoxflow.models.ppo as m, sys; \
	  sys.exit(0 if m.__file__.startswith('$(abspath $(MUTATION_TREE))') else 'the mutants would not be imported: ' + m.__file__)"
	cd $(MUTATION_TREE) && PATH=$(abspath $(VENV))/bin:$$PATH PYTHONPATH=. OMP_NUM_THREADS=1 \
	  nice cosmic-ray baseline tests/mutation/cosmic-ray.toml
	cd $(MUTATION_TREE) && PATH=$(abspath $(VENV))/bin:$$PATH PYTHONPATH=. OMP_NUM_THREADS=1 \
	  nice cosmic-ray exec tests/mutation/cosmic-ray.toml session.sqlite
	$(VENV)/bin/cr-report --show-pending $(MUTATION_TREE)/session.sqlite | tail -3

bootstrap: install
	$(VENV)/bin/detoxflow bootstrap all

clean:
	rm -rf .detoxflow .pytest_cache $(LINT_TREE) $(MUTATION_TREE)
