"""The one base class of every config section (dataprep's, training's and pipeline's): unknown keys are errors,
assignments are validated too, and numbers are numbers (no NaN or infinity, no `true` for a count)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _is_number(annotation: Any) -> bool:
    """int or float, or a union of them with other types, but not one that also takes a bool or a literal
    (`MinhashConfig | Literal[False]`), where `true`/`false` means something."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    if any(arg is bool or typing.get_origin(arg) is typing.Literal for arg in args):
        return False
    return any(arg in (int, float) for arg in args)


class Section(BaseModel):
    # allow_inf_nan: `lr: .nan` or `max_minutes: .inf` would pass every bound check and wreck a run much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `max_steps: true` as 1
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, not a boolean")
        return value
