"""The evaluate step's metrics, from predictions or token losses (no model loading here).

- Classifiers (scikit-learn): accuracy, macro-F1 over the model's labels, per-class precision/recall/support, and the
  confusion matrix (rows = true label, columns = predicted, in label-id order).
- Causal LMs: mean token loss and its perplexity over the tokens that count (labels != -100), computed like the export
  and quantize gates do (runner.stages.compare.batches: right-padded, -100 on padding), and exact-match / contains of
  greedy answers against reference answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.stages.compare import Runner, batches, log_softmax
from runner.stages.shared import macro_f1, perplexity


def classifier_metrics(true: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/support and the confusion matrix over `labels` (in id order).

    A class absent from both the truth and the predictions has precision and recall 0 (zero_division=0) and no part in
    macro-F1 (runner.stages.shared.macro_f1); `labels` are the model's labels, so a set that lacks one says so."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    unknown = sorted(set(true) - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's labels {labels}")
    precision, recall, _, support = precision_recall_fscore_support(
        true, predicted, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(true, predicted)),
        "macro_f1": macro_f1(true, predicted),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "support": int(s)}
            for label, p, r, s in zip(labels, precision, recall, support, strict=True)
        },
        "labels": list(labels),
        "confusion": confusion_matrix(true, predicted, labels=labels).tolist(),
        "rows": len(true),
    }


def token_loss(run_model: Runner, samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Mean next-token loss over every label that is not -100 (the same sum the export/quantize gates compute), its
    perplexity, and the number of tokens it is over."""
    total, count = 0.0, 0
    for batch in batches(samples, pad_id):
        logits = run_model(batch).astype(np.float64)
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        picked = np.where(valid, labels, 0)[..., None]
        total -= float((np.take_along_axis(log_softmax(logits[:, :-1]), picked, -1)[..., 0] * valid).sum())
        count += int(valid.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


def normalize_answer(text: str) -> str:
    """Case and surrounding/inner runs of whitespace folded, trailing punctuation dropped: "Paris." equals "paris"."""
    return " ".join(text.lower().split()).rstrip(".!?,;:")


def answer_metrics(outputs: list[str], answers: list[str]) -> dict[str, Any]:
    """exact_match: the normalized output equals the normalized answer; contains: the answer appears in the output."""
    exact = [normalize_answer(o) == normalize_answer(a) for o, a in zip(outputs, answers, strict=True)]
    contains = [normalize_answer(a) in normalize_answer(o) for o, a in zip(outputs, answers, strict=True)]
    n = max(len(answers), 1)
    return {
        "exact_match": sum(exact) / n,
        "contains": sum(contains) / n,
        "answered": len(answers),
        "examples": [{"answer": a, "output": o} for o, a in list(zip(outputs, answers, strict=True))[:5]],
    }
