"""Server settings: every limit the server enforces, in one validated model (also the CLI flags of `python -m runner.serving`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServerSettings(BaseModel):
    """Limits and tuning of one server. Defaults suit a CPU box serving one small model."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body; larger -> 413.")
    max_batch_size: int = Field(
        64, gt=0, description="Most texts in one /predict request; more -> 422. A request limit, not dynamic batching "
        "(that is `max_batch`; a recipe's `serve.max_batch_size` sets `max_batch`).",
    )
    max_input_chars: int = Field(10_000, gt=0, description="Longest text or prompt in characters; longer -> 422.")
    max_new_tokens: int = Field(256, gt=0, description="Most tokens one /generate request may ask for; more -> 422.")
    max_concurrency: int = Field(32, gt=0, description="Requests in flight at once (health/ready/metrics aside); more -> 429.")
    timeout_s: float = Field(30.0, gt=0, description="Longest time one inference request may take; longer -> 504.")
    max_batch: int = Field(
        16, ge=0, description="Dynamic batching: most texts merged into one ONNX Runtime run (0 or 1 disables batching)."
    )
    max_wait_ms: float = Field(5.0, ge=0, description="Dynamic batching: longest wait for more requests to fill a batch.")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: ONNX Runtime picks).")
    invariant: bool = Field(
        True, description="A text's answer never depends on the other requests: a graph that is not batch-invariant "
        "(dynamic int8) runs each text alone instead of batching. False batches it anyway (more throughput on some "
        "machines, answers that move with their neighbours).",
    )
    # repr=False: the key must never show up in a log line or a traceback that prints the settings.
    api_key: str | None = Field(
        None, min_length=1, repr=False, description="When set, every route but /health needs `Authorization: Bearer <key>`."
    )

    @property
    def batching(self) -> bool:
        return self.max_batch > 1
