"""The base of every recipe model (unknown keys and loose types are errors), the bounded number types the sections
share, and the regex check two fields use; its own module so that the sections (sections.py) and the objectives
(objectives.py) both build on it."""

from __future__ import annotations

import re
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


def checked_regex(pattern: str | None, field: str) -> str | None:
    """A field's regular expression, refused at its line when Python cannot compile it (a{4294967296}; deep nesting)."""
    if pattern:
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise ValueError(f"`{field}` is not a valid regular expression: {exc}") from None
    return pattern

