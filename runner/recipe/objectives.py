"""The recipe's preference-tuning settings (`train.objective` and its blocks `train.preference`, `train.grpo`): what
TRL's trainers need, validated like every other field. The train stage maps them 1:1 onto TRL's configs
(runner/stages/train/preference.py); the cross-field rules are in rules.py (`train_objective`, `grpo_rewards`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from runner.recipe.strict import Fraction, PositiveFloat, PositiveInt, Strict, checked_regex

Objective = Literal["sft", "dpo", "orpo", "kto", "simpo", "grpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto", "simpo")
# TRL DPOTrainer's loss types that learn from one pair at a time (the unpaired/sorting ones, aot*, are left out)
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm")
REWARD_FUNCTION = r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$"


class Preference(Strict):
    """Settings of the pairwise objectives (dpo, orpo, simpo) and of kto, mapped 1:1 onto TRL's configs (DPOConfig,
    ORPOConfig, CPOConfig with `loss_type: simpo`, KTOConfig). The longest whole example is `data.max_length`."""

    beta: PositiveFloat = Field(
        0.1, description="How far the policy may move from the reference (TRL `beta`; ORPO's odds-ratio weight λ; "
        "SimPO's reward scale)."
    )
    loss_type: Literal[DPO_LOSSES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="dpo: TRL's DPO loss (`sigmoid` is DPO, `ipo` IPO, `hinge` SLiC, `robust` rDPO ...)."
    )
    max_prompt_length: PositiveInt = Field(
        64, description="Prompt budget in tokens: longer prompts are cut to their last tokens by the data step "
        "(counted in its stats), so the completion always fits in `data.max_length`."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="dpo/kto: compute the reference log-probs once before training and hold no reference "
        "model (with full fine-tuning: no frozen copy in memory while training)."
    )
    label_smoothing: Fraction = Field(0.0, description="dpo `robust`/simpo: assumed share of flipped labels.")
    simpo_gamma: Annotated[float, Field(ge=0)] = Field(0.5, description="simpo: target reward margin γ.")
    desirable_weight: PositiveFloat = Field(1.0, description="kto: weight of the desirable (label true) rows.")
    undesirable_weight: PositiveFloat = Field(1.0, description="kto: weight of the undesirable (label false) rows.")
    max_identical_share: Fraction = Field(
        0.01, description="Largest share of rows whose chosen equals rejected (they teach nothing); above it the "
        "data step refuses the data."
    )


class Reward(Strict):
    """One GRPO reward: a built-in one by `name`, or the user's `function` (needs `grpo.allow_code: true`)."""

    name: Literal["exact_match", "numeric_match", "regex", "length_penalty"] | None = Field(
        None, description="`exact_match`/`numeric_match`: 1 when the completion's final answer equals the row's "
        "`column` (numbers compared as numbers); `regex`: 1 when the completion matches `pattern`; `length_penalty`: "
        "minus the share of `max_chars` the completion exceeds it by."
    )
    function: str | None = Field(
        None, pattern=REWARD_FUNCTION, description="`module:function` called as TRL calls reward functions "
        "(`prompts=, completions=, **columns`); imported only with `grpo.allow_code: true`."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum TRL advantages are computed from.")
    column: str | None = Field(None, description="exact_match/numeric_match: the column holding the reference answer.")
    pattern: str | None = Field(None, description="regex: the pattern a completion must match (re.search).")
    max_chars: PositiveInt | None = Field(None, description="length_penalty: completions longer than this lose reward.")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        return checked_regex(pattern, "pattern")


class Grpo(Strict):
    """GRPO (TRL GRPOTrainer): sample `num_generations` completions per prompt, score them with the rewards, and move
    the policy toward the better ones. Prompts come from the data's `prompt` column; other columns reach the rewards."""

    num_generations: Annotated[int, Field(ge=2)] = Field(
        4, description="Completions per prompt (must divide `train.batch_size`, the completions per step)."
    )
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature of the generations.")
    max_completion_length: PositiveInt = Field(32, description="Longest generated completion in tokens.")
    beta: Annotated[float, Field(ge=0)] = Field(
        0.0, description="KL weight against the reference (TRL's default 0 loads no reference model)."
    )
    rewards: list[Reward] = Field(min_length=1, description="The rewards, summed with their weights.")
    allow_code: bool = Field(
        False, description="Let rewards name Python code (`function: module:function`); a recipe runs no code of its "
        "own unless it says so."
    )
