"""The base of every recipe model (unknown keys and loose types are errors) and the bounded number types the sections
share; its own module so that the sections (models.py) and the objectives (objectives.py) both build on it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors, and types are strict: a quoted "3" is not the integer 3, nor `yes` a boolean (the loader
    reads YAML 1.2 scalars, so what the user wrote unquoted already has its type; an int is still a fine float)."""

    # allow_inf_nan=False: `.inf` and `.nan` are YAML 1.2 floats, and `.inf` would pass every `> 0` bound (a drift limit of
    # .inf turns a gate off without saying so)
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
