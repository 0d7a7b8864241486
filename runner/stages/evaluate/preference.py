"""The evaluate step's scores for a preference objective, base vs tuned, on the held-out (test) split.

- dpo, orpo, simpo: on held-out pairs, `preference_accuracy` is the share where the model gives the chosen completion a
  higher log-likelihood than the rejected one (summed over the completion's tokens, given the prompt): comparable
  across models, the base's figure included; `preference_accuracy_per_token` compares the mean per token instead (a sum
  favours the shorter completion, which a pair set whose rejected answers run longer rewards for nothing).
  For the tuned model also the DPO implicit reward against the base as reference, r = beta * (log pi(y|x) -
  log pi_base(y|x)): `reward_accuracy` (the share where r(chosen) > r(rejected)) and
  `reward_margin` (the mean of r(chosen) - r(rejected)); the base, its own reference, has margin 0.
- kto: the same log-likelihood comparison between desirable and undesirable completions is not paired, so it reports
  the mean log-likelihood of each kind and their gap.
- grpo: completions sampled for held-out prompts (the train step's temperature and completion length, seeded),
  scored with the recipe's rewards: the weighted `mean_reward` and, per reward, the mean and the pass rate (the share of
  completions it gave more than 0; for `length_penalty`, no penalty).

Completions are tokenized as TRL tokenizes them (prompt, then prompt + completion, the completion being what follows
their common prefix), so these log-probs are the ones the trainer optimized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from runner.recipe.objectives import Grpo, Preference
from runner.recipe.sections import Export, Model
from runner.stages import compare, merge
from runner.stages.pretrained import load_tokenizer

log = logging.getLogger(__name__)


def scores(train: dict[str, Any], model_cfg: Model, inputs: dict[str, Path], seed: int, max_rows: int) -> dict[str, Any]:
    """{"base": {...}, "train": {...}} for the recipe's objective, on at most `max_rows` held-out rows."""
    from datasets import load_from_disk

    objective = train["objective"]
    rows = load_from_disk(str(inputs["data"] / "dataset"))["test"]
    rows = rows.select(range(min(max_rows, len(rows))))
    base = merge.load_base(model_cfg, inputs).eval()
    tokenizer = load_tokenizer(model_cfg, inputs)
    if objective == "grpo":
        grpo = Grpo.model_validate(train["grpo"])
        result = {"base": reward_scores(base, tokenizer, rows, grpo, seed)}
        del base
        tuned, tokenizer, _ = trained(model_cfg, inputs)
        result["train"] = reward_scores(tuned, tokenizer, rows, grpo, seed)
        return {"objective": objective, "rows": len(rows), **result}
    pref = Preference.model_validate(train.get("preference") or {})
    pairs = completion_pairs(rows, objective)
    reference = log_likelihoods(base, tokenizer, pairs)
    del base
    tuned, tokenizer, _ = trained(model_cfg, inputs)
    policy = log_likelihoods(tuned, tokenizer, pairs)
    return {"objective": objective, "rows": len(rows), "beta": pref.beta,
            "base": pair_scores(reference, reference, pref.beta, objective, rows),
            "train": pair_scores(policy, reference, pref.beta, objective, rows)}


def trained(model_cfg: Model, inputs: dict[str, Path]) -> Any:
    samples = compare.load_samples(inputs["data"], "test", compare.BATCH_SIZE)
    model, tokenizer, about = merge.load_trained(model_cfg, inputs, True, samples, Export())
    return model.eval(), tokenizer, about


def completion_pairs(rows: Any, objective: str) -> list[tuple[str, str]]:
    """(prompt, completion) to score: chosen and rejected interleaved for pairs; kto's one completion per row."""
    if objective == "kto":
        return list(zip(rows["prompt"], rows["completion"], strict=True))
    pairs = []
    for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"], strict=True):
        pairs += [(prompt, chosen), (prompt, rejected)]
    return pairs


def log_likelihoods(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Summed log-probability of each completion given its prompt, tokenized as TRL does (eos appended to text), and
    its token count: rows [sum, tokens]."""
    import torch

    eos = tokenizer.eos_token or ""
    out = []
    with torch.no_grad():
        for prompt, completion in pairs:
            prompt_ids = tokenizer(prompt)["input_ids"]
            text = completion if completion.endswith(eos) else completion + eos
            full = tokenizer(prompt + text)["input_ids"]
            start = _common_prefix(prompt_ids, full)
            ids = torch.tensor([full])
            logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            kept = logps[max(start, 1) - 1:]
            out.append((float(kept.sum()), len(kept)))
    return np.asarray(out, dtype=float).reshape(-1, 2)


def pair_scores(scored: np.ndarray, scored_reference: np.ndarray, beta: float, objective: str,
                rows: Any) -> dict[str, Any]:
    policy, reference, tokens = scored[:, 0], scored_reference[:, 0], scored[:, 1]
    if objective == "kto":
        labels = np.asarray(rows["label"], dtype=bool)
        good, bad = policy[labels], policy[~labels]
        good_mean, bad_mean = _mean(good), _mean(bad)
        return {"desirable_logp": good_mean, "undesirable_logp": bad_mean,
                "logp_gap": None if good_mean is None or bad_mean is None else good_mean - bad_mean}
    chosen, rejected = policy[0::2], policy[1::2]
    rewards = beta * (policy - reference)
    margins = rewards[0::2] - rewards[1::2]
    per_token = policy / np.maximum(tokens, 1)  # summed log-probs favour the shorter completion; per token they do not
    return {"preference_accuracy": float(np.mean(chosen > rejected)),
            "preference_accuracy_per_token": float(np.mean(per_token[0::2] > per_token[1::2])),
            "reward_accuracy": float(np.mean(margins > 0)), "reward_margin": float(np.mean(margins)),
            "logp_chosen": _mean(chosen), "logp_rejected": _mean(rejected)}


def reward_scores(model: Any, tokenizer: Any, rows: Any, grpo: Grpo, seed: int) -> dict[str, Any]:
    """Sampled completions for the held-out prompts, scored with the recipe's rewards."""
    import torch

    from runner.stages.train.rewards import reward_functions, score

    functions = reward_functions(grpo)
    prompts = list(rows["prompt"])
    columns = {name: list(rows[name]) for name in rows.column_names if name not in ("prompt", *SAMPLES)}
    torch.manual_seed(seed)
    completions = []
    pad = compare.pad_token_id(tokenizer)
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=grpo.temperature, max_new_tokens=grpo.max_completion_length,
                                 pad_token_id=pad)
            completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    values = score(functions, prompts, completions, columns)
    weights = [reward.weight for reward in grpo.rewards]
    total = np.sum([w * np.asarray(v, dtype=float) for w, v in zip(weights, values.values(), strict=True)], axis=0)
    per_reward = {}
    for reward, (name, value) in zip(grpo.rewards, values.items(), strict=True):
        array = np.asarray(value, dtype=float)
        passed = array >= 0 if reward.name == "length_penalty" else array > 0
        per_reward[name] = {"mean": float(array.mean()), "pass_rate": float(passed.mean())}
    return {"mean_reward": float(total.mean()), "rewards": per_reward, "examples": completions[:3]}


SAMPLES = ("text", "input_ids", "attention_mask", "labels")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None
