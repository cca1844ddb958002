"""Export stage: traced segments -> ONNX / TensorRT / AOTInductor engines + manifest.json."""
