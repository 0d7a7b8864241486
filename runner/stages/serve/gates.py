"""Two gates of the smoke-serve stage for classifiers, measured through the running server.

- Batch invariance: a text's answer must not depend on what else the server is doing. Every one of `NEIGHBOURS + 1`
  texts is sent alone, then all of them at once (each among `NEIGHBOURS` concurrent others, so the server may merge and
  pad them), `ROUNDS` times; any label flip or a score that moves by more than `serve.max_score_drift` fails the step.
  The server keeps this by batching only batch-invariant graphs (runner/serving/artifact.py); the gate is what shows it.
- Served accuracy: the accuracy the server gives on the data step's test rows must equal the offline accuracy that the
  report of the served artifact (quantize_report.json or export_report.json) recorded on the same rows. When it does
  not, the message says what differs: the server against the same model run in-process text by text (a serving bug),
  or the recorded figure against the model as served (token ids other than the data step's, a graph whose answers
  depend on the batch the gate ran it in).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

NEIGHBOURS = 16
ROUNDS = 2


# --- batch invariance -------------------------------------------------------------------------------------------------


def invariance_texts(probe_texts: list[str], data_texts: list[str], n: int = NEIGHBOURS + 1) -> list[str]:
    """n distinct texts of varied lengths: the probes, then test rows, then variants of the probes (longer ones too,
    so that a shorter text gets padded beside them)."""
    texts = list(dict.fromkeys([*probe_texts, *data_texts]))[:n]
    seeds = list(texts) or ["a"]
    variants = (v for i in range(n) for s in seeds for v in (f"{s} {s}", " ".join(reversed(s.split())), f"{s} {i}"))
    for text in variants:
        if len(texts) >= n:
            break
        if text not in texts:
            texts.append(text)
    return texts


def _predict(client: httpx.Client, text: str) -> dict[str, Any]:
    response = client.post("/predict", json={"texts": [text]})
    response.raise_for_status()
    return response.json()["predictions"][0]


def _drift(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(a["scores"][k] - b["scores"].get(k, float("inf"))) for k in a["scores"])


def check_invariance(client: httpx.Client, texts: list[str], max_drift: float) -> tuple[dict[str, Any], list[str]]:
    alone = [_predict(client, t) for t in texts]
    drift, flips, worst = 0.0, 0, ""
    with ThreadPoolExecutor(len(texts)) as pool:
        for _ in range(ROUNDS):
            together = list(pool.map(lambda t: _predict(client, t), texts))
            for text, a, b in zip(texts, alone, together, strict=True):
                flips += a["label"] != b["label"]
                if (d := _drift(a, b)) > drift:
                    drift, worst = d, text
    result = {"texts": len(texts), "concurrent_others": len(texts) - 1, "rounds": ROUNDS, "label_flips": flips,
              "max_score_drift": drift, "max_allowed_drift": max_drift}
    if flips or not drift <= max_drift:  # `not <=` so a NaN fails too
        return result, [
            f"served answers depend on the other requests: a text alone vs among {len(texts) - 1} concurrent others "
            f"gave {flips} label flips in {ROUNDS * len(texts)} answers and a max score drift of {drift:.3g} "
            f"(serve.max_score_drift {max_drift:g}; worst text {worst[:60]!r}); a graph with per-run activation scales "
            "(dynamic int8) must not be batched across requests: serve it with invariant batching (the default), or "
            "use `quantize.method: onnx-static-int8`"
        ]
    return result, []


# --- served accuracy --------------------------------------------------------------------------------------------------


def recorded_accuracy(artifact: Path) -> dict[str, Any] | None:
    """The offline accuracy the served artifact's own step recorded: {"accuracy", "samples", "report"}; None when the
    report is missing or holds no accuracy (e.g. a causal LM)."""
    step = artifact.parent
    for name, section in (("quantize_report.json", "comparison"), ("export_report.json", "validation")):
        path = step / name
        if not path.is_file():
            continue
        found = json.loads(path.read_text()).get(section) or {}
        if found.get("metric") == "accuracy" and found.get("samples"):
            return {"accuracy": float(found["metric_candidate"]), "samples": int(found["samples"]), "report": name}
    return None


def check_accuracy(served: list[str], offline: list[str], expected: list[str], same_ids: list[bool],
                   recorded: dict[str, Any], batch_invariant: bool) -> tuple[dict[str, Any], list[str]]:
    """served/offline: labels from the server and from the served model in-process, text by text, on the first
    `recorded["samples"]` test rows; expected: their true labels; same_ids: whether the served tokenizer gives a row the
    data step's token ids."""
    k = min(recorded["samples"], len(served))

    def accuracy(labels: list[str]) -> float:
        return sum(a == e for a, e in zip(labels[:k], expected[:k], strict=True)) / max(k, 1)

    result = {"samples": k, "served": round(accuracy(served), 6), "offline_in_process": round(accuracy(offline), 6),
              "recorded": recorded["accuracy"], "recorded_in": recorded["report"]}
    problems = []
    if k < recorded["samples"]:
        problems.append(f"only {k} test rows to compare against the {recorded['samples']} that "
                        f"{recorded['report']} recorded its accuracy on")
    differ = sum(s != o for s, o in zip(served[:k], offline[:k], strict=True))
    if differ:
        problems.append(f"the server answered {differ} of {k} test rows differently from the same model run in-process")
    truncated = k - sum(same_ids[:k])
    if truncated:
        # The recorded figure scored these rows cut at data.max_length; the server reads them whole (up to the model's
        # context), so the two figures measure different inputs and cannot be held equal. What still must hold, and
        # does above: the server answers every row as the same model does in-process on the same text.
        result["recorded_comparable"] = False
        result["rows_truncated_by_the_data_step"] = truncated
    # One correct answer more or less changes the accuracy by 1/k: anything smaller is the float in the report.
    elif abs(result["served"] - recorded["accuracy"]) > 0.5 / max(k, 1):
        why = []
        if not batch_invariant:
            why.append(f"the graph is not batch-invariant and {recorded['report']} measured it in batches, while the "
                       "server runs each text alone")
        problems.append(
            f"served accuracy {result['served']:.4f} differs from the offline accuracy {recorded['accuracy']:.4f} that "
            f"{recorded['report']} recorded on the same {k} test rows"
            + (f" ({'; '.join(why)})" if why else ""))
    result["passed"] = not problems
    return result, problems
