"""The server under stress: schemathesis against /openapi.json, the bad-payload set, and N requests at concurrency C.

    python bench/serve_stress.py [--json bench/results/serve_stress.json] [--requests 5000] [--concurrency 32]
                                 [--gen-requests 1000] [--examples 100] [--seeds 3] [--max-seconds 900]
    python bench/serve_stress.py --smoke     # 200 + 20 requests, 5 schemathesis examples, one seed (under a minute)

Two real servers (`python -m runner.serving`, uvicorn, loopback only, API key on, default limits) serve tiny artifacts
built here from configs and exported as the export stage does (dynamo / onnxruntime-genai builder): a DistilBERT-like
classifier and a Llama-like generator with a KV cache. Against each:

1. schemathesis (examples, coverage and fuzzing phases; positive and negative data; fixed seeds 1..N) on the served
   /openapi.json with the `not_a_server_error` check: zero 5xx allowed. Other conformance checks are not the target.
2. the bad-payload set: the smoke-serve stage's own list (runner/stages/serve/__init__.py) plus hostile bodies (deep nesting,
   huge numbers, invalid UTF-8, lone surrogates, NaN/Infinity, a degenerate temperature, wrong methods, content types
   and credentials): every one must get a 4xx, never a 5xx or a dropped connection.
3. load: `--requests` requests (classifier) and `--gen-requests` (generator) at `--concurrency` over keep-alive
   connections; every answer must be a 200 whose body equals the offline ONNX Runtime answer for that input
   (catches a batcher handing results to the wrong request). Then /ready is 200, the process is alive, and /metrics
   counts no 5xx for the whole session.

Everything is bounded: each request has a timeout, each phase a deadline, schemathesis a subprocess timeout.
The test suite (tests/test_serve_stress.py) runs the same functions with small numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run from a checkout as `python bench/serve_stress.py`: make `runner` importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from runner.serving.settings import ServerSettings  # noqa: E402
from runner.stages.serve import ServerProcess, _bad_requests  # noqa: E402

WORDS = ("the film plot acting music story ending cast script pacing camera was felt great wonderful lovely awful "
         "boring dull terrible clumsy charming brilliant and but quite very really a an of with").split()
SCORE_ATOL = 1e-4  # fp32 graph: batching and padding move scores by ~1e-7; a misrouted answer moves them by far more


# --- artifacts ---------------------------------------------------------------------------------------------------------


def sentences(n: int, seed: int, words: tuple[int, int] = (1, 30)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(n)]


def build_artifacts(folder: Path) -> dict[str, Path]:
    """A tiny classifier and a tiny generator (random weights, locally trained tokenizers), exported to ONNX."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from runner import genai
    from runner.recipe.sections import Export
    from runner.stages.export import export_encoder

    corpus = sentences(2000, 0) + ["### Instruction:\n### Response:\n"]
    torch.manual_seed(0)
    # classifier: WordPiece + DistilBERT
    source = folder / "classifier-src"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=500, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(source)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(fast), dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=128, num_labels=2,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}, pad_token_id=fast.pad_token_id,
    )).eval()
    classifier = folder / "classifier"
    export_encoder(model, fast, Export(), classifier)
    (classifier / "labels.json").write_text(json.dumps({"id2label": {"0": "negative", "1": "positive"},
                                                        "label2id": {"negative": 0, "positive": 1}}))
    # generator: byte-level BPE + Llama, exported with past key values
    source = folder / "generator-src"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(source)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )).save_pretrained(source, safe_serialization=True)
    generator = folder / "generator"
    genai.build(source, generator, "fp32", "cpu")
    return {"classifier": classifier, "generator": generator}


# --- servers -------------------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """A running server and what it serves."""

    server: ServerProcess
    artifact: Path
    task: str
    settings: ServerSettings
    max_positions: int
    notes: list[str] = field(default_factory=list)

    @property
    def route(self) -> str:
        return "/predict" if self.task == "sequence-classification" else "/generate"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.api_key}"}


def start(artifact: Path, log: Path, settings: ServerSettings | None = None, ready_timeout_s: float = 120) -> Served:
    """The real server in its own process group (stopped with `served.server.stop()`), ready when this returns."""
    from runner.serving.artifact import load_model

    settings = settings or ServerSettings()
    info = load_model(artifact, 1).info
    server = ServerProcess(artifact, settings, log)
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return Served(server, artifact, info.task, settings, info.max_positions)


# --- 1. schemathesis -----------------------------------------------------------------------------------------------------


def schemathesis_available() -> str | None:
    """The installed schemathesis version, or None."""
    try:
        from importlib.metadata import version

        import schemathesis  # noqa: F401

        return version("schemathesis")
    except ImportError:
        return None


def run_schemathesis(served: Served, workdir: Path, max_examples: int = 100, seed: int = 1,
                     timeout_s: float = 300, phases: str = "examples,coverage,fuzzing") -> dict[str, Any]:
    """`schemathesis run` on the served /openapi.json in a subprocess (bounded), with the API key; returns counts.

    The ndjson report is read back: every request it sent, its status, and every failed check."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "schemathesis.ndjson"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    command = [
        sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "run", f"{served.server.base_url}/openapi.json", "-H", f"Authorization: Bearer {served.server.api_key}",
        "--checks", "not_a_server_error", "--phases", phases, "--mode", "all", "--max-examples", str(max_examples),
        "--seed", str(seed), "--workers", "1", "--request-timeout", "30", "--generation-database", "none",
        "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report), "--max-failures", "20",
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
        returncode, output, timed_out = done.returncode, done.stdout + done.stderr, False
    except subprocess.TimeoutExpired as exc:
        returncode, timed_out = None, True
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    statuses: Counter[int] = Counter()
    failures: list[dict[str, Any]] = []
    operations: Counter[str] = Counter()
    if report.is_file():
        for line in report.read_text().splitlines():
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished["recorder"]
            for case_id, interaction in recorder.get("interactions", {}).items():
                response = interaction.get("response") or {}
                status = response.get("status_code")
                statuses[status] += 1
                operations[recorder["label"]] += 1
                for check in recorder.get("checks", {}).get(case_id, []):
                    if check.get("status") == "failure":
                        case = recorder["cases"].get(case_id, {}).get("value", {})
                        failures.append({"operation": recorder["label"], "check": check.get("name"), "status": status,
                                         "body": case.get("body"), "query": case.get("query")})
    server_errors = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
    return {
        "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "operations": dict(operations), "server_errors": server_errors, "failures": failures[:20],
        "returncode": returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - started, 2),
        "passed": returncode == 0 and server_errors == 0 and not failures and not timed_out,
        "output_tail": output[-3000:] if returncode != 0 else "",
    }


# --- 2. the bad-payload set ------------------------------------------------------------------------------------------------


JSON = {"content-type": "application/json"}


def hostile_requests(served: Served) -> dict[str, dict[str, Any]]:
    """name -> httpx request arguments (method, url, ...) beyond the smoke stage's set; each must get a 4xx."""
    route, s = served.route, served.settings
    body = ({"texts": ["fine"]} if served.task == "sequence-classification" else {"prompt": "fine", "max_new_tokens": 2})
    text_field = '{"texts": ["%s"]}' if served.task == "sequence-classification" else '{"prompt": "%s"}'
    requests: dict[str, dict[str, Any]] = {
        "deeply nested arrays": {"content": b"[" * 200_000 + b"]" * 200_000, "headers": JSON},
        "deeply nested field": {"content": (text_field % "x").replace('"x"', "[" * 50_000 + "]" * 50_000).encode(),
                                "headers": JSON},
        "5000-digit number": {"content": b'{"texts": [' + b"9" * 5000 + b"]}", "headers": JSON},
        "invalid UTF-8": {"content": (text_field % "\udcff").encode("utf-8", "surrogateescape"), "headers": JSON},
        "lone surrogate escape": {"content": (text_field % "\\ud800").encode(), "headers": JSON},
        "JSON array body": {"content": b"[1, 2, 3]", "headers": JSON},
        "JSON null body": {"content": b"null", "headers": JSON},
        "empty body": {"content": b"", "headers": JSON},
        "form body": {"content": b"texts=a&texts=b", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        "no content-type": {"content": json.dumps(body).encode(), "headers": {"content-type": ""}},
        "Content-Length shorter than the body": {"raw": _raw(served, route, json.dumps(body).encode(), length=5)},
        "Content-Length and chunked at once": {"raw": _raw(served, route, b"5\r\nhello\r\n0\r\n\r\n", length=5,
                                                           extra="Transfer-Encoding: chunked\r\n")},
        "garbage request line": {"raw": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n"},
        "gzip claimed, not gzip": {"content": json.dumps(body).encode(), "headers": {**JSON, "content-encoding": "gzip"}},
        "chunked body over the limit": {"content": _chunks(s.max_body_bytes + 10), "headers": JSON},
        "GET on the inference route": {"method": "GET"},
        "DELETE on the inference route": {"method": "DELETE"},
        "unknown route": {"url": "/nope"},
        "path traversal": {"url": "/../../etc/passwd"},
        "encoded traversal": {"url": "/%2e%2e/%2e%2e/etc/passwd"},
        "no API key": {"json": body, "auth": None},
        "wrong API key": {"json": body, "auth": {"Authorization": "Bearer wrong"}},
        "non-ASCII API key": {"json": body, "auth": {"Authorization": "Bearer \u00e9\u00e9".encode()}},
        "basic auth instead of bearer": {"json": body, "auth": {"Authorization": "Basic dXNlcjpwYXNz"}},
        "huge header": {"json": body, "headers": {"X-Junk": "a" * 60_000}},
    }
    if served.task == "sequence-classification":
        requests |= {
            "NaN inside texts": {"content": b'{"texts": [NaN]}', "headers": JSON},
            "object instead of text": {"json": {"texts": [{"a": 1}]}},
            "texts nested lists": {"json": {"texts": [["a"]]}},
            "boolean text": {"json": {"texts": [True]}},
        }
    else:
        requests |= {
            "NaN temperature": {"content": b'{"prompt": "hi", "temperature": NaN}', "headers": JSON},
            "Infinity temperature": {"content": b'{"prompt": "hi", "temperature": Infinity}', "headers": JSON},
            "1e999 top_p": {"content": b'{"prompt": "hi", "top_p": 1e999}', "headers": JSON},
            "float max_new_tokens": {"json": {"prompt": "hi", "max_new_tokens": 2.5}},
            "bool max_new_tokens": {"json": {"prompt": "hi", "max_new_tokens": True}},
            "negative seed": {"json": {"prompt": "hi", "seed": -1}},
            "string seed": {"json": {"prompt": "hi", "seed": "1"}},
            # A degenerate but schema-valid temperature: logits / 5e-324 overflow to inf and the softmax turns NaN.
            "denormal temperature": {"json": {"prompt": "hi", "temperature": 5e-324, "max_new_tokens": 2}},
        }
    return requests


def _raw(served: Served, route: str, body: bytes, length: int, extra: str = "") -> bytes:
    head = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {served.server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + body


def _send_raw(port: int, data: bytes, timeout_s: float) -> int | str:
    """Bytes as they are on a fresh connection (httpx refuses to send a malformed request); the first status line."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                return "connection closed without a response" if not received else f"bad response {received[:40]!r}"
            received += chunk
    parts = received.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else f"bad status line {received[:40]!r}"


def _chunks(total: int, size: int = 65536):  # noqa: ANN202 - a generator body: sent with Transfer-Encoding: chunked
    def body():  # noqa: ANN202
        sent = 0
        while sent < total:
            part = min(size, total - sent)
            sent += part
            yield b"a" * part
    return body()


# Requests for which a 200 is right too (any 5xx or dropped connection is still wrong): a denormal temperature is valid
# input; a server that ignores Content-Encoding reads the plain body; a 60 KB header is within uvicorn's limits.
ALSO_OK_200 = {"denormal temperature", "gzip claimed, not gzip", "huge header"}


def run_bad_payloads(served: Served, timeout_s: float = 30) -> dict[str, Any]:
    """The smoke stage's bad-request set plus the hostile set; every one must get a 4xx and the server stay ready."""
    stage_set = _bad_requests(served.task, served.settings, served.max_positions)
    results: dict[str, Any] = {}
    problems: list[str] = []
    # No keep-alive: a request that lies about its length must not leave bytes behind for the next one.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=served.server.base_url, headers=served.auth, timeout=timeout_s, limits=limits) as client:
        for name, spec in [*(("stage: " + k, v) for k, v in stage_set.items()),
                           *(("hostile: " + k, v) for k, v in hostile_requests(served).items())]:
            spec = dict(spec)
            method = spec.pop("method", "POST")
            url = spec.pop("url", served.route)
            auth = spec.pop("auth", served.auth)
            headers = {**({} if auth is None else auth), **spec.pop("headers", {})}
            if auth is None:
                headers["Authorization"] = ""
            try:
                if "raw" in spec:
                    results[name] = status = _send_raw(served.server.port, spec["raw"], timeout_s)
                    if not (isinstance(status, int) and 400 <= status < 500):
                        problems.append(f"{name}: {status}")
                    continue
                request = client.build_request(method, url, headers=headers, **spec)
                if auth is None:
                    request.headers.pop("Authorization", None)
                if headers.get("content-type") == "":
                    request.headers.pop("content-type", None)
                status: int | str = client.send(request).status_code
            except httpx.HTTPError as exc:
                status = f"{type(exc).__name__}: {exc}"
            results[name] = status
            ok = isinstance(status, int) and (400 <= status < 500 or (name.split(": ", 1)[1] in ALSO_OK_200
                                                                      and status == 200))
            if not ok:
                problems.append(f"{name}: {status}")
        ready = client.get("/ready").status_code
    if ready != 200:
        problems.append(f"/ready answered {ready} after the bad payloads")
    return {"requests": len(results), "statuses": results, "problems": problems, "ready_after": ready,
            "passed": not problems}


# --- 3. load -----------------------------------------------------------------------------------------------------------------


def load_payloads(served: Served, n: int = 64, seed: int = 3) -> list[tuple[dict[str, Any], Any]]:
    """Distinct request bodies with the answer offline ONNX Runtime gives for each."""
    from runner.serving.artifact import load_model

    model = load_model(served.artifact, 1)
    rng = random.Random(seed)
    pool = []
    if served.task == "sequence-classification":
        for _ in range(n):
            texts = sentences(rng.randint(1, 4), rng.randint(0, 10**6), (1, 40))
            pool.append(({"texts": texts}, model.predict(texts)))
    else:
        for prompt in sentences(n, seed, (1, 12)):
            body = {"prompt": prompt, "max_new_tokens": 4}
            pool.append((body, model.generate(prompt, 4)["tokens"]))
    return pool


def _agrees(task: str, body: dict[str, Any], expected: Any) -> bool:
    if task != "sequence-classification":
        return body.get("tokens") == expected
    served = body.get("predictions", [])
    return len(served) == len(expected) and all(
        s["label"] == e["label"] and all(abs(s["scores"][k] - v) <= SCORE_ATOL for k, v in e["scores"].items())
        for s, e in zip(served, expected, strict=True))


async def _load(served: Served, pool: list[tuple[dict[str, Any], Any]], requests: int, concurrency: int,
                deadline_s: float, request_timeout_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[Any] = Counter()
    wrong: list[str] = []
    next_index = 0
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=served.server.base_url, headers=served.auth, limits=limits,
                                 timeout=request_timeout_s) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests and time.perf_counter() - start < deadline_s:
                body, expected = pool[next_index % len(pool)]
                next_index += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(served.route, json=body)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[response.status_code] += 1
                if response.status_code == 200 and not _agrees(served.task, response.json(), expected):
                    wrong.append(json.dumps(body)[:120])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    done = sum(statuses.values())
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    failures = done - statuses.get(200, 0) + len(wrong)
    return {"requests": done, "planned": requests, "concurrency": concurrency, "seconds": round(elapsed, 2),
            "rps": round(done / elapsed, 1) if elapsed else 0.0, "p50_ms": round(quantiles[49], 1),
            "p99_ms": round(quantiles[98], 1), "max_ms": round(max(latencies, default=0.0), 1),
            "statuses": {str(k): v for k, v in statuses.items()}, "wrong_answers": len(wrong), "wrong_examples": wrong[:5],
            "failures": failures, "deadline_hit": done < requests}


def run_load(served: Served, requests: int, concurrency: int, deadline_s: float = 300,
             request_timeout_s: float = 60) -> dict[str, Any]:
    pool = load_payloads(served)
    before = health(served)["server_5xx_total"]
    result = asyncio.run(_load(served, pool, requests, concurrency, deadline_s, request_timeout_s))
    result |= health(served)
    result["server_5xx_during_load"] = result["server_5xx_total"] - before
    result["passed"] = (result["failures"] == 0 and not result["deadline_hit"] and result["ready_after"] == 200
                        and result["alive_after"] and result["server_5xx_during_load"] == 0)
    return result


def health(served: Served) -> dict[str, Any]:
    """After the stress: ready, alive, and what /metrics counted by status over the whole life of the server."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=served.server.base_url, headers=served.auth, timeout=30) as client:
        ready = client.get("/ready").status_code
        text = client.get("/metrics").text
    by_status: Counter[str] = Counter()
    server_errors = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "serve_requests_total":
                status, route = sample.labels["status"], sample.labels["route"]
                by_status[status] += int(sample.value)
                # /ready answers 503 while the model loads: that is its job, not an error
                server_errors += int(sample.value) if status.startswith("5") and route != "/ready" else 0
    import psutil

    rss = psutil.Process(served.server.proc.pid).memory_info().rss if served.server.proc.poll() is None else 0
    return {"ready_after": ready, "alive_after": served.server.proc.poll() is None,
            "server_counted_statuses": dict(sorted(by_status.items())),
            "server_5xx_total": server_errors,
            "server_rss_mb": round(rss / 2**20, 1)}


# --- the whole run ---------------------------------------------------------------------------------------------------------


def merge_schemathesis(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several seeds' results as one row (statuses added up, failures of every seed kept)."""
    statuses: Counter[str] = Counter()
    for run in runs:
        statuses.update(run["statuses"])
    return {"seeds": len(runs), "requests": sum(r["requests"] for r in runs), "statuses": dict(statuses),
            "server_errors": sum(r["server_errors"] for r in runs), "failures": [f for r in runs for f in r["failures"]],
            "timed_out": any(r["timed_out"] for r in runs), "seconds": round(sum(r["seconds"] for r in runs), 2),
            "passed": all(r["passed"] for r in runs), "runs": runs}


def stress(artifacts: dict[str, Path], workdir: Path, requests: int, gen_requests: int, concurrency: int,
           examples: int, deadline_s: float, seeds: int = 3) -> dict[str, Any]:
    results: dict[str, Any] = {}
    version = schemathesis_available()
    for name, artifact in artifacts.items():
        count = requests if name == "classifier" else gen_requests
        served = start(artifact, workdir / f"{name}-server.log")
        try:
            row: dict[str, Any] = {"task": served.task}
            if version and examples:
                runs = [run_schemathesis(served, workdir / f"st-{name}-{seed}", examples, seed=seed,
                                         timeout_s=deadline_s / (2 * seeds)) for seed in range(1, seeds + 1)]
                row["schemathesis"] = merge_schemathesis(runs)
            else:
                row["schemathesis"] = {"skipped": "schemathesis is not importable" if not version else "--examples 0"}
            row["bad_payloads"] = run_bad_payloads(served)
            row["load"] = run_load(served, count, concurrency, deadline_s=deadline_s / 2)
            row["alive_before_stop"] = served.server.proc.poll() is None
        finally:
            served.server.stop()
        results[name] = row
    return {"schemathesis_version": version, "servers": results}


def table(result: dict[str, Any]) -> str:
    lines = ["| server | schemathesis requests (5xx) | bad payloads (non-4xx) | load requests @ conc. | rps | p50 ms | "
             "p99 ms | failures | wrong answers | ready after | 5xx counted by server |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["servers"].items():
        st = row["schemathesis"]
        st_cell = "skipped" if "skipped" in st else f"{st['requests']} ({st['server_errors']})"
        bad, load = row["bad_payloads"], row["load"]
        lines.append(f"| {name} | {st_cell} | {bad['requests']} ({len(bad['problems'])}) | {load['requests']} @ "
                     f"{load['concurrency']} | {load['rps']} | {load['p50_ms']} | {load['p99_ms']} | {load['failures']} | "
                     f"{load['wrong_answers']} | {load['ready_after']} | {load['server_5xx_total']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_stress.json"))
    parser.add_argument("--requests", type=int, default=5000, help="Classifier requests under load.")
    parser.add_argument("--gen-requests", type=int, default=1000, help="Generator requests under load.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--examples", type=int, default=100, help="schemathesis max examples per operation (0: skip).")
    parser.add_argument("--seeds", type=int, default=3, help="schemathesis runs (seeds 1..N) per server.")
    parser.add_argument("--max-seconds", type=float, default=900, help="Deadline for each server's checks.")
    parser.add_argument("--smoke", action="store_true", help="200 + 20 requests at concurrency 8, 5 examples, 1 seed.")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.gen_requests, args.concurrency, args.examples, args.seeds = 200, 20, 8, 5, 1
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serve-stress-") as tmp:
        artifacts = build_artifacts(Path(tmp))
        result = stress(artifacts, Path(tmp), args.requests, args.gen_requests, args.concurrency, args.examples,
                        args.max_seconds, args.seeds)
        for name in artifacts:  # keep the evidence of any failure
            log = Path(tmp) / f"{name}-server.log"
            result["servers"][name]["server_log_tail"] = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
    problems = []
    for name, row in result["servers"].items():
        st = row["schemathesis"]
        if "skipped" not in st and not st["passed"]:
            problems.append(f"{name}: schemathesis: {st['server_errors']} server errors, {len(st['failures'])} failures")
        problems += [f"{name}: bad payload {p}" for p in row["bad_payloads"]["problems"]]
        if not row["load"]["passed"]:
            problems.append(f"{name}: load: {row['load']['failures']} failures, ready {row['load']['ready_after']}")
        if row["load"]["server_5xx_total"]:
            problems.append(f"{name}: the server counted {row['load']['server_5xx_total']} 5xx responses")
    try:
        from bench.common import machine_info

        machine: dict[str, Any] = machine_info()
    except ImportError:
        machine = {}
    result |= {"benchmark": "serve_stress", "problems": problems, "passed": not problems, "machine": machine,
               "seconds": round(time.monotonic() - started, 1),
               "args": {k: str(v) for k, v in vars(args).items()}}
    print(table(result))
    print("\nproblems:" + ("".join(f"\n- {p}" for p in problems) if problems else " none"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    from bench.common import figure

    figure("stress", f"problems over {args.requests} + {args.gen_requests} requests and the bad payloads", len(problems),
           "0", not problems)
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
