"""Run the app with uvicorn: `serve()` in-process, or `python -m runner.serving` as its own process (the smoke stage).

The API key never goes on the command line (every local user can read it from `ps`): `--api-key-env VAR` names an
environment variable that holds it, and a named but empty variable stops the server instead of starting it unprotected.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from runner.serving.app import create_app
from runner.serving.settings import ServerSettings


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped, or in brackets) and `localhost`: addresses only this machine can reach. Other
    names are not resolved: a name that points at loopback today may not tomorrow."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def public_without_key(host: str, api_key: str | None, allowed: bool) -> str | None:
    """The refusal message when `host` exposes the server beyond this machine with no API key, unless `allowed`."""
    if api_key or allowed or is_loopback(host):
        return None
    return (f"--host {host} makes the server reachable from other machines, and no API key protects it: pass "
            "--api-key-env VAR (a variable holding the key), or --allow-public-without-key to serve it unprotected")


def serve(artifact_dir: Path, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          access_log: bool = False) -> None:
    """Serve until interrupted. Loopback by default: exposing a model is a decision, so `host` must be given for it."""
    app = create_app(Path(artifact_dir), settings or ServerSettings())
    # A short graceful shutdown: the smoke stage sends SIGTERM and only waits a few seconds before SIGKILL.
    uvicorn.run(app, host=host, port=port, access_log=access_log, timeout_graceful_shutdown=3, log_level="info")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runner.serving", description="Serve an ONNX artifact folder.")
    parser.add_argument("--artifact", type=Path, required=True, help="Folder with model.onnx, config.json, tokenizer.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", metavar="VAR", help="Environment variable holding the API key.")
    parser.add_argument("--allow-public-without-key", action="store_true",
                        help="Serve on a non-loopback --host without an API key (refused otherwise).")
    parser.add_argument("--access-log", action="store_true", help="Log every request (off: it costs throughput).")
    # One flag per setting, generated from the model, so the CLI cannot fall behind ServerSettings.
    for name, field in ServerSettings.model_fields.items():
        if name != "api_key":  # every other setting is an int, a float or a bool
            kind: Callable[[str], object] = (
                _boolean if field.annotation is bool else int if field.annotation is int else float
            )
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=field.description)
    return parser


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _exit_with_parent(parent: int) -> None:
    """The smoke stage starts this server in a session of its own so it can stop the whole group; if the stage's
    process dies without stopping it (kill -9), nothing else would: poll for the parent and leave when it is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if os.environ.get("RECIPE_SERVE_PARENT_PID", "").isdigit():
        _exit_with_parent(int(os.environ["RECIPE_SERVE_PARENT_PID"]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {name: getattr(args, name) for name in ServerSettings.model_fields if getattr(args, name, None) is not None}
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: the variable is unset or empty; not starting unprotected")
        values["api_key"] = key
    if refusal := public_without_key(args.host, values.get("api_key"), args.allow_public_without_key):
        raise SystemExit(refusal)
    serve(args.artifact, args.host, args.port, ServerSettings(**values), access_log=args.access_log)
