"""umT5 prompt encoding: Wan's 512-token padding with zeroed padded rows, from local directories only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import helpers_media

from ropesp.errors import CheckpointError
from ropesp.text_encoder import clean_prompt, load_text_encoder

PROMPT = "a red  cat sits on the mat &amp; a dog runs in the park"
PROMPT_TOKENS = 15  # 14 words (the &amp; unescaped to one "&" token) + </s>


@pytest.fixture(scope="module")
def te_root(tmp_path_factory):
    return helpers_media.save_text_encoder_dirs(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def encoder(te_root):
    return load_text_encoder(te_root)


def test_text_encoder_shape_and_zero_padding(encoder):
    out = encoder.encode(PROMPT)
    assert out.shape == (1, 512, helpers_media.TINY_TEXT_DIM) and out.dtype == torch.float32
    assert out.device.type == "cpu"
    nonzero = out[0].abs().sum(-1) > 0  # [512]
    assert nonzero[:PROMPT_TOKENS].all()
    assert not nonzero[PROMPT_TOKENS:].any()
    assert torch.equal(out[0, PROMPT_TOKENS:], torch.zeros(512 - PROMPT_TOKENS, helpers_media.TINY_TEXT_DIM))


def test_text_encoder_matches_masked_model_run(encoder):
    """The rows that are kept are the encoder's output with the attention mask, as Wan computes them."""
    tok = encoder.tokenizer([clean_prompt(PROMPT)], padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():
        ref = encoder.model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        ).last_hidden_state
    assert tok["input_ids"][0, PROMPT_TOKENS - 1] == 1  # </s> closes the prompt
    torch.testing.assert_close(encoder.encode(PROMPT)[:, :PROMPT_TOKENS], ref[:, :PROMPT_TOKENS])


def test_text_encoder_deterministic_and_prompt_dependent(encoder):
    a = encoder.encode(PROMPT)
    assert torch.equal(a, encoder.encode(PROMPT))
    assert not torch.equal(a, encoder.encode("a blue bird flies above the city"))


def test_text_encoder_truncates_to_text_len(te_root):
    short = load_text_encoder(te_root, text_len=8)
    out = short.encode(" ".join(["cat"] * 40))
    assert out.shape == (1, 8, helpers_media.TINY_TEXT_DIM)
    assert (out[0].abs().sum(-1) > 0).all()  # truncated: no padding rows left


def test_text_encoder_plain_hf_dir_and_explicit_tokenizer(te_root, tmp_path, encoder):
    plain = tmp_path / "plain"
    shutil.copytree(te_root / "text_encoder", plain)
    for f in (te_root / "tokenizer").iterdir():
        shutil.copy(f, plain / f.name)
    expected = encoder.encode(PROMPT)
    assert torch.equal(load_text_encoder(plain).encode(PROMPT), expected)
    split = load_text_encoder(te_root / "text_encoder", tokenizer_path=te_root / "tokenizer")
    assert torch.equal(split.encode(PROMPT), expected)


def test_clean_prompt():
    assert clean_prompt("  a\n\tcat &amp;amp; dog  ") == "a cat & dog"


def test_text_encoder_errors(te_root, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "missing")

    only_model = tmp_path / "only_model"
    shutil.copytree(te_root / "text_encoder", only_model / "text_encoder")
    with pytest.raises(CheckpointError, match=r"no tokenizer/ directory"):
        load_text_encoder(only_model)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(te_root, no_weights)
    (no_weights / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder lacks model weights"):
        load_text_encoder(no_weights)

    partial = tmp_path / "partial"
    shutil.copytree(te_root, partial)
    from safetensors.torch import load_file, save_file

    weights = partial / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    del state["encoder.final_layer_norm.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 weights.*final_layer_norm"):
        load_text_encoder(partial)

    wrong_type = tmp_path / "t5"
    shutil.copytree(te_root, wrong_type)
    cfg_file = wrong_type / "text_encoder" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="model_type='t5'"):
        load_text_encoder(wrong_type)
