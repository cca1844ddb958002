"""Engines built from a preset hold exactly the parameters the runtime draws for that preset."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from ropesp.manifest import Manifest
from ropesp.runtime.pipeline import load_model, resolve
from ropesp.settings import RunConfig


def test_preset_build_and_run_hold_identical_state(builds):
    root = builds("onnx", 1)
    manifest = Manifest.load(root)
    built = load_file(str(root / manifest.weights))
    res = resolve(RunConfig.of(preset="tiny", device="cpu", dtype="float32"))
    run = load_model(res.config.source, res.model, res.dtype, torch.device("cpu")).state_dict()
    assert sorted(built) == sorted(run)
    for name, tensor in run.items():
        assert torch.equal(built[name], tensor), name
