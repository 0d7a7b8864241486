"""The whole recipe: `Recipe` joins the sections of models.py and runs the cross-field rules of rules.py on itself.

So a recipe built in Python (`Recipe.model_validate(...)`) obeys the same rules as one loaded from YAML. The loader
(load.py) runs the rules itself on the document as written, to point each problem at its line, and drops this
validator's error (`RULES_ERROR`) so nothing is reported twice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from runner.recipe import rules
from runner.recipe.sections import NEUTRAL, Data, Evaluate, Export, Model, Quantize, Requires, Serve, Train
from runner.recipe.strict import Strict

RULES_ERROR = "recipe_rules"


class Recipe(Strict):
    """One fine-tune, end to end: data -> train -> export -> quantize -> evaluate -> smoke-serve."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][\w.-]*$", max_length=100, description="Recipe name; names the run folder and lock file."
    )
    description: str | None = Field(None, description="What the recipe is for.", json_schema_extra=NEUTRAL)
    extends: str | None = Field(
        None, description="A base recipe file this one deep-merges over (path relative to this file)."
    )
    env: Literal["cpu", "cuda13"] = Field("cpu", description="Which pinned environment in envs/ nox installs.")
    seed: int = Field(42, ge=0, description="Seed for shuffling, splitting, initialization and training.")
    requires: Requires = Field(default_factory=Requires, description="Hardware the recipe needs.")
    model: Model = Field(description="The base model.")
    data: Data = Field(description="The data step.")
    train: Train = Field(description="The train step: `method` is full, lora or qlora.")
    export: Export | None = Field(None, description="The export step (ONNX or merged safetensors).")
    quantize: Quantize | None = Field(
        None, description="The quantize step: ONNX Runtime int8 (classifiers), weight-only int8/int4 (causal LMs) or "
        "bitsandbytes."
    )
    evaluate: Evaluate | None = Field(
        None, description="The evaluate step: every artifact scored offline, and the forgetting gate."
    )
    serve: Serve | None = Field(None, description="The smoke-serve step.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        # The loader runs these itself, on the document as written, to point each at its line (and skips this error).
        found = rules.check(self.model_dump())
        if found:
            text = "; ".join(f"{'.'.join(map(str, loc)) or '(recipe)'}: {message}" for loc, message in found)
            raise PydanticCustomError(RULES_ERROR, text)
        return self
