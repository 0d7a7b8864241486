"""runner/genai.py's list of architectures the causal-LM exporter supports, against the installed builder itself."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from runner.genai import SUPPORTED_ARCHITECTURES, unsupported_architecture


def builder_dispatch() -> set[str]:
    """The architectures onnxruntime-genai's model builder dispatches on (`config.architectures[0] == "..."`), read from
    the installed builder.py's source (importing it would load every model class it knows)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    assert spec and spec.submodule_search_locations, "onnxruntime-genai is not installed"
    source = (Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py").read_text()
    return set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source))


def test_every_supported_architecture_is_one_the_installed_builder_dispatches_on():
    dispatched = builder_dispatch()
    assert "LlamaForCausalLM" in dispatched  # the parser found the dispatch
    assert sorted(set(SUPPORTED_ARCHITECTURES) - dispatched) == []


def test_an_architecture_the_builder_lacks_is_refused_with_the_list():
    assert unsupported_architecture("LlamaForCausalLM") is None
    message = unsupported_architecture("BertForMaskedLM")
    assert message and "does not support the architecture BertForMaskedLM" in message and "LlamaForCausalLM" in message
