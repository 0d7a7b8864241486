"""Secrets out of every byte the runner writes to a log: the values of the token variables and anything shaped like a
secret become `***`: a Hugging Face token (`hf_` and 20+ letters or digits), an AWS access key id (`AKIA`/`ASIA`... and
16 capitals or digits), the password in a URL (`s3://user:PASSWORD@host`), and the signature, credential or token
parameters of a signed URL (`?X-Amz-Signature=...`, an Azure SAS `sig=...`).

    redact(text)                 a message (a step's error in run.json, a log record)
    RedactedFile(path)           a pipe whose bytes reach `path` redacted: give its `fd` to a child process as stdout and
                                 stderr, or dup2 it over fds 1 and 2 (what the executor does for a step's whole output)
    python -S -m runner.redact PATH    the process at the far end of that pipe

The far end is a process of its own, not a thread: a thread needs the GIL to drain the pipe, and a native library that
writes more than a pipe's capacity while its caller holds the GIL (ONNX Runtime's warnings over thousands of
initializers) would block forever. A process also outlives a `kill -9` of the runner: it keeps writing until the last
child holding the pipe (a torchrun worker) is gone, so a log never ends in the middle of what was already printed.
Standard library only, run with `-S`: it starts in tens of milliseconds, once per executed step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# Environment variables whose values are secrets: a library error may quote them (some HTTP errors quote headers).
# The object stores' too: a remote cache's credentials come from the store's standard chain (runner.store.remote).
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "RECIPE_API_KEY", "RUNNER_SERVE_API_KEY",
                    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
                    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
                    "AZURE_CLIENT_SECRET")
# Shapes, each with what it keeps (group 1) before the mask: a token alone, or the name that says what follows.
_SHAPES = (
    r"()(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}",
    r"()(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AIDA|AROA|AGPA|ANPA|ANVA|APKA|ASCA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])",
    r"([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)",  # the password of scheme://user:password@host
    r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|sig|token|access_token"
    r"|x-goog-signature|x-goog-credential)=)[^&\s\"'<>]+",
)
MASK = b"***"
# Bytes held back when a line grows without ending (a progress bar): more than any secret, so none is ever cut in two.
HOLD = 4096
# Applied one after another: a key id inside a URL's user part goes too.
TOKEN_PATTERNS = [(re.compile(shape), re.compile(shape.encode())) for shape in _SHAPES]


def _keep(match: re.Match) -> str:
    return (match.group(1) or "") + "***"


def _keep_bytes(match: re.Match) -> bytes:
    return (match.group(1) or b"") + MASK


def secret_values(environ: Mapping[str, str] | None = None) -> list[bytes]:
    environ = os.environ if environ is None else environ
    values = {environ.get(name, "").encode("utf-8", "surrogateescape") for name in SECRET_VARIABLES}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)  # longest first: no partial leftovers


def redact_bytes(data: bytes, values: list[bytes]) -> bytes:
    for value in values:
        data = data.replace(value, MASK)
    for _, pattern in TOKEN_PATTERNS:
        data = pattern.sub(_keep_bytes, data)
    return data


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value.decode("utf-8", "surrogateescape"), "***")
    for pattern, _ in TOKEN_PATTERNS:
        text = pattern.sub(_keep, text)
    return text


class LineRedactor:
    """Redacts a byte stream that arrives in arbitrary chunks: only whole lines (ended by \\n or \\r) go out, so a
    secret split across two reads is still seen whole."""

    def __init__(self, write: Callable[[bytes], object], values: list[bytes]) -> None:
        self.write_out, self.values, self.pending = write, values, b""
        self.hold = max([HOLD, *(2 * len(v) for v in values)])

    def write(self, chunk: bytes) -> None:
        data = self.pending + chunk
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if end == 0 and len(data) > 4 * self.hold:  # no line end in sight: let all but the held-back tail go
            end = self._safe_cut(data, len(data) - self.hold)
        self.pending = data[end:]
        if end:
            self.write_out(redact_bytes(data[:end], self.values))

    def _safe_cut(self, data: bytes, cut: int) -> int:
        """A cut at or before `cut` that splits no secret: not inside a run of token characters (an `hf_...` token is
        one such run), and not after the start of a secret value whose rest has not arrived yet."""
        start = cut
        while start > 0 and (data[start - 1 : start].isalnum() or data[start - 1 : start] == b"_"):
            start -= 1
        if start > 0:  # a run reaching back to the very start is no token that fits the held-back tail anyway
            cut = start
        for value in self.values:
            for length in range(min(len(value) - 1, cut), 0, -1):
                if data[cut - length : cut] == value[:length]:
                    cut -= length
                    break
        return cut

    def close(self) -> None:
        if self.pending:
            self.write_out(redact_bytes(self.pending, self.values))
            self.pending = b""


class RedactedFile:
    """A pipe into `python -m runner.redact PATH` (appending to PATH). Write to `fd` (or hand it to children); `close()`
    closes this end and waits until every byte is in the file (False when a child still holds the pipe open)."""

    def __init__(self, path: Path, environ: Mapping[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        root = str(Path(__file__).resolve().parent.parent)  # `runner` importable without site-packages (-S)
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))
        read, self.fd = os.pipe()
        try:
            # Its own session: a Ctrl-C meant for the runner must not stop the log before the runner's last words.
            self.process = subprocess.Popen([sys.executable, "-S", "-m", "runner.redact", str(path)], stdin=read,
                                            stdout=subprocess.DEVNULL, env=environ, start_new_session=True)
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(read)

    def close(self, timeout_s: float = 30) -> bool:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False  # it goes on writing until the child that holds the pipe exits
        return True


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stop at end of input only, whoever gets a Ctrl-C
    with open(argv[0], "ab", buffering=0) as out:
        stream = LineRedactor(out.write, secret_values())
        while chunk := os.read(0, 1 << 16):
            stream.write(chunk)
        stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
