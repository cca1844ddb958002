"""Engines built from a preset hold exactly the parameters the runtime draws for that preset."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from ropesp.export.manifest import Manifest
from ropesp.runtime.pipeline import PipelineConfig, load_model


def test_preset_build_and_run_hold_identical_state(builds):
    root = builds("onnx", 1)
    manifest = Manifest.load(root)
    built = load_file(str(root / manifest.weights))
    res = PipelineConfig(preset="tiny", device="cpu", dtype="float32").resolve()
    run = load_model(res.request.source, res.model, res.dtype, torch.device("cpu")).state_dict()
    assert sorted(built) == sorted(run)
    for name, tensor in run.items():
        assert torch.equal(built[name], tensor), name
