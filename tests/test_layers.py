"""The layers the architecture promises, checked at run time: the ML core loads without Prefect or MLflow.

import-linter (`make lint`) checks the import statements; this checks what actually lands in ``sys.modules``
(a third-party package, trl or transformers say, could pull either in behind our back)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import detoxflow.models

_PROBE = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))))
"""


def _core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(detoxflow.models.__path__, "detoxflow.models."))


def test_the_core_module_list_is_complete():
    names = _core_modules()
    # the list the probe imports is discovered, not written down: a new module is covered without a test edit
    for expected in ("detoxflow.models.ppo", "detoxflow.models.trainer", "detoxflow.models.trl_backends",
                     "detoxflow.models.policy", "detoxflow.models.reward"):
        assert expected in names


def test_every_core_module_imports_without_prefect_or_mlflow():
    names = _core_modules()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {len(names)} detoxflow.models modules loaded {loaded[:10]}"
