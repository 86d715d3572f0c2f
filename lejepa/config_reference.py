"""The configuration reference, docs/configuration.md, written from the typed config so it never goes stale.

    python -m lejepa.config_reference > docs/configuration.md      # `make docs`

Every section of `PipelineConfig` becomes a table of its fields (type, default, and the docstring written
under the field in lejepa/config.py); the profiles in infra/*.yaml follow, each with the first line of its
header comment. tests/test_config.py fails when the page differs from what this prints.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lejepa.config import PipelineConfig

PROFILES = Path(__file__).parents[1] / "infra"


def reference() -> str:
    """The whole page, as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `lejepa/config.py` by `python -m lejepa.config_reference > docs/configuration.md`",
        "(`make docs`); a test fails when this page is stale. Set a field in a YAML file passed with",
        "`--config FILE`, or on the command line with `--set section.field=value` (YAML syntax: `--set",
        "views.global_scale=[0.4,1.0]`). Unknown fields are refused, naming the field.",
        "",
    ]
    top = [(name, field) for name, field in PipelineConfig.model_fields.items() if not _section(field)]
    for name, field in PipelineConfig.model_fields.items():
        if _section(field):
            lines += _section_table(name, field.annotation)
    lines += ["## Top level", "", *_table([(name, field) for name, field in top]), ""]
    lines += _profiles()
    return "\n".join(lines).rstrip() + "\n"


def _section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _section_table(prefix: str, model: type[BaseModel]) -> list[str]:
    """A heading, the section's docstring, its fields' table, then its sub-sections the same way."""
    lines = [f"## `{prefix}`", ""]
    if model.__doc__:
        lines += [_one_paragraph(model.__doc__), ""]
    plain = [(f"{prefix}.{n}", f) for n, f in model.model_fields.items() if not _section(f)]
    lines += [*_table(plain), ""]
    for name, field in model.model_fields.items():
        if _section(field):
            lines += _section_table(f"{prefix}.{name}", field.annotation)
    return lines


def _table(fields: list[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields:
        default = field.get_default(call_default_factory=True)
        meaning = _one_paragraph(field.description or "")
        kind, value = _cell(_type_name(field.annotation)), _cell(_value(default))
        rows.append(f"| `{name}` | {kind} | {value} | {_cell(meaning)} |")
    return rows


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # validators ride along: the type is the first argument
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`" if value is not None else "`null`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def _one_paragraph(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _profiles() -> list[str]:
    lines = ["## Profiles", "", "Ready-made configs in `infra/`, passed with `--config`:", ""]
    for path in sorted(PROFILES.glob("*.yaml")):
        first = path.read_text().splitlines()[0]  # the profile's header comment starts with what it is for
        summary = first.lstrip("# ").strip() if first.startswith("#") else "no description"
        lines.append(f"- `infra/{path.name}`: {summary}")
    return lines


if __name__ == "__main__":
    print(reference(), end="")
