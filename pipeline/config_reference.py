"""The configuration reference, generated from the schema so that the README cannot drift.

`python -m pipeline.config_reference` prints the markdown table; `--check README.md`
fails when the README's copy is out of date (a test runs it).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The config sections (pydantic models) inside a field's type, e.g. `X | Literal[False]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _sections(arg)]


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is typing.Annotated:  # a type with validators: the table shows the type
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " or ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below" if type(value).model_fields else "{}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if not isinstance(value, list) or value else "`[]`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        sections = _sections(field.annotation)
        doc = field.description or next((m.__doc__.strip().splitlines()[0] for m in sections if m.__doc__), "")
        cells = [f"`{key}`", _type_name(field.annotation), _default(field), doc]
        # A `|` inside a cell would end it, even inside backticks.
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for section in sections:
            child_prefix = f"{key}[]." if get_origin(field.annotation) is list else f"{key}."
            out.extend(rows(section, child_prefix))
    return out


def reference() -> str:
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(header + rows(Config))


def check(readme: Path) -> bool:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return False
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    return current == reference().strip()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--check":
        if check(Path(argv[1])):
            return 0
        print(f"{argv[1]}: configuration reference is out of date; paste `python -m pipeline.config_reference`")
        return 1
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        text = path.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(f"{head}{BEGIN}\n{reference()}\n{END}{tail}", encoding="utf-8")
        return 0
    print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
