"""`ropesp::rope_sp` as ONE ONNX node, and that node run by ONNX Runtime on the CPU.

Node format (what `torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table())`
writes for every call of the op; the model's opset_import gains ("ropesp", 1)):

    y = ropesp.RopeSP(x, start_frame)
        x: [B, L, H, D] float/float16/bfloat16, start_frame: int32 [1] (a graph input), y: like x
        INT   frames, rows, cols       the chunk's latent grid
        INT   first_token              this rank's first token index in the chunk
        FLOAT theta                    rotary base (an fp32 attribute: keep it exactly representable)
        INT   t_dim, h_dim, w_dim      head_dim split, = head_dim_split(D); consumers check it
        STRING plugin_namespace "ropesp", INT aot 1|0
                                       TensorRT's ONNX parser: plugin lookup (namespace::op_type) and
                                       AOT (Triton PTX in the engine) vs JIT (Python) plugin choice

ONNX Runtime: onnxruntime-extensions Python ops only match the domain `ai.onnx.contrib`, so
`ort_session` loads a copy with the RopeSP nodes moved there and registers a Python op whose compute
is `rope_sp_ref` (float32 only).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ropesp.plugins.rope_sp import head_dim_split, rope_sp_ref

DOMAIN = "ropesp"
OP_TYPE = "RopeSP"
ORT_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions Python ops are registered in
INT_ATTRS = ("frames", "rows", "cols", "first_token", "t_dim", "h_dim", "w_dim")


@functools.cache
def _onnx_op():
    """The onnxscript Op for ropesp.RopeSP, with a schema so the exporter's tracer can record it."""
    import onnxscript
    from onnx.defs import OpSchema

    attr = OpSchema.Attribute
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        "Causal-RoPE SP (plugins/rope_sp.py)",
        inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("start_frame", "tensor(int32)")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "x's dtype")],
        attributes=[
            *(attr(name, OpSchema.AttrType.INT, name) for name in (*INT_ATTRS, "aot")),
            attr("theta", OpSchema.AttrType.FLOAT, "rotary base"),
            attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
        ],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_TYPE, schema)


def rope_sp_onnx(
    x, start_frame, frames: int, rows: int, cols: int, first_token: int, theta: float, *, aot: bool
):
    """Translation of one `ropesp.rope_sp` call (traced by the dynamo exporter; x carries its static shape)."""
    head_dim = x.shape[-1]
    if not isinstance(head_dim, int):
        raise ValueError(f"rope_sp export: head_dim must be static, got {head_dim!r}")
    t_dim, h_dim, w_dim = head_dim_split(head_dim)
    return _onnx_op()(
        x, start_frame, frames=frames, rows=rows, cols=cols, first_token=first_token, theta=float(theta),
        t_dim=t_dim, h_dim=h_dim, w_dim=w_dim, plugin_namespace=DOMAIN, aot=int(aot),
    )  # fmt: skip


def translation_table(aot: bool = True) -> dict:
    """`custom_translation_table` for torch.onnx.export(dynamo=True); aot picks the TensorRT plugin form."""
    import ropesp.plugins.rope_sp  # noqa: F401  (registers torch.ops.ropesp.rope_sp)

    def rope_sp(x, start_frame, frames: int, rows: int, cols: int, first_token: int, theta: float):
        return rope_sp_onnx(x, start_frame, frames, rows, cols, first_token, theta, aot=aot)

    return {torch.ops.ropesp.rope_sp.default: rope_sp}


def check_nodes(model) -> None:
    """Raise ValueError for a RopeSP node that ONNX Runtime would run wrongly: missing attributes, a split
    that does not match x's head_dim, x not float32 [B, L, H, D] (where the graph records x's type).

    Done before the session exists because an exception inside an onnxruntime-extensions Python op
    aborts the whole process.
    """
    import onnx

    known = {v.name: v.type.tensor_type for v in (*model.graph.input, *model.graph.value_info)}
    for node in model.graph.node:
        if node.op_type != OP_TYPE or node.domain not in (DOMAIN, ORT_DOMAIN):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        missing = sorted({*INT_ATTRS, "theta"} - attrs.keys())
        if missing:
            raise ValueError(f"RopeSP node {node.name!r} lacks attributes {missing}")
        x = known.get(node.input[0])
        if x is None:
            continue
        if x.elem_type != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(x.elem_type)
            raise ValueError(
                f"RopeSP node {node.name!r}: x is {name}; ONNX Runtime runs RopeSP in FLOAT only"
            )
        dims = [d.dim_value if d.HasField("dim_value") else None for d in x.shape.dim]
        if len(dims) != 4:
            raise ValueError(f"RopeSP node {node.name!r}: x must be [B, L, H, D], has {len(dims)} dims")
        split = (attrs["t_dim"], attrs["h_dim"], attrs["w_dim"])
        if dims[3] is not None and split != head_dim_split(dims[3]):
            raise ValueError(
                f"RopeSP node {node.name!r}: split {split} does not match head_dim {dims[3]} "
                f"(expected {head_dim_split(dims[3])})"
            )


def _rope_sp_ort(x, start_frame, **attrs):
    """ORT compute: numpy in, numpy out, through the same torch reference as the op's CPU kernel.

    Anything raised here terminates the process (onnxruntime-extensions), hence `check_nodes` first.
    """
    split = (attrs["t_dim"], attrs["h_dim"], attrs["w_dim"])
    if split != head_dim_split(x.shape[-1]):
        raise ValueError(
            f"RopeSP: split {split} does not match head_dim {x.shape[-1]}: {head_dim_split(x.shape[-1])}"
        )
    grid = (attrs["frames"], attrs["rows"], attrs["cols"])
    y = rope_sp_ref(
        torch.from_numpy(x), torch.from_numpy(start_frame), *grid, attrs["first_token"], attrs["theta"]
    )
    return y.numpy()


@functools.cache
def _register_ort_op() -> str:
    """Register RopeSP as an onnxruntime-extensions Python op (once); returns the extensions library path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as e:
        from ropesp.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "ONNX Runtime runs RopeSP through onnxruntime-extensions, which is not installed: "
            "pip install 'ropesp[onnx]'"
        ) from e
    # attribute types onnxruntime-extensions supports: dt_int64, dt_float, dt_string
    attrs = {name: PyCustomOpDef.dt_int64 for name in INT_ATTRS} | {"theta": PyCustomOpDef.dt_float}
    onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32],
        outputs=[PyCustomOpDef.dt_float],
        attrs=attrs,
    )(_rope_sp_ort)
    return get_library_path()


def to_ort_domain(model):
    """Copy of an onnx.ModelProto with RopeSP nodes (graph and local functions) in `ai.onnx.contrib`."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for nodes in (out.graph.node, *(f.node for f in out.functions)):
        for node in nodes:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                node.domain = ORT_DOMAIN
    opsets = {o.domain: o.version for o in out.opset_import if o.domain != DOMAIN}
    opsets.setdefault(ORT_DOMAIN, 1)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    return out


def ort_session(model, providers=("CPUExecutionProvider",), session_options=None):
    """onnxruntime.InferenceSession for a model with RopeSP nodes: a path (its external data is read where
    it lies; the file is never modified) or an in-memory onnx.ModelProto (under protobuf's 2 GB).
    """
    import onnx
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    check_nodes(proto)
    so = session_options or ort.SessionOptions()
    so.register_custom_ops_library(_register_ort_op())
    if not isinstance(model, onnx.ModelProto):  # the copy stays in memory, external data is read in place
        folder = str(Path(model).parent.resolve())
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return ort.InferenceSession(to_ort_domain(proto).SerializeToString(), so, providers=list(providers))
