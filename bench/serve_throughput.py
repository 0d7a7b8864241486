"""P5: server throughput at concurrency 16 with dynamic batching against without it, side by side in one run.

    python bench/serve_throughput.py [--json bench/results/serve_throughput.json] [--requests 300] [--rounds 2]
                                     [--dim 512] [--layers 4] [--max-seconds 25] [--dynamic-int8]
    python bench/serve_throughput.py --smoke    # dim 64, 1 layer, 1 round of 32 requests: seconds (not the figure)

The model is a DistilBERT-like classifier built from a config (random weights: throughput does not depend on them) with a
WordPiece tokenizer trained on synthetic review sentences, exported
with torch.onnx dynamo exactly as the export stage does.
Each mode is the real server (`python -m runner.serving`, uvicorn, loopback) with the same settings except `max_batch`
(16 against 1); 16 keep-alive connections keep 16 requests of one text each in flight. Modes alternate within every
round so load from other processes on a shared machine hits both; the median round counts. Target: ratio >= 1.5.

The fp32 graph is batch-invariant, so the server batches it across requests. `--dynamic-int8` measures the price of
invariance instead: the graph quantized as `onnx-dynamic-int8` does it, which the server runs text by text (per request,
the default: "no batching" here) against batching it anyway (`invariant: false`, answers moving with their neighbours).

Two ratios are reported: wall-clock requests/s (the target's measure), and requests per CPU-second of the server
process, which stays meaningful when other processes take an unknown share of a shared machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a checkout as `python bench/serve_throughput.py`: make `runner` importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from runner.serving.settings import ServerSettings  # noqa: E402
from runner.stages.serve import ServerProcess  # noqa: E402

CONCURRENCY = 16
TARGET = 1.5
WORDS = ("the film plot acting music story ending cast script pacing camera was felt great wonderful lovely awful "
         "boring dull terrible clumsy charming brilliant and but quite very really a an of with").split()


def sentences(n: int, seed: int, words: tuple[int, int] = (8, 30)) -> list[str]:
    """Review-like sentences; varied lengths by default, so batches pay for padding as real traffic does."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(n)]


def build_artifact(folder: Path, dim: int, layers: int) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, PreTrainedTokenizerFast

    from runner.recipe.sections import Export
    from runner.stages.export import export_encoder

    source = folder / "model"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(sentences(2000, 0), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(source)
    config = DistilBertConfig(vocab_size=len(fast), dim=dim, hidden_dim=4 * dim, n_layers=layers, n_heads=max(1, dim // 64),
                              num_labels=2, id2label={0: "negative", 1: "positive"},
                              label2id={"negative": 0, "positive": 1}, pad_token_id=fast.pad_token_id)
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(source, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    artifact = folder / "onnx"
    export_encoder(model.eval(), fast, Export(), artifact)
    (artifact / "labels.json").write_text(json.dumps({"id2label": {"0": "negative", "1": "positive"},
                                                      "label2id": {"negative": 0, "positive": 1}}))
    (artifact / "params.txt").write_text(str(params))
    return artifact


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, like wrk or hey: httpx costs about a core's worth of CPU
    at these rates, and on a small machine that CPU would be taken from the server being measured."""

    def __init__(self, port: int, api_key: str) -> None:
        self.port, self.api_key = port, api_key

    async def __aenter__(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.writer.close()

    async def post(self, path: str, body: dict[str, Any]) -> int:
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        self.writer.write(head.encode() + data)
        headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:"))
        await self.reader.readexactly(length)
        return int(headers[0].split()[1])


async def load(server: ServerProcess, texts: list[str], requests: int, max_seconds: float) -> dict[str, Any]:
    """`requests` POST /predict (one text each) from CONCURRENCY connections, stopping early at `max_seconds`."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    async with Connection(server.port, server.api_key) as probe:
        for text in texts[:32]:  # warm-up: connections, ORT arenas for the larger shapes
            await probe.post("/predict", {"texts": [text]})
    before = batch_metrics(server)
    server_proc = psutil.Process(server.proc.pid)
    start, client_cpu, server_cpu = time.perf_counter(), time.process_time(), sum(server_proc.cpu_times()[:2])

    async def worker() -> None:
        nonlocal sent, errors
        async with Connection(server.port, server.api_key) as connection:
            while sent < requests and time.perf_counter() - start < max_seconds:
                text = texts[sent % len(texts)]
                sent += 1
                t0 = time.perf_counter()
                errors += await connection.post("/predict", {"texts": [text]}) != 200
                latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
    server_cpu = sum(server_proc.cpu_times()[:2]) - server_cpu
    texts_run, runs = (a - b for a, b in zip(batch_metrics(server), before, strict=True))
    quantiles = statistics.quantiles(latencies, n=20)
    return {"requests": len(latencies), "seconds": round(elapsed, 2), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 1), "p95_ms": round(quantiles[18], 1), "errors": errors,
            "mean_batch": round(texts_run / max(1, runs), 2), "client_cpu_share": round(client_cpu / elapsed, 2),
            "server_cores_used": round(server_cpu / elapsed, 2),
            "requests_per_cpu_s": round(len(latencies) / server_cpu, 1)}


def batch_metrics(server: ServerProcess) -> tuple[float, float]:
    """(texts, ORT runs) so far, from the server's batch-size histogram."""
    with server.client() as client:
        text = client.get("/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("serve_batch_size_")}
    return samples["serve_batch_size_sum"], samples["serve_batch_size_count"]


def inference_ceiling(artifact: Path, texts: list[str], rounds: int) -> dict[str, float]:
    """The most batching can give here, without HTTP: ms per text when CONCURRENCY threads each run one text at a time
    (what the server does without batching) against one thread running batches of CONCURRENCY texts. Same model,
    tokenization and session settings as the server (runner.serving.artifact); alternating rounds, medians."""
    from concurrent.futures import ThreadPoolExecutor

    from runner.serving.artifact import load_model

    model = load_model(artifact)
    work = texts[: 16 * CONCURRENCY]
    for text in work[:CONCURRENCY]:
        model.predict([text])

    def ms_per_text(run: Any) -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1000 / len(work)

    singles, batches = [], []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for _ in range(rounds):
            singles.append(ms_per_text(lambda: list(pool.map(lambda t: model.predict([t]), work))))
            batches.append(ms_per_text(
                lambda: [model.predict(work[i : i + CONCURRENCY]) for i in range(0, len(work), CONCURRENCY)]))
    single, batch = statistics.median(singles), statistics.median(batches)
    return {"concurrent_single_ms_per_text": round(single, 2), "batched_ms_per_text": round(batch, 2),
            "ratio": round(single / batch, 3)}


def quantize_dynamic_int8(artifact: Path) -> Path:
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = artifact.parent / "onnx-dynamic-int8"
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("model.onnx"))
    quantize_dynamic(artifact / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8)
    return out


def run_mode(artifact: Path, settings: ServerSettings, texts: list[str], args: argparse.Namespace, log: Path) -> dict:
    server = ServerProcess(artifact, settings, log)
    try:
        server.wait_ready(120)
        return asyncio.run(load(server, texts, args.requests, args.max_seconds))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_throughput.json"))
    parser.add_argument("--requests", type=int, default=300, help="Requests per mode and round.")
    parser.add_argument("--max-seconds", type=float, default=25, help="Cap on one mode's measurement.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=30)
    parser.add_argument("--dynamic-int8", action="store_true",
                        help="Serve the dynamic-int8 graph: per-request (invariant) against batched anyway.")
    parser.add_argument("--smoke", action="store_true", help="A tiny model, one round of 32 requests (seconds).")
    args = parser.parse_args()
    if args.smoke:
        args.dim, args.layers, args.rounds, args.requests, args.max_seconds = 64, 1, 1, 32, 10

    batched = ServerSettings(max_batch=CONCURRENCY, max_wait_ms=args.max_wait_ms, max_concurrency=64,
                             invariant=not args.dynamic_int8)
    modes = {"batching": batched, "no batching": ServerSettings(max_batch=1, max_concurrency=64)}
    texts = sentences(512, 1, (args.min_words, args.max_words))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        artifact = build_artifact(Path(tmp), args.dim, args.layers)
        params = int((artifact / "params.txt").read_text())
        if args.dynamic_int8:
            artifact = quantize_dynamic_int8(artifact)
        ceiling = inference_ceiling(artifact, texts, args.rounds)
        print(f"inference only: {ceiling}", file=sys.stderr)
        rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode, settings in (modes.items() if r % 2 == 0 else reversed(modes.items())):
                rounds[mode].append(run_mode(artifact, settings, texts, args, Path(tmp) / f"{mode}-{r}.log"))
                print(f"round {r + 1} {mode}: {rounds[mode][-1]}", file=sys.stderr)

    best = {mode: sorted(runs, key=lambda x: x["rps"])[len(runs) // 2] for mode, runs in rounds.items()}  # median
    ratio = best["batching"]["rps"] / best["no batching"]["rps"]
    cpu_ratio = best["batching"]["requests_per_cpu_s"] / best["no batching"]["requests_per_cpu_s"]
    graph = "dynamic int8" if args.dynamic_int8 else "fp32"
    print(f"\nDistilBERT-like classifier ({graph}), dim {args.dim}, {args.layers} layers, {params / 1e6:.1f}M parameters, "
          f"one text of {args.min_words}-{args.max_words} words per request, concurrency {CONCURRENCY}, median of {args.rounds} "
          f"rounds, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| mode | requests/s | p50 ms | p95 ms | texts per ORT run | server cores used | requests per server CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, row in best.items():
        print(f"| {mode} | {row['rps']} | {row['p50_ms']} | {row['p95_ms']} | {row['mean_batch']} | "
              f"{row['server_cores_used']} | {row['requests_per_cpu_s']} |")
    print(f"\nbatching / no batching: throughput **{ratio:.2f}** (target >= {TARGET}), "
          f"requests per server CPU-second {cpu_ratio:.2f}; errors: {sum(r['errors'] for r in best.values())}")
    print(f"ceiling without HTTP (ONNX Runtime alone, {CONCURRENCY} threads of single texts vs batches of "
          f"{CONCURRENCY}): {ceiling['concurrent_single_ms_per_text']} vs {ceiling['batched_ms_per_text']} ms per text, "
          f"**{ceiling['ratio']:.2f}**")
    try:
        from bench.common import machine_info

        machine: dict[str, Any] = machine_info()
    except ImportError:
        machine = {}
    result = {"benchmark": "serve_throughput", "graph": graph,
              "model": {"dim": args.dim, "layers": args.layers, "params": params},
              "concurrency": CONCURRENCY, "settings": {m: s.model_dump(exclude={"api_key"}) for m, s in modes.items()},
              "words": [args.min_words, args.max_words], "rounds": rounds, "median": best, "ratio": round(ratio, 3),
              "cpu_efficiency_ratio": round(cpu_ratio, 3),
              "inference_ceiling": ceiling, "target": TARGET, "passed": ratio >= TARGET,
              "load_average": [load_before[0], os.getloadavg()[0]], "machine": machine}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import figure

    figure("P5", "throughput with / without dynamic batching", ratio, f">= {TARGET}", ratio >= TARGET)


if __name__ == "__main__":
    main()
