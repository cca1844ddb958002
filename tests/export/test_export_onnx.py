"""`ropesp build --backend onnx`: the graphs hold the RopeSP node and the start_frame input, and
`ropesp generate --backend ort` equals the eager latents for world sizes 1 and 2."""

from __future__ import annotations

import onnx
import pytest
import torch
from engine_builds import FRAMES, GRID, run_generate

from ropesp.manifest import Manifest
from ropesp.runtime.pipeline import resolve

ATOL = 1e-4


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("world_size", [1, 2])
def test_onnx_graphs_hold_rope_sp_node_and_start_frame_input(builds, world_size):
    root = builds("onnx", world_size)
    manifest = Manifest.load(root)
    assert manifest.backend == "onnx" and manifest.world_size == world_size
    assert {s.name for s in manifest.segments} == {"embed", "pre", "post", "head"}
    for rank in range(world_size):
        files = manifest.rank_files(rank)
        assert set(files.files) == {"embed", "pre", "post", "head"}
        pre = onnx.load(root / files.files["pre"])
        onnx.checker.check_model(pre)
        inputs = {i.name: i.type.tensor_type for i in pre.graph.input}
        assert inputs["start_frame"].elem_type == onnx.TensorProto.INT32
        assert [d.dim_value for d in inputs["start_frame"].shape.dim] == [1]
        ropes = [n for n in pre.graph.node if n.op_type == "RopeSP"]
        assert len(ropes) == 2  # q and k
        for node in ropes:
            assert node.domain == "ropesp" and node.input[1] == "start_frame"
            attrs = _attrs(node)
            assert (attrs["frames"], attrs["rows"], attrs["cols"]) == (3, 5, 7)
            assert attrs["first_token"] == files.first_token["3"] == rank * (-(-105 // world_size))
        # weights are graph inputs: one pre/post graph serves every layer
        assert "self_attn.q.weight" in inputs and not any(i.dims == [192, 192] for i in pre.graph.initializer)
        for name in ("embed", "post", "head"):
            graph = onnx.load(root / files.files[name]).graph
            assert not [n for n in graph.node if n.op_type == "RopeSP"]
    assert (root / "build.log").read_text().count("ONNX Opset") >= 4  # polygraphy summaries


@pytest.mark.parametrize("world_size", [1, 2])
def test_generate_ort_equals_eager(builds, eager_latents, world_size, tmp_path):
    root = builds("onnx", world_size)
    latents = run_generate(
        tmp_path, "--engines", str(root), "--backend", "ort", "--world-size", str(world_size)
    )
    assert latents.shape == eager_latents.shape
    torch.testing.assert_close(latents, eager_latents, rtol=0, atol=ATOL)


def test_hybrid_ulysses_ring_layout_runs_on_the_same_engines(builds, eager_latents, tmp_path):
    """Segments hold all heads of a rank's tokens: world size 4 built once serves U=2 x R=2 (ring
    attention over token-sharded caches) as well as pure Ulysses."""
    root = builds("onnx", 4)
    latents = run_generate(tmp_path, "--engines", str(root), "--ring-degree", "2")
    torch.testing.assert_close(latents, eager_latents, rtol=0, atol=ATOL)


def test_ort_rolling_window_runtime_owned_cache(builds, tmp_path):
    """The cache lives in the runtime: engines built for a 6-frame video run a 9-frame rolling stream."""
    rolling = ["--latent-frames", "9", "--local-attn-frames", "4", "--sink-frames", "1"]
    eager = run_generate(
        tmp_path, "--preset", "tiny", *GRID, *rolling, "--device", "cpu", "--dtype", "float32"
    )
    ort = run_generate(tmp_path, "--engines", str(builds("onnx", 1)), *rolling)
    assert ort.shape[1] == 9
    torch.testing.assert_close(ort, eager, rtol=0, atol=ATOL)


def test_engine_defaults_come_from_the_manifest(builds):
    from ropesp.settings import RunConfig

    res = resolve(RunConfig.of(engines=str(builds("onnx", 2))))
    assert (res.backend, res.world_size, res.device, res.dtype) == ("ort", 2, "cpu", torch.float32)
    assert (res.geometry.latent_height, res.geometry.latent_width, res.latent_frames) == (10, 14, 6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "aoti"], "holds onnx artifacts, which --backend aoti cannot run; use --backend ort"),
        (["--latent-height", "12"], "built for latents 10x14; this run asks for 12x14"),
        (["--chunk-frames", "2"], "built for chunks of [3] latent frames; this run needs [2]"),
        (["--independent-first-frame", "--latent-frames", "7"], "this run needs [1, 3]"),
        (["--sp-rope", "allgather"], "eager-only baseline"),
    ],
)
def test_generate_refuses_runs_the_engines_were_not_built_for(builds, tmp_path, capsys, args, message):
    from ropesp.cli import main

    base = ["generate", "--engines", str(builds("onnx", 1)), "--output", str(tmp_path / "v.mp4")]
    assert main([*base, *FRAMES, *args]) == 2
    assert message in capsys.readouterr().err
