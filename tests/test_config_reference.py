"""docs/config.md is the config schema as it is today: regenerated, it is byte for byte the committed page, and
it has one row for every field a config can set (walked from the pydantic models, not from the page's code)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from detoxflow.config import Config
from detoxflow.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "config.md"


def leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Dotted name -> default of every settable value of ``model``, from its pydantic fields."""
    out: dict[str, object] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(leaf_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info.default
    return out


def rows(page: str) -> dict[str, list[str]]:
    found = {}
    for line in page.splitlines():
        m = re.match(r"^\| `([a-z_.0-9]+)` \| (.*) \|$", line)
        if m:
            found[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
    return found


def test_the_committed_page_is_the_generated_one():
    assert PAGE.read_text() == reference_markdown(), (
        "docs/config.md is out of step with detoxflow/config.py: run `detoxflow config reference > docs/config.md`"
    )


def test_every_field_has_a_row_with_its_default():
    table = rows(PAGE.read_text())
    fields = leaf_fields(Config)
    assert len(fields) > 80
    assert set(fields) <= set(table), sorted(set(fields) - set(table))
    for dotted, default in fields.items():
        assert table[dotted][1] == ("`null`" if default is None else f"`{default!r}`".replace("'", '"')
                                    .replace("True", "true").replace("False", "false")), dotted
    # a few rows read by hand from config.py: type, bounds, description
    assert table["ppo.kl.target"][:3] == ["float", "`6.0`", "> 0"]
    assert table["ppo.kl.mode"][0] == '`"adaptive"` \\| `"fixed"`'
    assert table["lora.r"][2] == ">= 1, <= 1024"
    assert table["promotion.max_kl"][3] == "None = 2x ppo.kl.target"


def test_the_cli_prints_the_page():
    proc = subprocess.run([sys.executable, "-m", "detoxflow.cli", "config", "reference"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == PAGE.read_text()
