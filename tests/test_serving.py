"""The model server at endpoint level (FastAPI TestClient over the real app, real ONNX Runtime, real tokenizers).

The artifacts are the tiny fixture models exported as the export stage does (dynamo for the classifier, the
onnxruntime-genai builder for the Llama), built once per test session.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from runner.serving import ServerSettings, create_app, generate_offline, load_model, predict_offline
from runner.serving.artifact import length_groups

TEXTS = ["the film was wonderful", "awful plot and a dull dull ending", "", "fun"]


def wait_ready(client: TestClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.02)


def started(artifact: Path, **settings: object) -> TestClient:
    client = TestClient(create_app(artifact, ServerSettings(**settings)))
    client.__enter__()  # runs the lifespan: the model loads and warms up in the background
    wait_ready(client)
    return client


@pytest.fixture(scope="module")
def cls_client(classifier_artifact: Path):
    client = started(classifier_artifact, max_body_bytes=4096, max_batch_size=4, max_input_chars=200)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def gen_client(llama_artifact: Path):
    client = started(llama_artifact)
    yield client
    client.__exit__(None, None, None)


def assert_same_predictions(served: list[dict], offline: list[dict]) -> None:
    assert [p["label"] for p in served] == [p["label"] for p in offline]
    for s, o in zip(served, offline, strict=True):
        assert s["scores"].keys() == o["scores"].keys()
        assert all(abs(s["scores"][k] - o["scores"][k]) <= 1e-5 for k in o["scores"])


def metric_samples(client: TestClient) -> list:
    return [s for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples]


def test_ready_is_503_until_warm_then_200(classifier_artifact: Path) -> None:
    app = create_app(classifier_artifact, ServerSettings())
    cold = TestClient(app)  # without `with`, the lifespan never runs: nothing loads, nothing warms up
    assert cold.get("/health").status_code == 200
    assert cold.get("/ready").status_code == 503
    assert cold.get("/info").status_code == 503
    assert cold.post("/predict", json={"texts": ["hi"]}).status_code == 503
    with TestClient(app) as warm:
        wait_ready(warm)
        assert warm.get("/ready").json() == {"status": "ready"}


def test_info_docs_and_openapi(cls_client: TestClient, classifier_artifact: Path) -> None:
    info = cls_client.get("/info").json()
    assert info["task"] == "sequence-classification"
    assert info["sha256"] == hashlib.sha256((classifier_artifact / "model.onnx").read_bytes()).hexdigest()
    assert info["quantized"] is False and info["labels"] == ["negative", "positive"]
    assert info["limits"]["max_batch_size"] == 4 and "api_key" not in info["limits"]
    paths = cls_client.get("/openapi.json").json()["paths"]
    assert "/predict" in paths and "/generate" not in paths  # only the artifact's task is served
    assert cls_client.get("/docs").status_code == 200


def test_predict_matches_offline(cls_client: TestClient, classifier_artifact: Path) -> None:
    response = cls_client.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200
    assert_same_predictions(response.json()["predictions"], predict_offline(classifier_artifact, TEXTS))
    one = cls_client.post("/predict", json={"texts": TEXTS[:1]}).json()["predictions"]
    assert_same_predictions(one, predict_offline(classifier_artifact, TEXTS[:1]))


def test_generate_matches_offline_and_torch(gen_client: TestClient, llama_artifact: Path, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = gen_client.post("/generate", json={"prompt": "the film was", "max_new_tokens": 12}).json()
    offline = generate_offline(llama_artifact, "the film was", 12)
    assert served == offline and served["prompt_tokens"] > 0
    # The KV-cache loop must decode exactly what transformers' own greedy generate does on the source model.
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok("the film was", return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).generate(**ids, max_new_tokens=12, do_sample=False)
    expected = reference[0, ids["input_ids"].shape[1]:].tolist()
    assert served["tokens"] == [t for t in expected if t != tok.eos_token_id][: len(served["tokens"])]
    sampled = {"prompt": "the plot", "max_new_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first, second = (gen_client.post("/generate", json=sampled).json() for _ in range(2))
    assert first == second == generate_offline(llama_artifact, "the plot", 8, temperature=0.9, top_p=0.9, seed=7)


def test_length_groups_partition_and_bound_padding() -> None:
    lengths = [30, 5, 6, 29, 12, 5, 31, 7, 13, 6]
    groups = length_groups(lengths, slack=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # padded size of each run stays within 25 % of its real tokens
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert len(length_groups([20] * 16)) == 1 and length_groups([]) == []


@pytest.fixture(scope="module")
def dynamic_int8_artifact(classifier_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 classifier quantized as `onnx-dynamic-int8` does it (activation scales computed per run)."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path_factory.mktemp("dynamic-int8") / "onnx"
    shutil.copytree(classifier_artifact, out, ignore=shutil.ignore_patterns("model.onnx"))
    quantize_dynamic(classifier_artifact / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8)
    return out


def max_drift(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b, strict=True) for k in x["scores"])


LONG = "the film was wonderful and the cast felt lovely and the music was superb from the start to the very end " * 2


def test_padding_to_a_longer_neighbour_keeps_scores(classifier_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A static graph shares runs: a text padded to a much longer neighbour's length keeps its scores (masks)."""
    model = load_model(classifier_artifact)
    assert model.info.batch_invariant and model.shares_runs
    texts = [t for t in TEXTS if t]
    alone = [model.predict([t])[0] for t in texts]
    monkeypatch.setattr("runner.serving.artifact.length_groups", lambda lengths, slack=0.25: [list(range(len(lengths)))])
    padded = model.predict([*texts, LONG])[:-1]  # one run, every text padded to LONG's length
    assert [p["label"] for p in padded] == [a["label"] for a in alone] and max_drift(alone, padded) <= 1e-6


def test_dynamic_int8_runs_each_text_alone(dynamic_int8_artifact: Path) -> None:
    model = load_model(dynamic_int8_artifact)
    assert "DynamicQuantizeLinear" in model.info.quantization_ops and not model.info.batch_invariant
    texts = [*TEXTS, LONG, "dull"]
    alone = [model.predict([t])[0] for t in texts]
    assert max_drift(alone, model.predict(texts)) == 0.0  # the batch is the text itself: identical, not close
    # Told to share runs anyway, the same graph's scores move with their neighbours (what invariance prevents).
    shared = load_model(dynamic_int8_artifact, invariant=False)
    assert shared.shares_runs and max_drift(alone, shared.predict(texts)) > 0


def test_dynamic_int8_is_served_per_request(dynamic_int8_artifact: Path) -> None:
    client = started(dynamic_int8_artifact, max_batch=16, max_wait_ms=200)
    try:
        assert client.get("/info").json()["batching"] == "per request"
        texts = [*TEXTS, LONG, "dull", "the plot was awful"]
        alone = [client.post("/predict", json={"texts": [t]}).json()["predictions"][0] for t in texts]
        answers: dict[int, dict] = {}

        def ask(i: int) -> None:
            answers[i] = client.post("/predict", json={"texts": [texts[i % len(texts)]]}).json()["predictions"][0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(17)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max_drift([alone[i % len(texts)] for i in range(17)], [answers[i] for i in range(17)]) == 0.0
    finally:
        client.__exit__(None, None, None)


def test_generation_stops_at_eos(llama_artifact: Path) -> None:
    model = load_model(llama_artifact)
    greedy = model.generate("the film was", 5)
    model.eos_ids = {greedy["tokens"][0]}  # make the first greedy token the end-of-sequence token
    assert model.generate("the film was", 5) == {**greedy, "text": "", "tokens": [], "finish_reason": "stop"}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"content": b'{"texts": ["unclosed', "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"texts": "not a list"}}, 422),
        ({"json": {"texts": [1, 2]}}, 422),
        ({"json": {"texts": []}}, 422),
        ({"json": {}}, 422),
        ({"json": {"texts": ["a"], "tempreature": 1}}, 422),
        ({"json": {"texts": ["a"] * 5}}, 422),  # max_batch_size 4
        ({"json": {"texts": ["a" * 201]}}, 422),  # max_input_chars 200
        ({"content": b'{"texts": ["' + b"a" * 5000 + b'"]}', "headers": {"content-type": "application/json"}}, 413),
    ],
    ids=["invalid-json", "texts-not-list", "wrong-types", "empty-batch", "missing", "unknown-field", "batch-too-big",
         "text-too-long", "body-too-big"],
)
def test_predict_rejects_bad_input(cls_client: TestClient, body: dict, status: int) -> None:
    assert cls_client.post("/predict", **body).status_code == status
    assert cls_client.get("/ready").status_code == 200


def test_body_limit_without_content_length(cls_client: TestClient) -> None:
    chunks = iter([b'{"texts": ["', b"a" * 5000, b'"]}'])  # chunked upload: the limit must count the bytes read
    response = cls_client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_generate_rejects_bad_input(gen_client: TestClient) -> None:
    for body in [{"prompt": 5}, {"prompt": ""}, {"prompt": "hi", "max_new_tokens": "3"}, {"prompt": "hi", "top_p": 0},
                 {"prompt": "hi", "max_new_tokens": 10_000}, {"prompt": "hi", "temperature": -1}]:
        assert gen_client.post("/generate", json=body).status_code == 422, body
    too_long = gen_client.post("/generate", json={"prompt": "word " * 200})  # within max_input_chars, over the context
    assert too_long.status_code == 422 and "context of 128 tokens" in too_long.json()["detail"]
    assert gen_client.post("/predict", json={"texts": ["a"]}).status_code == 404


def test_concurrency_cap_429_and_unlimited_routes(classifier_artifact: Path) -> None:
    # A lone request waits max_wait_ms for batch partners: a real slow request, no sleep injected into the server.
    client = started(classifier_artifact, max_concurrency=1, max_batch=8, max_wait_ms=600)
    try:
        slow: dict[str, int] = {}
        thread = threading.Thread(target=lambda: slow.update(s=client.post("/predict", json={"texts": ["a"]}).status_code))
        thread.start()
        time.sleep(0.2)
        refused = client.post("/predict", json={"texts": ["b"]})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert [client.get(p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]
        thread.join()
        assert slow["s"] == 200
    finally:
        client.__exit__(None, None, None)


def test_timeout_504_and_server_recovers(classifier_artifact: Path) -> None:
    client = started(classifier_artifact, timeout_s=0.05, max_batch=8, max_wait_ms=400)
    try:
        response = client.post("/predict", json={"texts": ["a"]})
        assert response.status_code == 504 and "longer than" in response.json()["detail"]
        assert client.get("/ready").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_api_key(classifier_artifact: Path) -> None:
    with TestClient(create_app(classifier_artifact, ServerSettings(api_key="s3cret"))) as client:
        auth = {"Authorization": "Bearer s3cret"}
        deadline = time.monotonic() + 30
        while client.get("/ready", headers=auth).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/health").status_code == 200  # liveness needs no key
        for path in ("/ready", "/info", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert client.get(path, headers=auth).status_code == 200, path
        unauth = client.post("/predict", json={"texts": ["a"]})
        assert unauth.status_code == 401 and unauth.headers["www-authenticate"] == "Bearer"
        assert client.post("/predict", json={"texts": ["a"]}, headers=auth).status_code == 200


def test_dynamic_batching_merges_and_metrics(classifier_artifact: Path) -> None:
    client = started(classifier_artifact, max_batch=16, max_wait_ms=200)
    try:
        offline = predict_offline(classifier_artifact, TEXTS)
        answers: dict[int, list] = {}

        def ask(i: int) -> None:
            answers[i] = client.post("/predict", json={"texts": [TEXTS[i % 4]]}).json()["predictions"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, got in answers.items():  # merged into shared runs, yet each request gets its own text's answer
            assert_same_predictions(got, [offline[i % 4]])
        client.post("/predict", json={"texts": []})
        samples = metric_samples(client)
        batch = {s.name: s.value for s in samples if s.name.startswith("serve_batch_size")}
        # 8 texts went through fewer than 8 runs (the warm-up inference does not go through the batcher)
        assert batch["serve_batch_size_sum"] == 8 and batch["serve_batch_size_count"] < 8
        requests = {(s.labels["route"], s.labels["status"]): s.value for s in samples if s.name == "serve_requests_total"}
        assert requests[("/predict", "200")] == 8 and requests[("/predict", "422")] == 1
        assert any(s.name == "serve_request_duration_seconds_count" and s.labels["route"] == "/predict" for s in samples)
    finally:
        client.__exit__(None, None, None)


def test_cli_refuses_to_start_without_its_key(classifier_artifact: Path) -> None:
    cmd = [sys.executable, "-m", "runner.serving", "--artifact", str(classifier_artifact), "--api-key-env", "NO_SUCH_VAR_X"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode != 0 and "not starting unprotected" in result.stderr
