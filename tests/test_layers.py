"""The layers the architecture promises, checked at run time: the ML core loads without Prefect or MLflow.

import-linter (`make lint`) checks the import statements; this checks what actually lands in ``sys.modules``
(a third-party package, trl or transformers say, could pull either in behind our back)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------------------ module map and size
ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the repository (pyproject.toml's package-dir)
PACKAGE_DIRS = {"detoxflow": ROOT / "detoxflow", "detoxflow.models": ROOT / "models",
                "detoxflow.tasks": ROOT / "tasks", "detoxflow.flows": ROOT / "flows"}
MAX_LINES = 450
EXCEPTION_MARK = "exception to the 450-line rule"


def _package_modules() -> dict[str, Path]:
    """Every module of the installed package -> its file, from the folders (not from an import)."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "detoxflow" and parts and parts[0] in ("models", "tasks", "flows"):
                continue
            out[name] = path
    return out


def test_package_modules_are_found():
    mods = _package_modules()
    assert "detoxflow.models.ppo" in mods and "detoxflow.cli" in mods and "detoxflow.flows.pipeline" in mods
    assert len(mods) > 40


def test_modules_stay_within_450_lines_unless_their_docstring_names_the_exception():
    too_long = []
    for name, path in _package_modules().items():
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MAX_LINES and EXCEPTION_MARK not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{name} ({n} lines)")
    assert not too_long, f"over {MAX_LINES} lines with no '{EXCEPTION_MARK}' in the docstring: {too_long}"


def test_every_module_has_a_docstring_and_a_line_in_docs_architecture():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing_doc, missing_map = [], []
    for name, path in _package_modules().items():
        if name.endswith("__main__"):
            continue
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))):
            missing_doc.append(name)
        if f"`{name}`" not in doc:
            missing_map.append(name)
    assert not missing_doc, f"modules without a docstring: {missing_doc}"
    assert not missing_map, f"docs/architecture.md's module map lacks: {missing_map}"
