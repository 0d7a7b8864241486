"""The recipe runner: one YAML recipe from data to a served, quantized ONNX model."""

__version__ = "0.1.0"
