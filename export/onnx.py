"""ONNX export of one segment (torch.onnx.export, dynamo) with the RopeSP custom node; check and inspect.

The `pre` segment's RoPE becomes ONE `ropesp.RopeSP` node (plugins/rope_sp_onnx.py) whose per-rank
attributes (grid, first_token) are static and whose `start_frame` is a graph input. Weights are graph
inputs (export/segments.py), so the files hold only small constants; external data is written anyway
when the initializers pass protobuf's 2 GB limit. Every file is checked with onnx.checker and summarized
with polygraphy for the build log. onnx, onnxscript and polygraphy are imported only here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ropesp.errors import BackendUnavailableError, EngineError

OPSET = 22  # bf16 Conv needs >= 22; RMSNorm and SDPA stay primitive ops (no opset-23 Attention)
PROTOBUF_LIMIT = 2**31 - 1


def _require():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise BackendUnavailableError(
            f"ONNX export needs onnx and onnxscript ({e}): pip install 'ropesp[onnx]'"
        ) from e
    return onnx


def export_segment(module, example: tuple, spec, path: Path, *, aot_plugin: bool = True) -> list[Path]:
    """Export `module(*example)` to path; returns the files written (the .onnx and any external data).

    spec: the segment's SegmentSpec (input/output names); aot_plugin: the RopeSP node's `aot` attribute
    (TensorRT: Triton PTX in the engine (1) or the Python JIT plugin (0)).
    """
    onnx = _require()
    from ropesp.plugins.rope_sp_onnx import translation_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prog = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            custom_translation_table=translation_table(aot=aot_plugin),
            verbose=False,
        )
    size = sum(
        v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(path), external_data=size > PROTOBUF_LIMIT)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in proto.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    _check_io(proto, spec, path)
    return [path, *(path.parent / loc for loc in sorted(locations))]


def _check_io(proto, spec, path: Path) -> None:
    """The graph has the spec's inputs in order, and `pre` holds the RopeSP node fed by start_frame."""
    names = [i.name for i in proto.graph.input]
    want = [t.name for t in spec.inputs]
    if names != want:
        raise EngineError(f"{path}: graph inputs {names} differ from the segment's {want}")
    if any(t.name == "start_frame" for t in spec.inputs):
        ropes = [n for n in proto.graph.node if n.op_type == "RopeSP" and n.domain == "ropesp"]
        if not ropes or any(n.input[1] != "start_frame" for n in ropes):
            raise EngineError(f"{path}: expected ropesp.RopeSP nodes fed by the start_frame input")


def check(path: Path) -> None:
    """onnx.checker on the file (by path, so external data over 2 GB works)."""
    onnx = _require()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EngineError(f"{path} fails onnx.checker: {exc}") from None


def summary(path: Path) -> str:
    """Polygraphy's inspection of the graph (inputs, outputs, node count) for the build log."""
    try:
        from polygraphy.backend.onnx import util as onnx_util
        from polygraphy.backend.onnx.loader import onnx_from_path
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return f"{path.name}: (polygraphy not installed: no inspection)"
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        model = onnx_from_path(str(path), ignore_external_data=True)
        return onnx_util.str_from_onnx(model, show_layers=False)
