"""The linear probe behind a classifier's forgetting figure: what the encoder still knows outside the task.

A base checkpoint often has no task head (all-MiniLM-L6-v2 is a bare encoder), so base and tuned model cannot be compared
by their answers on general text. Instead both encoders are frozen, each text becomes the mean of its last hidden states
over the real tokens (mean pooling, as sentence-transformers pools MiniLM), and a logistic regression is trained on one
part of a labelled general set and tested on the rest. The same split (stratified, drawn with the recipe seed) and the
same regression serve both encoders, so the accuracy difference is the encoder's: a fine-tune that collapsed the
features onto its own task loses probe accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from runner.stages import StageError

if TYPE_CHECKING:
    import torch

BATCH = 32
PROBE_C = 1.0  # scikit-learn's default regularization; features are standardized on the probe's train part first
PROBE_MAX_ITER = 2000


def mean_pooled(encoder: torch.nn.Module, tokenizer: Any, texts: list[str], max_tokens: int) -> np.ndarray:
    """[len(texts), hidden] mean of the encoder's last hidden states over each text's real tokens (padding masked)."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    out: np.ndarray | None = None
    with torch.no_grad():
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt", return_token_type_ids=False)
            hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float64)
            out[chunk] = pooled
    assert out is not None
    return out


def split(labels: list[str], test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, stratified by label, drawn with the recipe seed (the same for every encoder)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_size, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise StageError(f"cannot split {len(labels)} rows for the linear probe with probe_test_size={test_size}: {exc} "
                         "(a general set needs at least two rows of each label in both parts: add rows)") from None
    return np.sort(train), np.sort(test)


def probe_accuracy(features: np.ndarray, labels: list[str], test_size: float, seed: int) -> dict[str, Any]:
    """Accuracy of a logistic regression trained on the probe's train part, on its test part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(labels)) < 2:
        raise StageError("a general set for the linear probe needs at least two labels")
    train, test = split(labels, test_size, seed)
    y = np.asarray(labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed))
    probe.fit(features[train], y[train])
    accuracy = float((probe.predict(features[test]) == y[test]).mean())
    return {"probe_accuracy": accuracy, "probe_rows": {"train": int(len(train)), "test": int(len(test))}}
