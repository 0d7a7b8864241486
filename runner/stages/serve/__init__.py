"""Smoke-serve stage: start the real server as its own process on loopback, probe it, attack it a little, measure it.

Checks, all recorded in out/serve_report.json: the recipe's probes; served answers equal to offline ONNX Runtime answers
(scores within 1e-5, identical tokens); a set of bad requests that must all get a 4xx (never a 5xx) with the server still
ready afterwards; `concurrency` identical requests at once with identical answers (and a mixed round checked against the
offline answers, which catches a batcher that hands results to the wrong request); for classifiers, batch invariance
(a text alone vs among 16 concurrent others: no label flip, scores within `serve.max_score_drift`) and served accuracy
equal to the accuracy the served artifact's report recorded offline on the same test rows (runner/stages/serve/gates.py);
p50/p95 latency (with the raw samples, drawn in out/latency.png) and throughput. The server is always stopped: its
process group gets SIGTERM, then SIGKILL after a grace period, also on failure and Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import runner
from runner.chat import load_chat_template
from runner.names import CLASSIFIER
from runner.recipe.sections import Model, Probe, Serve
from runner.redact import RedactedFile
from runner.serving import openai
from runner.serving.artifact import Classifier, load_model
from runner.serving.settings import ServerSettings
from runner.stages import StageError
from runner.stages.serve import gates as serve_gates

log = logging.getLogger(__name__)
SCORE_ATOL = 1e-5
KEY_ENV = "RUNNER_SERVE_API_KEY"
PARENT_ENV = "RECIPE_SERVE_PARENT_PID"  # the server exits when this pid is no longer its parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m runner.serving` in its own session (so its process group can be signalled as a whole)."""

    def __init__(self, artifact: Path, settings: ServerSettings, log_path: Path, grace_s: float = 10) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = settings.api_key or secrets.token_urlsafe(24)
        self.grace_s = grace_s
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.model_dump(exclude={"api_key"}).items()]
        repo = str(Path(runner.__file__).resolve().parent.parent)  # importable even when the package isn't installed
        env = {**os.environ, KEY_ENV: self.api_key, PARENT_ENV: str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "runner.serving", "--artifact", str(artifact), "--port", str(self.port),
               "--api-key-env", KEY_ENV, *flags]
        self.log_path = log_path
        # The server's output reaches its log redacted (its own API key included: the sink sees the server's env).
        self._log = RedactedFile(log_path, env)
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log.fd, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        if self.proc.poll() is not None:  # it exited: wait for the sink to write its last lines
            self._log.close(timeout_s=5)
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> float:
        start = time.monotonic()
        with self.client(timeout_s=5) as client:
            while time.monotonic() - start < timeout_s:
                if self.proc.poll() is not None:
                    raise StageError(f"the server exited with code {self.proc.returncode} before it was ready:\n"
                                     f"{self.log_tail()}")
                try:
                    response = client.get("/ready")
                    if response.status_code == 200:
                        return time.monotonic() - start
                    if response.json().get("status") == "failed":
                        raise StageError(f"the server could not load the model: {response.json().get('error')}")
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.2)
        raise StageError(f"the server was not ready after {timeout_s:g} s (serve.startup_timeout_s):\n{self.log_tail()}")

    def stop(self) -> int | None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("server did not stop within %g s; killing it", self.grace_s)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        except ProcessLookupError:
            self.proc.wait()
        except BaseException:  # a second Ctrl-C while waiting: no more grace
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            raise
        finally:
            self._log.close(timeout_s=5)
        return self.proc.returncode


# --- what the server should answer ----------------------------------------------------------------------------------


CHAT_ROUTE = "/v1/chat/completions"


def _payload(probe: Probe) -> dict[str, Any]:
    if probe.text is not None:
        return {"texts": [probe.text]}
    if probe.messages is not None:  # greedy, so the reply can be held equal to the offline one
        return {"messages": [m.model_dump() for m in probe.messages], "max_tokens": probe.max_new_tokens,
                "temperature": 0}
    return {"prompt": probe.prompt, "max_new_tokens": probe.max_new_tokens}


def _route(probe: Probe, route: str) -> str:
    """Where a probe goes: chat probes to the OpenAI-style chat endpoint, the others to the task's route."""
    return CHAT_ROUTE if probe.messages is not None else route


def _shown(probe: Probe) -> str | None:
    """The probe's input as the report shows it (a chat probe: its last message)."""
    return probe.messages[-1].content if probe.messages else (probe.text or probe.prompt)


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    if "choices" in body:  # a chat completion: the reply's text (it carries no token ids)
        return {"text": body["choices"][0]["message"]["content"]}
    return body["predictions"][0] if "predictions" in body else body


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A response body without what differs between equal answers (a chat completion's id and creation time)."""
    return {"choices": body["choices"], "usage": body.get("usage")} if "choices" in body else body


def _agrees(served: dict[str, Any], offline: dict[str, Any]) -> bool:
    if "tokens" in offline and "tokens" not in served:
        return served.get("text") == offline["text"]
    if "tokens" in offline:
        return served.get("tokens") == offline["tokens"]
    scores = served.get("scores", {})
    return served.get("label") == offline["label"] and scores.keys() == offline["scores"].keys() and all(
        abs(scores[k] - v) <= SCORE_ATOL for k, v in offline["scores"].items()
    )


def _probe_verdict(probe: Probe, served: dict[str, Any]) -> str | None:
    if probe.text is not None:
        if probe.expect_label is not None and served["label"] != probe.expect_label:
            return f"expected label {probe.expect_label!r}, got {served['label']!r}"
        return None
    if probe.expect_nonempty and not served["text"].strip():
        return "expected a non-empty answer, got an empty one"
    if probe.expect_pattern and not re.search(probe.expect_pattern, served["text"]):
        return f"answer {served['text']!r} does not match {probe.expect_pattern!r}"
    if probe.expect_contains and probe.expect_contains.lower() not in served["text"].lower():
        return f"answer {served['text']!r} does not contain {probe.expect_contains!r}"
    return None


class TestRows:
    """The data step's first test rows (classifiers): texts, true labels, token ids; and, filled in by `_offline`, the
    served model's labels for them in-process (text by text) and whether its tokenizer gives the same ids."""

    def __init__(self, data_dir: Path, n: int) -> None:
        from datasets import load_from_disk

        test = load_from_disk(str(data_dir / "dataset"))["test"]
        test = test.select(range(min(n, len(test))))
        id2label = json.loads((data_dir / "labels.json").read_text())["id2label"]
        self.texts: list[str] = list(test["text"])
        self.expected = [id2label[str(label)] for label in test["labels"]]
        self.ids: list[list[int]] = [list(ids) for ids in test["input_ids"]]
        self.offline: list[str] = []
        self.same_ids: list[bool] = []


def _offline(artifact: Path, probes: list[Probe], threads: int, rows: TestRows | None
             ) -> tuple[Any, list[dict[str, Any]], list[Any]]:
    """Offline answers, computed before the server starts so two copies of a big model are never in memory at once."""
    model = load_model(artifact, threads)
    if isinstance(model, Classifier):
        texts = [p.text or "" for p in probes]
        if rows is not None:
            rows.offline = [model.predict([t])[0]["label"] for t in rows.texts]
            rows.same_ids = [e.ids == ids for e, ids in zip(model.tokenizer.encode_batch(rows.texts), rows.ids,
                                                            strict=True)]
        return model.info, [model.predict([t])[0] for t in texts], model.predict(texts)
    return model.info, [_generate_offline(model, artifact, p) for p in probes], []


def _generate_offline(model: Any, artifact: Path, probe: Probe) -> dict[str, Any]:
    """What the server must answer: a chat probe's prompt ids come from the same renderer and template it uses."""
    if probe.messages is None:
        return model.generate(probe.prompt or "", probe.max_new_tokens)
    template = load_chat_template(artifact)
    if template is None:
        raise StageError(f"a `messages` probe needs a chat template, and {artifact} has none (chat_template.jinja or "
                         "tokenizer_config.json's): train with data.messages_column / data.chat_template")
    request = openai.ChatRequest(messages=[m.model_dump() for m in probe.messages], max_tokens=probe.max_new_tokens,
                                 temperature=0)
    try:
        prompt_ids = openai.prompt_ids_for(model, request, template)
    except openai.OpenAIError as exc:
        raise StageError(f"serve.probes: {exc.message}") from None
    result = model.generate_ids(prompt_ids, probe.max_new_tokens)
    return {"text": model.decode(result["tokens"]), **result}


# --- the checks -----------------------------------------------------------------------------------------------------


def _check_probes(client: httpx.Client, route: str, probes: list[Probe], offline: list[dict[str, Any]],
                  offline_batch: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    results, failures = [], []
    for probe, expected in zip(probes, offline, strict=True):
        response = client.post(_route(probe, route), json=_payload(probe))
        if response.status_code != 200:
            failures.append(f"probe {_payload(probe)} got HTTP {response.status_code}: {response.text[:200]}")
            results.append({"input": _shown(probe), "status": response.status_code, "passed": False})
            continue
        served = _answer(response.json())
        problem = _probe_verdict(probe, served)
        same = _agrees(served, expected)
        if problem:
            failures.append(f"probe {_shown(probe)!r}: {problem}")
        if not same:
            failures.append(f"probe {_shown(probe)!r}: served {served} differs from offline {expected}")
        results.append({"input": _shown(probe), "answer": served.get("label", served.get("text")),
                        "passed": problem is None, "matches_offline": same, "problem": problem})
    if offline_batch:  # the whole set as one request: padding across texts must not change anyone's answer
        response = client.post(route, json={"texts": [p.text for p in probes]})
        served = response.json().get("predictions", []) if response.status_code == 200 else []
        if len(served) != len(offline_batch) or not all(map(_agrees, served, offline_batch)):
            failures.append(f"a batch of all probe texts: HTTP {response.status_code}, answers differ from offline")
    return results, failures


def _bad_requests(task: str, s: ServerSettings, max_positions: int) -> dict[str, dict[str, Any]]:
    """name -> httpx request arguments; every one of them must get a 4xx."""
    long_text = "word " * (s.max_input_chars // 5 + 1)
    # Within the character limit but (one token a word at least) beyond the model's context, when the limits allow it.
    words = s.max_input_chars // 5 - 1
    context: dict[str, dict[str, Any]] = {"prompt longer than the context": {"json": {"prompt": "word " * words}}}
    context = context if words > max_positions else {}
    common: dict[str, dict[str, Any]] = {
        "invalid JSON": {"content": b'{"texts": ["unclosed', "headers": {"content-type": "application/json"}},
        "not JSON at all": {"content": b"hello", "headers": {"content-type": "text/plain"}},
        "missing fields": {"json": {}},
        "oversized body": {"content": b'{"x": "' + b"a" * s.max_body_bytes + b'"}',
                           "headers": {"content-type": "application/json"}},
    }
    if task == CLASSIFIER:
        return {**common, "texts not a list": {"json": {"texts": "hello"}}, "numbers as texts": {"json": {"texts": [1, 2]}},
                "null text": {"json": {"texts": [None]}}, "empty batch": {"json": {"texts": []}},
                "over-long text": {"json": {"texts": [long_text]}},
                "too many texts": {"json": {"texts": ["a"] * (s.max_batch_size + 1)}},
                "unknown field": {"json": {"texts": ["a"], "tempreature": 1}}}
    return {**common, "prompt not a string": {"json": {"prompt": 5}}, "empty prompt": {"json": {"prompt": ""}},
            "max_new_tokens as text": {"json": {"prompt": "hi", "max_new_tokens": "many"}},
            "max_new_tokens zero": {"json": {"prompt": "hi", "max_new_tokens": 0}},
            "max_new_tokens over the limit": {"json": {"prompt": "hi", "max_new_tokens": s.max_new_tokens + 1}},
            "negative temperature": {"json": {"prompt": "hi", "temperature": -1}},
            "top_p zero": {"json": {"prompt": "hi", "top_p": 0}},
            "over-long prompt": {"json": {"prompt": long_text}}, **context,
            "unknown field": {"json": {"prompt": "hi", "max_tokens": 5}}}


def _check_bad_inputs(client: httpx.Client, route: str, task: str, settings: ServerSettings, max_positions: int
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    results, failures = [], []
    for name, request in _bad_requests(task, settings, max_positions).items():
        status = client.post(route, **request).status_code
        results.append({"name": name, "status": status})
        if not 400 <= status < 500:
            failures.append(f"bad input {name!r} got HTTP {status}, expected a 4xx")
    if (status := client.get("/ready").status_code) != 200:
        failures.append(f"/ready answered {status} after the bad inputs")
    return results, failures


def _at_once(client: httpx.Client, route: str, probes: list[Probe]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(probes)) as pool:
        return list(pool.map(lambda p: client.post(_route(p, route), json=_payload(p)), probes))


def _score_gap(served: dict[str, Any], offline: dict[str, Any]) -> float:
    scores = served.get("scores", {})
    return max((abs(scores.get(k, float("inf")) - v) for k, v in offline.get("scores", {}).items()), default=0.0)


def _check_concurrency(client: httpx.Client, route: str, probes: list[Probe], offline: list[dict[str, Any]],
                       n: int) -> tuple[dict[str, Any], list[str]]:
    failures = []
    same = _at_once(client, route, [probes[0]] * n)
    # a chat completion's body carries its own id and creation time: its answer is what must be identical
    bodies = [_comparable(r.json()) if r.status_code == 200 else None for r in same]
    identical = all(b is not None for b in bodies) and all(b == bodies[0] for b in bodies)
    if not identical:
        failures.append(f"{n} identical concurrent requests: statuses {sorted({r.status_code for r in same})}, "
                        f"{len({json.dumps(b, sort_keys=True) for b in bodies})} distinct answers")
    picks = [i % len(probes) for i in range(n)]
    mixed = _at_once(client, route, [probes[i] for i in picks])
    mixed_ok = all(r.status_code == 200 and _agrees(_answer(r.json()), offline[i]) for r, i in zip(mixed, picks, strict=True))
    gap = max((_score_gap(_answer(r.json()), offline[i]) for r, i in zip(mixed, picks, strict=True) if r.status_code == 200),
              default=0.0)
    result: dict[str, Any] = {"requests": n, "identical": identical, "mixed_match_offline": mixed_ok, "mixed_max_score_diff": gap}
    if not mixed_ok:
        failures.append(f"{n} concurrent mixed requests: some answers differ from offline or failed")
    return result, failures


def _measure(client: httpx.Client, route: str, payload: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    for _ in range(min(5, n)):  # warm-up: first requests pay for connection setup and lazy allocations
        client.post(route, json=payload)
    latencies, errors = [], 0
    for _ in range(n):
        start = time.perf_counter()
        errors += client.post(route, json=payload).status_code != 200
        latencies.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(lambda _: client.post(route, json=payload).status_code, range(n)))
    elapsed = time.perf_counter() - start
    errors += sum(s != 200 for s in statuses)
    p50, p95 = np.percentile(latencies, [50, 95])
    return {"requests": n, "p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "mean_ms": round(float(np.mean(latencies)), 3), "throughput_rps": round(n / elapsed, 2),
            "throughput_concurrency": concurrency, "errors": errors,
            # the raw sequential timings, so the report can draw their histogram (serve's outputs are all run records)
            "samples_ms": [round(value, 3) for value in latencies]}


def _latency_picture(latency: dict[str, Any] | None, path: Path) -> None:
    """latency.png beside the report (also when a gate failed: a slow p95 is best read from its histogram)."""
    if latency and latency.get("samples_ms"):
        from runner.report.plots import latency_histogram

        latency_histogram(latency["samples_ms"], latency["p50_ms"], latency["p95_ms"], path)


def _served_labels(client: httpx.Client, texts: list[str], batch: int) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(texts), batch):
        response = client.post("/predict", json={"texts": texts[start:start + batch]})
        response.raise_for_status()
        answers += [item["label"] for item in response.json()["predictions"]]
    return answers


def _served_accuracy(answers: list[str], expected: list[str], samples: int) -> dict[str, Any]:
    """Accuracy of the served model on the data step's test split: the number that matters is the one users get.

    Not rounded: it is compared with the quantize and export gates' unrounded figures (the report rounds for show)."""
    correct = sum(a == e for a, e in zip(answers[:samples], expected[:samples], strict=True))
    count = min(samples, len(expected))
    return {"samples": count, "correct": correct, "accuracy": correct / max(count, 1)}


def _artifact(inputs: dict[str, Path]) -> Path:
    for kind in ("quantize", "export"):  # the quantized model is the one that ships, when there is one
        if kind in inputs and (Path(inputs[kind]) / "onnx" / "model.onnx").is_file():
            return Path(inputs[kind]) / "onnx"
    raise StageError(f"no onnx/model.onnx in the upstream outputs {sorted(inputs)}; serve needs an ONNX export")


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Start the server on the ONNX artifact, probe it (health, probes, errors, batching, accuracy, latency), stop it.

    Raises:
        StageError: no onnx/model.onnx upstream; the artifact's task is not the recipe's; the server exits, cannot
            load the model or is not ready within `serve.startup_timeout_s`; a `messages` probe without a chat
            template; a probe the schema refuses; any smoke check failing (listed, with serve_report.json kept).
    """
    serve = Serve.model_validate(config["serve"])
    task = Model.model_validate(config["model"]).task
    artifact = _artifact(inputs)
    settings = ServerSettings(
        max_batch=serve.max_batch_size, max_wait_ms=serve.max_wait_ms,
        max_concurrency=max(32, 2 * serve.concurrency),  # the concurrency check must not run into 429s
        max_new_tokens=max(256, *(p.max_new_tokens for p in serve.probes)),
    )
    route = "/predict" if task == CLASSIFIER else "/generate"
    classifier = task == CLASSIFIER
    recorded = serve_gates.recorded_accuracy(artifact) if classifier else None
    rows = None
    if classifier and "data" in inputs:
        rows = TestRows(Path(inputs["data"]), max(serve.eval_samples, recorded["samples"] if recorded else 0))
    info, offline, offline_batch = _offline(artifact, serve.probes, settings.threads, rows)
    if info.task != task:
        raise StageError(f"the recipe's model.task is {task} but {artifact} holds a {info.task} model")
    report: dict[str, Any] = {"artifact": str(artifact), "task": task, "sha256": info.sha256,
                              "quantized": info.quantized, "failures": []}
    failures: list[str] = report["failures"]
    server = ServerProcess(artifact, settings, out / "server.log")
    report["server"] = {"port": server.port, "pid": server.proc.pid, "log": "server.log"}
    try:
        report["server"]["startup_s"] = round(server.wait_ready(serve.startup_timeout_s), 3)
        with server.client() as client:
            report["auth_required"] = httpx.get(f"{server.base_url}/info").status_code == 401
            if not report["auth_required"]:
                failures.append("/info answered without the API key")
            served_info = client.get("/info").json()
            if served_info.get("sha256") != info.sha256:
                failures.append(f"the server reports artifact {served_info.get('sha256')}, expected {info.sha256}")
            report["probes"], found = _check_probes(client, route, serve.probes, offline, offline_batch)
            failures += found
            report["bad_inputs"], found = _check_bad_inputs(client, route, task, settings, info.max_positions)
            failures += found
            report["concurrency"], found = _check_concurrency(client, route, serve.probes, offline, serve.concurrency)
            failures += found
            if classifier:
                report["batching"] = served_info.get("batching")
                texts = serve_gates.invariance_texts([p.text or "" for p in serve.probes], rows.texts if rows else [])
                report["invariance"], found = serve_gates.check_invariance(client, texts, serve.max_score_drift)
                failures += found
            if rows is not None:
                answers = _served_labels(client, rows.texts, settings.max_batch_size)
                report["served_eval"] = _served_accuracy(answers, rows.expected, serve.eval_samples)
                if recorded is not None:
                    report["served_vs_offline"], found = serve_gates.check_accuracy(
                        answers, rows.offline, rows.expected, rows.same_ids, recorded, info.batch_invariant)
                    failures += found
            first = serve.probes[0]
            report["latency"] = _measure(client, _route(first, route), _payload(first), serve.latency_requests,
                                         serve.concurrency)
            if report["latency"]["errors"]:
                failures.append(f"{report['latency']['errors']} requests failed while measuring latency")
            if report["latency"]["p95_ms"] > serve.max_p95_ms:
                failures.append(f"p95 latency {report['latency']['p95_ms']} ms > serve.max_p95_ms {serve.max_p95_ms}")
            report["metrics_ok"] = "serve_requests_total" in client.get("/metrics").text
            if not report["metrics_ok"]:
                failures.append("/metrics does not expose serve_requests_total")
    except httpx.HTTPError as exc:  # the server hung up, crashed or stopped answering: the artifact's fault, not ours
        exited = "" if server.proc.poll() is None else f" (the server exited:\n{server.log_tail()})"
        failures.append(f"a request to the server failed: {exc!r}{exited}")
    except BaseException as exc:
        failures.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise
    finally:
        report["server"]["exit_code"] = server.stop()
        report["passed"] = not failures
        (out / "serve_report.json").write_text(json.dumps(report, indent=2))
        _latency_picture(report.get("latency"), out / "latency.png")
    if failures:
        raise StageError("smoke-serve failed:\n- " + "\n- ".join(failures) + f"\n(see {out / 'serve_report.json'})")
    latency = report["latency"]
    return {"p50_ms": latency["p50_ms"], "p95_ms": latency["p95_ms"], "throughput_rps": latency["throughput_rps"],
            "probes_passed": sum(p["passed"] for p in report["probes"]), "probes": len(report["probes"]),
            "quantized": info.quantized, "sha256": info.sha256,
            **({"max_score_drift": report["invariance"]["max_score_drift"]} if "invariance" in report else {})}
