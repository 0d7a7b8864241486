"""The model server: FastAPI over ONNX Runtime for an exported (or quantized) artifact folder.

    create_app(artifact_dir, settings) -> FastAPI     the app (tests drive it with TestClient)
    serve(artifact_dir, host, port, settings)         run it with uvicorn (loopback by default)
    python -m runner.serving --artifact DIR --port N  the same as its own process (used by the smoke-serve stage)
    predict_offline / generate_offline                the same answers computed in-process, to check the server against

Routes: GET /health, /ready, /info, /metrics, /docs, /openapi.json; POST /predict (classifiers) or /generate (causal LMs).
"""

from runner.serving.app import create_app
from runner.serving.artifact import ArtifactInfo, generate_offline, load_model, predict_offline
from runner.serving.server import serve
from runner.serving.settings import ServerSettings

__all__ = ["ArtifactInfo", "ServerSettings", "create_app", "generate_offline", "load_model", "predict_offline", "serve"]
