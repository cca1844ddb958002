"""TensorRT engine of one segment: ONNX (export/onnx.py) -> strongly typed network -> serialized engine.

Written against TensorRT 11.x (docs/TENSORRT.md), keeping 10.16+ working:
- the RopeSP node resolves to the Quickly-Deployable Plugin "ropesp::RopeSP" (plugins/rope_sp_trt.py),
  registered before parsing; the network prefers AOT Python plugins and the node carries `aot=1`, so the
  Triton kernel is compiled to PTX and embedded: engines need no Python at run time;
- strongly typed network (mandatory in 11.x, a creation flag in 10.x): precision comes from the ONNX
  graph's dtypes (the segment is exported in bf16/fp16), so no FP16/BF16 builder flags;
- optimization profiles only for inputs with dims that vary (SegmentSpec.dynamic); every current segment
  has static shapes per chunk length, which also suits CUDA graphs and avoids TensorRT#4849.
`import tensorrt` happens in `require()`; without TensorRT every entry point raises BackendUnavailableError.
"""

from __future__ import annotations

from pathlib import Path

from ropesp.errors import BackendUnavailableError, EngineError

MIN_VERSION = (10, 16)


def require():
    """The tensorrt module, or BackendUnavailableError that says what is missing."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the Python frontend is there, libnvinfer is not
        raise BackendUnavailableError(
            f"TensorRT is not installed here ({type(e).__name__}: {e}). `--backend tensorrt` needs TensorRT "
            ">= 10.16 (python bindings + libnvinfer) on a CUDA machine; use --backend aoti (or onnx) instead"
        ) from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is too old; ropesp needs >= {'.'.join(map(str, MIN_VERSION))}"
        )
    return trt


def version() -> str:
    return require().__version__


def build_engine(onnx_path: Path, engine_path: Path, spec, *, workspace_bytes: int | None = None) -> Path:
    """Parse onnx_path, build and serialize the engine to engine_path. spec: the SegmentSpec."""
    trt = require()
    from ropesp.plugins.rope_sp_trt import register_trt_plugin

    register_trt_plugin()  # "ropesp::RopeSP" must be in the registry before parsing
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = trt.NetworkDefinitionCreationFlag
    flags = 1 << int(flag.PREFER_AOT_PYTHON_PLUGINS)
    if hasattr(flag, "STRONGLY_TYPED"):  # 10.x; 11.x networks are always strongly typed
        flags |= 1 << int(flag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    dynamic = [t for t in spec.inputs if t.dynamic]
    if dynamic:
        profile = builder.create_optimization_profile()
        for t in dynamic:
            lo, opt, hi = (list(t.shape) for _ in range(3))
            for dim, (a, b, c) in t.dynamic.items():
                lo[int(dim)], opt[int(dim)], hi[int(dim)] = a, b, c
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(blob))
    return engine_path
