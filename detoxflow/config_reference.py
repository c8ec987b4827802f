"""The config reference page (docs/config.md), generated from the pydantic schema of :mod:`detoxflow.config`.

``detoxflow config reference > docs/config.md`` writes it; tests/test_config_reference.py fails when the page and
the schema disagree. One table per section, one row per field: its dotted name, type, default, the bounds the
schema enforces and the field's description, all read from ``Config.model_json_schema()``.
"""

from __future__ import annotations

import json
from typing import Any

from detoxflow.config import Config

HEADER = """# Config reference

Every field of a detoxflow config, generated from the schema in `detoxflow/config.py` by
`detoxflow config reference > docs/config.md` (a test fails when this page is out of step). A config file sets
any of them by section (`ppo:` then `  steps: 40`); `--set ppo.steps=40` on the command line and a deployment's
`overrides` set one by its dotted name. Unknown fields are refused with the list of the allowed ones.
"""

BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else schema


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "anyOf" in prop:
        return " \\| ".join(_type(p, defs) for p in prop["anyOf"])
    if "$ref" in prop:
        return "section"
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}), defs)}"
    return {"null": "null", "integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind)


def _bounds(prop: dict[str, Any]) -> str:
    parts = [f"{sign} {prop[key]:g}" for key, sign in BOUNDS if key in prop]
    for alt in prop.get("anyOf", []):
        parts += [f"{sign} {alt[key]:g}" for key, sign in BOUNDS if key in alt]
    if "pattern" in prop:
        parts.append(f"matches `{prop['pattern']}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(name: str, schema: dict[str, Any], defs: dict[str, Any], out: list[str]) -> None:
    """Rows of the section ``name`` (dotted; "" for the top level), then its subsections."""
    title = f"`{name}`" if name else "Top level"
    out += ["", f"## {title}", ""]
    if schema.get("description"):
        out += [_cell(schema["description"]), ""]
    out += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    subsections = []
    for field, prop in schema["properties"].items():
        dotted = f"{name}.{field}" if name else field
        target = _resolve(prop, defs)
        if "properties" in target:
            subsections.append((dotted, target))
            out.append(f"| `{dotted}` | section | | | see [`{dotted}`](#{dotted.replace('.', '')}) |")
            continue
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "required"
        out.append(f"| `{dotted}` | {_type(prop, defs)} | {_cell(default)} | {_bounds(prop)} | "
                   f"{_cell(prop.get('description', ''))} |")
    for dotted, target in subsections:
        _section(dotted, target, defs, out)


def reference_markdown() -> str:
    """The whole page: :data:`HEADER`, then the top-level fields and each section, in schema order."""
    schema = Config.model_json_schema()
    defs = schema.get("$defs", {})
    out = [HEADER.rstrip()]
    _section("", schema, defs, out)
    return "\n".join(out) + "\n"
