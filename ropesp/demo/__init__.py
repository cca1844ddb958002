"""The embedded demo: a small causal DiT trained by ropesp on a procedural world of moving squares and
discs, its prompt encoder and its quality metric.

    ropesp.demo.default_checkpoint()   -> the shipped weights (what `ropesp generate` runs by default)
    ropesp.demo.DemoTextEncoder().encode("a red square moving right")  -> [16, 64] prompt embeddings
    ropesp.demo.is_demo_model(cfg)     -> whether a model takes the demo encoder's embeddings
    ropesp.demo.own_text_encoder(cfg)  -> that encoder for the demo model, None for any other
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ropesp.config import ModelConfig, in_demo_family
from ropesp.demo.prompts import DemoTextEncoder, PromptError, parse
from ropesp.settings import ModelSource

DEFAULT_PROMPT = "a red square moving right"
"""What the demo model generates when no prompt is given."""
EXAMPLE_PROMPTS = (
    DEFAULT_PROMPT,
    "two blue discs bouncing",
    "three white squares entering from the top",
    "a green disc leaving to the left",
    "two yellow squares moving down",
)
"""Prompts of the demo grammar that the README, `generate --help` and the demo page offer."""

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

__all__ = [
    "DEFAULT_PROMPT",
    "EXAMPLE_PROMPTS",
    "DemoTextEncoder",
    "PromptError",
    "default_checkpoint",
    "has_default_weights",
    "is_demo_model",
    "own_text_encoder",
    "parse",
    "with_default_weights",
]


def default_checkpoint() -> Path:
    """Directory of the shipped demo weights (diffusion_pytorch_model.safetensors + config.json), loaded
    by the normal checkpoint loader (ropesp.model.checkpoint)."""
    return Path(__file__).resolve().parent / "weights"


def has_default_weights() -> bool:
    """Whether the package ships the trained demo weights (a source tree before training has none; then
    `ropesp generate` falls back to the random-weight default preset)."""
    return (default_checkpoint() / WEIGHTS_FILE).is_file()


def with_default_weights(source: ModelSource) -> ModelSource:
    """source, or the shipped demo weights where it names no model and they are installed (what
    `ropesp generate`, `ropesp build` and `ropesp.Pipeline()` run without a model named)."""
    if source.named or not has_default_weights():
        return source
    return dataclasses.replace(source, checkpoint=str(default_checkpoint()))


def is_demo_model(cfg: ModelConfig) -> bool:
    """True for the demo model at any width or depth, with or without a stream adapter (text_dim 64 x 16
    tokens: the DemoTextEncoder's output; ropesp.config.in_demo_family)."""
    return in_demo_family(cfg)


def own_text_encoder(cfg: ModelConfig) -> DemoTextEncoder | None:
    """The prompt encoder the model `cfg` brings with it: the demo encoder for the demo model (no
    download), None for every other model (they take umT5 embeddings)."""
    return DemoTextEncoder(cfg.text_len, cfg.text_dim) if is_demo_model(cfg) else None
