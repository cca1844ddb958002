"""The build and run configs share their sub-configs, their codec and their model resolution."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from ropesp.config import (
    CacheConfig,
    ComputeConfig,
    ModelSource,
    ParallelConfig,
    SamplerConfig,
    VideoConfig,
    preset,
)
from ropesp.errors import ConfigError, python_names
from ropesp.export.build import BuildConfig
from ropesp.model.checkpoint import resolve_model, save_checkpoint
from ropesp.model.wan import random_model
from ropesp.runtime.pipeline import PipelineConfig

FLAT_KEYS = {
    *("checkpoint", "model_config", "preset", "engines"),
    *("latent_height", "latent_width", "max_frames", "local_attn_frames", "sink_frames"),
    *("world_size", "ulysses_degree", "ring_degree", "sp_rope", "sp_comm"),
    *("backend", "dtype", "device", "precision", "attention"),
    *("sampler", "latent_frames", "cuda_graphs", "collective_timeout_s"),
}


def test_flat_construction_fills_the_sub_configs():
    flat = PipelineConfig(preset="tiny", latent_height=8, world_size=2, sp_rope="allgather", dtype="float32")
    composed = PipelineConfig(
        source=ModelSource(preset="tiny"),
        video=VideoConfig(latent_height=8),
        parallel=ParallelConfig(world_size=2, sp_rope="allgather"),
        compute=ComputeConfig(dtype="float32"),
    )
    assert flat == composed and hash(flat) == hash(composed)
    assert (flat.preset, flat.latent_height, flat.world_size, flat.sp_rope) == ("tiny", 8, 2, "allgather")
    assert pickle.loads(pickle.dumps(flat)) == flat
    # replace() takes flat names too, across sub-configs, and leaves the other fields as they were
    changed = dataclasses.replace(flat, sp_comm="unfused", max_frames=9, latent_frames=6)
    assert changed.parallel == ParallelConfig(world_size=2, sp_rope="allgather", sp_comm="unfused")
    assert changed.video == VideoConfig(latent_height=8, max_frames=9) and changed.latent_frames == 6
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        PipelineConfig(bogus=1)
    with pytest.raises(AttributeError, match="bogus"):
        _ = flat.bogus


def test_config_round_trips_through_json_with_flat_keys():
    """The JSON that workers and served model repositories read keeps its flat keys."""
    cfg = PipelineConfig(
        preset="tiny",
        latent_frames=7,
        sink_frames=1,
        local_attn_frames=4,
        ring_degree=2,
        attention="fp8",
        sampler=SamplerConfig(steps=(1000, 500), independent_first_frame=True),
    )
    raw = json.loads(json.dumps(cfg.to_dict()))
    assert set(raw) == FLAT_KEYS and raw["sampler"]["steps"] == [1000, 500]
    assert PipelineConfig.from_dict(raw) == cfg
    with pytest.raises(ConfigError, match=r"unknown fields \['bogus'\]"):
        PipelineConfig.from_dict({**raw, "bogus": 1})
    for part in (cfg.source, cfg.video, cfg.parallel, cfg.compute):
        assert type(part).from_dict(part.to_dict()) == part
    with pytest.raises(ConfigError, match=r"ParallelConfig has unknown fields \['bogus'\]"):
        ParallelConfig.from_dict({"bogus": 1})


def test_build_config_composes_the_same_sub_configs(tmp_path):
    cfg = BuildConfig(str(tmp_path), "onnx", preset="tiny", latent_height=10, max_frames=6)
    assert cfg.source == ModelSource(preset="tiny") and cfg.video == VideoConfig(
        latent_height=10, max_frames=6
    )
    assert cfg.parallel.world_size == 1 == cfg.world_size  # the build's default
    assert BuildConfig(str(tmp_path), "onnx", parallel=ParallelConfig(), preset="tiny").world_size == 1
    with pytest.raises(ConfigError, match="--world-size 0 must be >= 1"):
        BuildConfig(str(tmp_path), "onnx", preset="tiny", world_size=0)
    with pytest.raises(ConfigError, match="not --engines"):
        BuildConfig(str(tmp_path), "onnx", engines=str(tmp_path))


def test_the_rolling_window_check_is_one_message():
    with pytest.raises(
        ConfigError, match=r"^--local-attn-frames 3 must be >= --sink-frames 1 \+ chunk frames 3$"
    ):
        CacheConfig(9, 3, 1).check_chunk(3)
    with python_names(), pytest.raises(ConfigError, match=r"^local_attn_frames=3 must be >= sink_frames=1"):
        PipelineConfig(preset="tiny", local_attn_frames=3, sink_frames=1).resolve()
    CacheConfig(9, 4, 1).check_chunk(3)
    CacheConfig(9).check_chunk(9)  # no window: nothing to hold


def test_build_and_run_resolve_a_source_alike(tmp_path):
    """One resolution: a checkpoint beside its config runs at its preset's sizes, whichever config asks."""
    model_cfg, defaults = preset("demo")
    model = random_model(model_cfg, torch.float32, "cpu")
    ckpt = save_checkpoint(model, tmp_path / "demo", "wan-sharded", cfg=model_cfg)
    assert resolve_model(ModelSource(checkpoint=str(ckpt))) == (model_cfg, defaults)
    res = PipelineConfig(checkpoint=str(ckpt), device="cpu").resolve()
    assert (res.model, res.geometry.latent_height, res.latent_frames) == (model_cfg, 24, 9)
    assert not res.random_weights
    assert resolve_model(ModelSource(), "tiny") == preset("tiny")


def test_the_rank_environment_is_read_once_and_passed_down(monkeypatch):
    """build_session of a PipelineConfig reads the launcher's environment once (in resolve) and builds
    the rank that read gives; a caller's mapping is used as given, checked against world_size=."""
    from ropesp.runtime.dist import Mapping
    from ropesp.runtime.pipeline import build_session

    reads = []
    real = Mapping.from_env.__func__

    def counting(cls, requested=None):
        reads.append(requested)
        return real(cls, requested)

    monkeypatch.setattr(Mapping, "from_env", classmethod(counting))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    session = build_session(PipelineConfig(preset="tiny", device="cpu", latent_frames=3))
    assert reads == [None] and session.executor.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    reads.clear()
    res, mapping = PipelineConfig(preset="tiny", device="cpu").resolve_rank()
    assert reads == [None] and mapping == Mapping(2, 1, 1) and res.world_size == 2
    reads.clear()
    res, mapping = PipelineConfig(preset="tiny", device="cpu", world_size=2).resolve_rank(Mapping(2, 1, 1))
    assert reads == [] and mapping == Mapping(2, 1, 1)
    with pytest.raises(ConfigError, match=r"^--world-size 3 disagrees with this rank's group of 2"):
        PipelineConfig(preset="tiny", device="cpu", world_size=3).resolve(Mapping(2, 0, 0))
    with python_names(), pytest.raises(ConfigError, match=r"^world_size=3 disagrees"):
        PipelineConfig(preset="tiny", device="cpu", world_size=3).resolve(Mapping(2, 0, 0))
