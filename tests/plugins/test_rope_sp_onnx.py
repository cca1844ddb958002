"""ropesp.rope_sp -> one ONNX node `ropesp::RopeSP`, run by ONNX Runtime through the Python custom op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ropesp.plugins.rope_sp import head_dim_split
from ropesp.plugins.rope_sp_onnx import ort_session, to_ort_domain, translation_table

GRID, FIRST, THETA = (2, 3, 5), 7, 10000.0
HEADS, HEAD_DIM = 3, 24


class _QK(torch.nn.Module):
    """A projection feeding the op, so the node sits inside a graph with initializers."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, HEAD_DIM))

    def forward(self, x: torch.Tensor, start_frame: torch.Tensor) -> torch.Tensor:
        return torch.ops.ropesp.rope_sp(x * self.scale, start_frame, *GRID, FIRST, THETA) - x


def _inputs(length: int, start: int):
    x = torch.randn(1, length, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(length))
    return x, torch.tensor([start], dtype=torch.int32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model exported once (dynamic L), saved with external data."""
    module = _QK().eval()
    length = torch.export.Dim("L", min=1, max=64)
    prog = torch.onnx.export(
        module, _inputs(30, 0), dynamo=True, opset_version=18, input_names=["x", "start_frame"],
        output_names=["y"], dynamic_shapes={"x": {1: length}, "start_frame": None},
        custom_translation_table=translation_table(), verbose=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("onnx") / "rank0.onnx"
    prog.save(str(path), external_data=True)
    return module, path


def _rope_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == "RopeSP"]


def test_rope_sp_onnx_one_custom_node(exported):
    _, path = exported
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    (node,) = _rope_nodes(model)
    assert node.domain == "ropesp"
    assert ("ropesp", 1) in [(o.domain, o.version) for o in model.opset_import]
    assert node.input[1] == "start_frame" and "start_frame" in [i.name for i in model.graph.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    t_dim, h_dim, w_dim = head_dim_split(HEAD_DIM)
    assert attrs == {
        "frames": GRID[0], "rows": GRID[1], "cols": GRID[2], "first_token": FIRST, "theta": THETA,
        "t_dim": t_dim, "h_dim": h_dim, "w_dim": w_dim, "plugin_namespace": b"ropesp", "aot": 1,
    }  # fmt: skip
    assert [a.type for a in node.attribute if a.name == "theta"] == [onnx.AttributeProto.FLOAT]


def test_rope_sp_onnx_jit_flag():
    prog = torch.onnx.export(
        _QK().eval(), _inputs(30, 0), dynamo=True, opset_version=18,
        custom_translation_table=translation_table(aot=False), verbose=False,
    )  # fmt: skip
    (node,) = _rope_nodes(prog.model_proto)
    assert {a.name: a.i for a in node.attribute if a.name == "aot"} == {"aot": 0}


@pytest.mark.parametrize("length, start", [(30, 0), (30, 11), (17, 400)])
def test_rope_sp_ort_matches_torch(exported, length, start):
    module, path = exported
    session = ort_session(path)  # external data read in place, file untouched
    x, start_frame = _inputs(length, start)
    (y,) = session.run(None, {"x": x.numpy(), "start_frame": start_frame.numpy()})
    with torch.no_grad():
        expected = module(x, start_frame).numpy()
    np.testing.assert_allclose(y, expected, atol=1e-6, rtol=0)
    assert _rope_nodes(onnx.load(path, load_external_data=False))[0].domain == "ropesp"


def test_rope_sp_ort_from_model_proto(exported):
    module, path = exported
    x, start_frame = _inputs(30, 5)
    (y,) = ort_session(onnx.load(path)).run(None, {"x": x.numpy(), "start_frame": start_frame.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x, start_frame).numpy(), atol=1e-6, rtol=0)


def test_rope_sp_ort_domain_rewrite(exported):
    model = onnx.load(exported[1], load_external_data=False)
    ort_model = to_ort_domain(model)
    assert [n.domain for n in _rope_nodes(ort_model)] == ["ai.onnx.contrib"]
    domains = {o.domain for o in ort_model.opset_import}
    assert "ai.onnx.contrib" in domains and "ropesp" not in domains
    assert _rope_nodes(model)[0].domain == "ropesp", "the input model must stay unchanged"


def test_rope_sp_ort_rejects_wrong_split_before_running(exported):
    model = onnx.load(exported[1])
    (node,) = _rope_nodes(model)
    next(a for a in node.attribute if a.name == "t_dim").i += 2
    with pytest.raises(ValueError, match="does not match head_dim 24"):
        ort_session(model)


def test_rope_sp_ort_rejects_non_float32(exported):
    model = onnx.load(exported[1])
    (node,) = _rope_nodes(model)
    x_type = next(v for v in (*model.graph.input, *model.graph.value_info) if v.name == node.input[0])
    x_type.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(ValueError, match="FLOAT16"):
        ort_session(model)
