"""The one base class of every config section (dataprep's, training's and pipeline's): unknown keys are errors,
assignments are validated too, and numbers are numbers (no NaN or infinity, no `true` for a count)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _is_number(annotation: Any) -> bool:
    """int, float or a literal of numbers (`zero_stage: Literal[0, 1, 2, 3]`), or a union holding one, but not a
    union that also takes a bool (`MinhashConfig | Literal[False]`), where `true`/`false` means something."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    literals = [value for arg in args if typing.get_origin(arg) is typing.Literal for value in typing.get_args(arg)]
    if any(arg is bool for arg in args) or any(isinstance(value, bool) for value in literals):
        return False
    return any(arg in (int, float) for arg in args) or any(isinstance(value, int | float) for value in literals)


def _numbers_inside(annotation: Any) -> bool:
    """A tuple or list of numbers (`betas: tuple[float, float]`)."""
    if typing.get_origin(annotation) not in (tuple, list):
        return False
    return all(_is_number(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)


class Section(BaseModel):
    # allow_inf_nan: `lr: .nan` or `max_minutes: .inf` would pass every bound check and wreck a run much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `max_steps: true` as 1
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if isinstance(value, bool) and _is_number(field.annotation):
            raise ValueError("expected a number, not a boolean")
        if (isinstance(value, list | tuple) and any(isinstance(item, bool) for item in value)
                and _numbers_inside(field.annotation)):
            raise ValueError("expected numbers, not booleans")
        return value
