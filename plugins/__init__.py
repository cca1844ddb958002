"""The Causal-RoPE SP operator in every form the pipeline needs (torch op, kernel, ONNX, TensorRT)."""
