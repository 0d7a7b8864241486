"""What a key is built from, shared by the planner (step keys) and the stages that memoize sub-results under keys of
their own (evaluate): one canonical JSON form, and the version of the distribution behind a package name."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any


def canonical(value: Any) -> str:
    """The one JSON form hashed into keys: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# A module that several distributions provide, the plain one first: CUDA envs install onnxruntime-gpu (and
# onnxruntime-genai-cuda), which provide the same `onnxruntime` module under another name.
ALTERNATIVES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime-genai-cuda"),
}


def package_version(name: str) -> str:
    """The version of the distribution that provides `name`'s module: "1.32.0" for the plain one (what keys have always
    held), "onnxruntime-gpu 1.31.1" for an alternative, so a CPU and a GPU build never share a key; "absent" for none."""
    found = []
    for candidate in ALTERNATIVES.get(name, (name,)):
        try:
            found.append((candidate, metadata.version(candidate)))
        except metadata.PackageNotFoundError:
            continue
    if not found:
        return "absent"
    if len(found) == 1 and found[0][0] == name:
        return found[0][1]
    # Both installed is a broken env (they overwrite each other's files); the key says so instead of guessing.
    return " + ".join(f"{candidate} {version}" for candidate, version in found)
