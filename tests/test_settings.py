"""The run settings: declared once, read by section, shared by build and run, checked where declared."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from ropesp.cli import build_parser
from ropesp.cli.flags import add_flags, config_from_args
from ropesp.config import CacheConfig, preset
from ropesp.demo import default_checkpoint
from ropesp.errors import ConfigError, python_names
from ropesp.export.build import BuildConfig
from ropesp.model.checkpoint import resolve_model, save_checkpoint
from ropesp.model.wan import random_model
from ropesp.runtime.pipeline import resolve, resolve_rank
from ropesp.settings import (
    SECTIONS,
    SETTING_SECTION,
    ModelSource,
    ParallelConfig,
    RunConfig,
    SamplerConfig,
    VideoConfig,
    check_seed,
)


def test_settings_are_read_by_section_and_replaced_by_name():
    config = RunConfig.of(preset="tiny", latent_height=8, world_size=2, sp_rope="allgather", dtype="float32")
    assert config.source == ModelSource(preset="tiny")
    assert config.parallel == ParallelConfig(world_size=2, sp_rope="allgather")
    assert (config.video.latent_height, config.compute.dtype) == (8, "float32")
    assert pickle.loads(pickle.dumps(config)) == config and hash(config) == hash(RunConfig.of(**{
        "preset": "tiny", "latent_height": 8, "world_size": 2, "sp_rope": "allgather", "dtype": "float32"}))  # fmt: skip
    changed = config.replace(sp_comm="unfused", max_frames=9, latent_frames=6)
    assert changed.parallel == ParallelConfig(world_size=2, sp_rope="allgather", sp_comm="unfused")
    assert changed.video == VideoConfig(latent_height=8, max_frames=9, latent_frames=6)
    with pytest.raises(ConfigError, match=r"unknown setting --bogus; the settings are .*checkpoint"):
        RunConfig.of(bogus=1)
    with pytest.raises(AttributeError):  # no flat reads: a setting is read in its section
        _ = config.world_size


def test_every_setting_is_declared_once_with_help():
    names = [n for cls in SECTIONS.values() for n in cls.names()]
    assert len(names) == len(set(names)) == len(SETTING_SECTION)
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help line"


def test_config_round_trips_through_json_by_section():
    """The JSON that spawned ranks and Triton repositories read."""
    cfg = RunConfig.of(
        preset="tiny",
        latent_frames=7,
        sink_frames=1,
        local_attn_frames=4,
        ring_degree=2,
        attention="fp8",
        steps=(1000, 500),
        independent_first_frame=True,
    )
    raw = json.loads(json.dumps(cfg.to_dict()))
    assert set(raw) == set(SECTIONS) and raw["sampler"]["steps"] == [1000, 500]
    assert RunConfig.from_dict(raw) == cfg
    with pytest.raises(ConfigError, match=r"ParallelConfig has unknown settings \['bogus'\]"):
        RunConfig.from_dict({**raw, "parallel": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"unknown sections \['bogus'\]"):
        RunConfig.from_dict({**raw, "bogus": {}})


@pytest.mark.parametrize(
    ("settings", "cli", "python"),
    [
        ({"shift": "x"}, "--shift x must be a number", "shift='x' must be a number"),
        ({"shift": float("nan")}, "--shift nan must be a finite number", "shift=nan must be a finite number"),
        ({"shift": -1.0}, "--shift -1.0 must be > 0", "shift=-1.0 must be > 0"),
        ({"world_size": 0}, "--world-size 0 must be >= 1", "world_size=0 must be >= 1"),
        ({"world_size": True}, "--world-size True must be an integer", "world_size=True must be an integer"),
        ({"max_frames": 2.5}, "--max-frames 2.5 must be an integer", "max_frames=2.5 must be an integer"),
        ({"steps": "1000"}, "must be a sequence of integers", "steps='1000' must be a sequence of integers"),
        ({"steps": (500, 900)}, "--steps 500,900: steps must be strictly descending", "steps='500,900'"),
        ({"backend": "tpu"}, "--backend tpu: choose one of eager, compile", "backend='tpu': choose one of"),
        (
            {"height": 100, "width": 64},
            "--height 100 must be a positive multiple of 16",
            "height=100 must be",
        ),
        (
            {"collective_timeout": 0.0},
            "--collective-timeout 0.0 must be > 0 seconds",
            "collective_timeout=0.0",
        ),
        (
            {"sink_frames": 2},
            "--sink-frames 2 needs --local-attn-frames",
            "sink_frames=2 needs local_attn_frames",
        ),
        ({"decoder": "preview", "vae": "x"}, "--vae is for --decoder vae", "vae is for decoder='vae'"),
    ],
)
def test_settings_are_checked_where_declared_naming_the_parameter(settings, cli, python):
    with pytest.raises(ConfigError) as err:
        RunConfig.of(**settings)
    assert cli in str(err.value)
    with python_names(), pytest.raises(ConfigError) as err:
        RunConfig.of(**settings)
    assert python in str(err.value) and "--" not in str(err.value)


def test_integral_values_of_any_kind_are_taken():
    config = RunConfig.of(
        world_size=np.int64(2), max_frames=np.int32(9), shift=np.float32(8), steps=[1000, 500]
    )
    assert config.parallel.world_size == 2 and type(config.parallel.world_size) is int
    assert config.sampler.shift == 8.0 and config.sampler.steps == (1000, 500)


def test_one_rule_for_seeds():
    assert check_seed(np.int64(3)) == 3 and check_seed("7") == 7 and check_seed(2**63 - 1) == 2**63 - 1
    for bad, message in [
        (-1, "--seed -1 must be in 0..2^63-1"),
        (2**64, "--seed 18446744073709551616 must be in 0..2^63-1"),
        (1.5, "--seed 1.5 must be an integer"),
        ("x", "--seed x must be an integer"),
        (10**5000, "--seed <a 5001-digit integer> must be in"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_seed(bad)
        assert str(err.value).startswith(message), str(err.value)[:120]


def test_flags_are_generated_from_the_settings():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"ropesp {name} {action.option_strings[0]} has no help line"
    args = parser.parse_args(
        ["generate", "--world-size", "2", "--no-cuda-graphs", "--steps", "1000,500", "--shift", "8"]
    )
    config = config_from_args(args)
    assert config.parallel.world_size == 2 and config.compute.cuda_graphs is False
    assert config.sampler == SamplerConfig(steps=(1000, 500), shift=8.0)
    assert config.video == VideoConfig()  # flags not given keep the declared defaults
    demo = parser.parse_args(["demo"])
    assert config_from_args(demo).video.local_attn_frames == 9  # the demo's own default, declared there
    assert config_from_args(demo).prompt.prompt_mode == "cut" and config.prompt.prompt_mode == "swap"
    own = argparse.ArgumentParser()
    add_flags(own, SamplerConfig, only=("shift",))
    assert [a.dest for a in own._actions if a.option_strings][1:] == ["shift"]


def test_build_config_takes_the_shared_sections(tmp_path):
    cfg = BuildConfig.of(str(tmp_path), "onnx", preset="tiny", latent_height=10, max_frames=6)
    assert cfg.source == ModelSource(preset="tiny")
    assert cfg.video == VideoConfig(latent_height=10, max_frames=6)
    assert cfg.parallel.world_size == 1  # the build's default
    with pytest.raises(ConfigError, match="--world-size 0 must be >= 1"):
        BuildConfig.of(str(tmp_path), "onnx", preset="tiny", world_size=0)
    with pytest.raises(ConfigError, match="`ropesp build` does not take --precision"):
        BuildConfig.of(str(tmp_path), "onnx", preset="tiny", precision="fp8")
    assert BuildConfig.of(str(tmp_path), "onnx").source == ModelSource(checkpoint=str(default_checkpoint()))


def test_a_build_of_no_model_refused_where_the_demo_weights_are_missing(tmp_path, monkeypatch):
    import ropesp.demo

    monkeypatch.setattr(ropesp.demo, "has_default_weights", lambda: False)
    with pytest.raises(
        ConfigError, match=r"^give --checkpoint PATH \(optionally --model-config\) or --preset NAME$"
    ):
        BuildConfig.of(str(tmp_path), "onnx")


def test_the_rolling_window_check_is_one_message():
    with pytest.raises(
        ConfigError, match=r"^--local-attn-frames 3 must be >= --sink-frames 1 \+ chunk frames 3$"
    ):
        CacheConfig(9, 3, 1).check_chunk(3)
    with python_names(), pytest.raises(ConfigError, match=r"^local_attn_frames=3 must be >= sink_frames=1"):
        resolve(RunConfig.of(preset="tiny", local_attn_frames=3, sink_frames=1))
    CacheConfig(9, 4, 1).check_chunk(3)
    CacheConfig(9).check_chunk(9)  # no window: nothing to hold


def test_valid_video_lengths_are_named():
    with python_names(), pytest.raises(ConfigError) as err:
        resolve(RunConfig.of(preset="tiny", frames=37))
    assert "valid lengths are 9, 21, 33, 45, ... frames" in str(err.value)


def test_build_and_run_resolve_a_source_alike(tmp_path):
    """One resolution: a checkpoint beside its config runs at its preset's sizes, whichever config asks."""
    model_cfg, defaults = preset("demo")
    model = random_model(model_cfg, torch.float32, "cpu")
    ckpt = save_checkpoint(model, tmp_path / "demo", "wan-sharded", cfg=model_cfg)
    assert resolve_model(ModelSource(checkpoint=str(ckpt))) == (model_cfg, defaults)
    res = resolve(RunConfig.of(checkpoint=str(ckpt), device="cpu"))
    assert (res.model, res.geometry.latent_height, res.latent_frames) == (model_cfg, 24, 9)
    assert not res.random_weights
    assert resolve_model(ModelSource(), "tiny") == preset("tiny")


def test_the_rank_environment_is_read_once_and_passed_down(monkeypatch):
    """resolve reads the launcher's environment once; a caller's mapping is used as given, checked
    against world_size."""
    from ropesp.runtime.dist import Mapping
    from ropesp.runtime.pipeline import build_session

    reads = []
    real = Mapping.from_env.__func__

    def counting(cls, requested=None):
        reads.append(requested)
        return real(cls, requested)

    monkeypatch.setattr(Mapping, "from_env", classmethod(counting))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    session = build_session(RunConfig.of(preset="tiny", device="cpu", latent_frames=3))
    assert reads == [None] and session.executor.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    reads.clear()
    res, mapping = resolve_rank(RunConfig.of(preset="tiny", device="cpu"))
    assert reads == [None] and mapping == Mapping(2, 1, 1) and res.world_size == 2
    reads.clear()
    res, mapping = resolve_rank(RunConfig.of(preset="tiny", device="cpu", world_size=2), Mapping(2, 1, 1))
    assert reads == [] and mapping == Mapping(2, 1, 1)
    with pytest.raises(ConfigError, match=r"^--world-size 3 disagrees with this rank's group of 2"):
        resolve(RunConfig.of(preset="tiny", device="cpu", world_size=3), Mapping(2, 0, 0))
    with python_names(), pytest.raises(ConfigError, match=r"^world_size=3 disagrees"):
        resolve(RunConfig.of(preset="tiny", device="cpu", world_size=3), Mapping(2, 0, 0))
