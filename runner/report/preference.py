"""The report's preference part (train.objective other than sft): the evaluate step's held-out figures, base vs tuned
(runner/stages/evaluate/preference.py writes them under `preference` in evaluate_report.json), shown in the train
section beside the curves the train step drew from TRL's logged metrics (loss.png, runner/stages/train/preference.py).

For dpo/orpo/simpo: preference accuracy (chosen more likely than rejected), per token, and the implicit reward's accuracy
and mean margin against the base as reference (the base, its own reference, has margin 0). For kto: the mean
log-likelihood of desirable and undesirable completions. For grpo: the mean weighted reward and each reward's pass rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.report.formatting import DASH, metric, num, pct, signed
from runner.report.render import Block, CellLike, Heading, Para, Table

WHO = {"base": "base (the reference)", "train": "tuned"}
# TRL's logged metrics the curves show, in the order the panels draw them (GRPO's per-reward curves are rewards/NAME/mean)
CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl", "reward")


def table(preference: dict[str, Any]) -> list[Block]:
    """The held-out figures of the evaluate step, one row per model."""
    objective = preference.get("objective", "")
    rows_note = f"{num(preference.get('rows'))} held-out rows"
    models = [m for m in ("base", "train") if isinstance(preference.get(m), dict)]
    blocks: list[Block] = [Heading(f"Preference ({objective}), base vs tuned", 3)]
    if objective == "grpo":
        names = list(dict.fromkeys(n for m in models for n in (preference[m].get("rewards") or {})))
        rows: list[list[CellLike]] = [[WHO[m], num(preference[m].get("mean_reward")),
                 *(pct(((preference[m].get("rewards") or {}).get(n) or {}).get("pass_rate")) for n in names)]
                for m in models]
        blocks.append(Table(["model", "mean reward", *(f"{n} pass rate" for n in names)], rows,
                            caption=f"sampled completions for {rows_note}, scored with the recipe's rewards"))
    elif objective == "kto":
        rows = [[WHO[m], num(preference[m].get("desirable_logp")), num(preference[m].get("undesirable_logp")),
                 num(preference[m].get("logp_gap"))] for m in models]
        blocks.append(Table(["model", "desirable log-lik.", "undesirable log-lik.", "gap"], rows, caption=rows_note))
    else:
        rows = [[WHO[m], metric(preference[m].get("preference_accuracy")),
                 metric(preference[m].get("preference_accuracy_per_token")), metric(preference[m].get("reward_accuracy")),
                 signed(preference[m].get("reward_margin"))] for m in models]
        blocks.append(Table(["model", "preference accuracy", "per token", "reward accuracy", "mean reward margin"], rows,
                            caption=f"{rows_note}; accuracy: chosen more likely than rejected; reward: beta "
                                    f"{num(preference.get('beta'))} x log-ratio to the base"))
    if not models:
        blocks.append(Para("the evaluate step recorded no preference figures", "muted"))
    return blocks


def curves(train_dir: Path) -> list[str]:
    """The curves of CURVES the train step logged (trainer_state.json's log history), in panel order, plus GRPO's
    per-reward ones: what loss.png shows."""
    try:
        history = json.loads((train_dir / "trainer_state.json").read_text()).get("log_history") or []
    except (OSError, ValueError):
        return []
    logged = {key.removeprefix("eval_") for entry in history for key in entry}
    per_reward = sorted(k for k in logged if k.startswith("rewards/") and k.endswith("/mean"))
    return [name for name in CURVES if name in logged] + per_reward


def caption(names: list[str]) -> str:
    text = "by optimizer step (train: lines, eval: dots): " + (", ".join(names) if names else DASH)
    if names and "kl" not in names and "rewards/chosen" in names:
        # TRL's DPOTrainer (1.x) logs no KL; its rewards are the drift from the reference on the pairs themselves
        text += ("; no KL curve: TRL logs none for this objective, rewards/chosen and rewards/rejected are beta x "
                 "log(policy / reference) on the pairs, the policy's drift from its reference")
    return text
