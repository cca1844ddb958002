"""runtime.prompts.text_encoder_for: the one choice of text encoder that `ropesp generate` and
ropesp.Pipeline share, and its messages naming the parameter as the caller wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ropesp.config import demo, tiny
from ropesp.demo import DemoTextEncoder, own_text_encoder
from ropesp.errors import CheckpointError, ConfigError, python_names
from ropesp.model_dir import ModelDir
from ropesp.runtime.prompts import text_encoder_for


class _Encoder:
    def encode(self, text: str) -> torch.Tensor:
        return torch.zeros(1, 4, tiny().text_dim)


def _model_dir(root: Path) -> ModelDir:
    return ModelDir(root, root / "vae", root / "text_encoder", root / "tokenizer", None, None)


def test_first_that_applies_wins(tmp_path):
    md = _model_dir(tmp_path / "wan")
    mine = _Encoder()
    # an explicit encoder (object or directory) before everything, also for the demo model
    assert text_encoder_for(mine, md, own_text_encoder(tiny())).encoder is mine
    chosen = text_encoder_for(str(tmp_path / "umt5"), md, own_text_encoder(demo()))
    assert (chosen.path, chosen.tokenizer, chosen.builtin) == (str(tmp_path / "umt5"), None, False)
    # the demo model's own encoder before a model dir's umT5 (which would not fit its text_dim 64)
    own = text_encoder_for(None, md, own_text_encoder(demo()))
    assert own.builtin and isinstance(own.encoder, DemoTextEncoder)
    assert torch.equal(
        own.encoder.encode("a red square moving right"), DemoTextEncoder().encode("a red square moving right")
    )
    from_dir = text_encoder_for(None, md, own_text_encoder(tiny()))
    assert (from_dir.path, from_dir.tokenizer) == (md.text_encoder, md.tokenizer)
    assert text_encoder_for(own=own_text_encoder(tiny())) is None  # the caller says how else to give a prompt


def test_sources_name_the_parameter_as_written(tmp_path):
    md = _model_dir(tmp_path / "wan")
    assert text_encoder_for("enc").source == "--text-encoder enc"
    assert text_encoder_for(None, md, own_text_encoder(tiny())).source == f"--model-dir {md.root}"
    with python_names():
        assert text_encoder_for("enc").source == "text_encoder='enc'"
        assert text_encoder_for(None, md, own_text_encoder(tiny())).source == f"model_dir={str(md.root)!r}"


def test_an_object_without_encode_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^--text-encoder must be a directory or have encode"):
        text_encoder_for(object())
    with (
        python_names(),
        pytest.raises(ConfigError, match=r"^text_encoder must be a directory or have encode"),
    ):
        text_encoder_for(object())


def test_load_returns_a_ready_encoder_and_names_a_bad_directory(tmp_path):
    mine = _Encoder()
    assert text_encoder_for(mine).load(tiny(), torch.float32, torch.device("cpu")) is mine
    with pytest.raises(CheckpointError, match=rf"^--text-encoder {tmp_path / 'missing'}: "):
        text_encoder_for(str(tmp_path / "missing")).load(tiny(), torch.float32, torch.device("cpu"))
