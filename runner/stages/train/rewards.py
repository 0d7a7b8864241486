"""GRPO's reward functions: the built-in ones a recipe names (`train.grpo.rewards`), and user code as `module:function`
only when the recipe says `grpo.allow_code: true` (the recipe rules refuse it otherwise; this module checks again, so a
config that skipped validation cannot run code either).

Every function has TRL's reward signature, `fn(prompts, completions, **columns) -> list[float | None]`, where `columns`
are the data's other columns (one value per completion), and is named after its reward so TRL logs it as
`rewards/<name>/mean`. The evaluate step scores held-out prompts with the same functions (`score`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from runner.recipe.objectives import Grpo, Reward
from runner.stages import StageError

RewardFn = Callable[..., list[float | None]]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reward_functions(grpo: Grpo) -> list[RewardFn]:
    """One function per reward of the recipe, in order, each named uniquely (TRL's metric names come from them)."""
    functions, seen = [], set()
    for index, reward in enumerate(grpo.rewards):
        fn = user_function(reward.function, grpo.allow_code) if reward.function else built_in(reward)
        name = reward.name or reward.function.rsplit(":", 1)[-1]  # type: ignore[union-attr]
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        functions.append(_named(fn, name))
    return functions


def built_in(reward: Reward) -> RewardFn:
    column = str(reward.column)  # the rules require a column for the answer-matching rewards
    if reward.name == "exact_match":
        return lambda completions, **columns: [
            float(final_answer(c) == str(a).strip()) for c, a in zip(_texts(completions), columns[column], strict=True)
        ]
    if reward.name == "numeric_match":
        return lambda completions, **columns: [
            float(_same_number(final_number(c), a)) for c, a in zip(_texts(completions), columns[column], strict=True)
        ]
    if reward.name == "regex":
        pattern = re.compile(str(reward.pattern))
        return lambda completions, **_: [float(pattern.search(c) is not None) for c in _texts(completions)]
    if reward.name == "length_penalty":
        limit = int(reward.max_chars or 1)
        return lambda completions, **_: [-max(0, len(c) - limit) / limit for c in _texts(completions)]
    raise StageError(f"unknown reward {reward.name!r}")


def user_function(spec: str, allow_code: bool) -> RewardFn:
    """`module:function`, imported only with allow_code; it must take `completions` (TRL passes it by name)."""
    if not allow_code:
        raise StageError(f"reward {spec!r} is Python code: set `train.grpo.allow_code: true` if you trust it")
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # never falls back to reading the name as a model id (axolotl #2855)
        raise StageError(f"reward {spec!r}: cannot import {module_name!r} ({exc}); it must be importable "
                         "(installed, or on PYTHONPATH)") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise StageError(f"reward {spec!r}: {module_name} has no function {attribute!r}")
    parameters = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "completions" not in parameters or not takes_all:
        raise StageError(f"reward {spec!r} must accept `completions` and `**kwargs` (TRL calls it as "
                         "fn(prompts=..., completions=..., <columns>=..., **kwargs))")
    return fn


def score(functions: list[RewardFn], prompts: list[str], completions: list[str],
          columns: dict[str, list[Any]]) -> dict[str, list[float | None]]:
    """Each reward's values for these completions (the evaluate step's held-out scoring)."""
    return {fn.__name__: list(fn(prompts=prompts, completions=completions, **columns)) for fn in functions}


def final_answer(completion: str) -> str:
    """The answer a completion gives: its first non-empty line, stripped of spaces and a final full stop."""
    for line in completion.strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".").strip()
    return ""


def final_number(completion: str) -> str | None:
    """The first number of the answer line (what `numeric_match` compares)."""
    found = NUMBER.search(final_answer(completion))
    return found.group(0) if found else None


def _same_number(found: str | None, answer: Any) -> bool:
    try:
        return found is not None and abs(float(found) - float(answer)) < 1e-9
    except (TypeError, ValueError):
        return False


def _texts(completions: list[Any]) -> list[str]:
    """TRL passes strings for text prompts, a list of messages for conversational ones: the assistant's text."""
    return [c if isinstance(c, str) else "".join(m.get("content", "") for m in c) for c in completions]


def _named(fn: RewardFn, name: str) -> RewardFn:
    def reward(**kwargs: Any) -> list[float | None]:
        return fn(**kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward
