"""Request and response bodies. Request limits come from the settings, so /openapi.json documents the real limits.

Requests are strict (no "5" for 5, no true for 1) and forbid unknown keys: a misspelt `max_tokens` is a 422, not a
silently ignored option. (No `from __future__ import annotations` here: the request classes are built inside a function
and their annotations must be evaluated there.)
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.serving.settings import ServerSettings

STRICT = ConfigDict(extra="forbid", strict=True)


class PredictRequest(BaseModel):
    model_config = STRICT
    texts: list[str] = Field(min_length=1, description="Texts to classify.", examples=[["the film was wonderful"]])


class GenerateRequest(BaseModel):
    model_config = STRICT
    prompt: str = Field(min_length=1, examples=["Hello"])
    max_new_tokens: int = Field(16, ge=1, description="Most tokens to add.")
    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(None, ge=0, description="Seed for sampling; equal seeds give equal samples.")


def request_models(settings: ServerSettings) -> tuple[type[PredictRequest], type[GenerateRequest]]:
    """The request classes with this server's limits on their fields (subclasses, so code can type against the bases)."""
    Text = Annotated[str, Field(max_length=settings.max_input_chars)]

    class LimitedPredictRequest(PredictRequest):
        texts: list[Text] = Field(
            min_length=1, max_length=settings.max_batch_size, description="Texts to classify.",
            examples=[["the film was wonderful"]],
        )

    class LimitedGenerateRequest(GenerateRequest):
        prompt: str = Field(min_length=1, max_length=settings.max_input_chars, examples=["Hello"])
        max_new_tokens: int = Field(16, ge=1, le=settings.max_new_tokens, description="Most tokens to add.")

    return LimitedPredictRequest, LimitedGenerateRequest


class Prediction(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="Probability of every label.")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="One per input text, in order.")


class GenerateResponse(BaseModel):
    text: str
    tokens: list[int] = Field(description="Generated token ids (without the prompt and without eos).")
    prompt_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"] = Field(description="stop: eos; length: max_new_tokens.")
