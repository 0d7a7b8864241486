"""Names that several modules spell: the recipe's task values, the schema's field markers, quantize method families.

One definition each, so a rename is one edit and grep finds every use. Nothing is imported here: the server, the recipe
language and the stages all read it.
"""

from __future__ import annotations

# model.task: what the model predicts (the recipe's Literal in runner/recipe/sections.py lists the same two)
CLASSIFIER = "sequence-classification"
CAUSAL_LM = "causal-lm"

# JSON-schema markers on recipe fields (json_schema_extra); plan.py, load.py and docs.py read them back
X_NEUTRAL = "x-neutral"  # the field does not change any result: left out of cache keys
X_LOCAL_PATH = "x-local-path"  # a local path: made absolute at load time and checked to exist
X_PACKAGE_FOLDER = "x-package-folder"  # a folder inside an installed package: keyed by version and content

# quantize.method: the methods that produce an ONNX graph start with this (the others are bitsandbytes)
ONNX_METHOD_PREFIX = "onnx-"


def is_onnx_method(method: str) -> bool:
    """True for quantize methods that write an ONNX graph (onnx-dynamic-int8, onnx-static-int8, onnx-weight-only)."""
    return method.startswith(ONNX_METHOD_PREFIX)
