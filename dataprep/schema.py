"""The one base class of every config section (dataprep's, training's and pipeline's): unknown keys are errors,
and assignments are validated too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
