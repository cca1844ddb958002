"""Text from the page -> what the pipeline's stream takes.

A pipeline with a text encoder (umT5, or the demo model's own) takes the text itself. A model without one
(a random-weight preset) gets `SeededPromptEmbeddings`: every distinct text maps to its own fixed
embedding, so each prompt has its own stream and a change shows on screen; the text carries no meaning
there, and the page says so.
"""

from __future__ import annotations

import hashlib

import torch

from ropesp.errors import ConfigError

SEEDED_TOKENS = 32
SEEDED_SCALE = 0.1
"""The scale of the default prompt embeddings (runtime/prompts.py), so the model sees inputs of the
size it always gets without a prompt."""


class SeededPromptEmbeddings:
    """text -> [1, 32, text_dim] float32 drawn from a CPU generator seeded by the text's SHA-256."""

    def __init__(self, text_dim: int, tokens: int = SEEDED_TOKENS) -> None:
        self.text_dim, self.tokens = text_dim, tokens

    def encode(self, text: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(1, self.tokens, self.text_dim, generator=g) * SEEDED_SCALE


class PagePrompts:
    """How the demo hands the page's text to `pipe.stream` / `stream.set_prompt`."""

    def __init__(self, pipe, probe_text: str) -> None:
        from ropesp.demo import EXAMPLE_PROMPTS, is_demo_model

        self.fallback: SeededPromptEmbeddings | None = None
        self.note = "text prompts through the pipeline's text encoder"
        self.reason: str | None = None
        self.examples: tuple[str, ...] = EXAMPLE_PROMPTS if is_demo_model(pipe.resolved.model) else ()
        """Prompts the page offers to click (the demo model's grammar)."""
        try:
            pipe.encode(probe_text)
        except ConfigError as exc:
            self.fallback = SeededPromptEmbeddings(pipe.text_dim)
            self.reason = str(exc)
            self.note = (
                "this model has no text encoder: each prompt gets its own seeded embedding "
                "(the words carry no meaning)"
            )
        if self.examples:
            self.note = (
                "the demo model knows COUNT COLOUR SHAPE MOTION: a|two|three, red|green|blue|yellow|white|cyan|"
                "magenta, square|disc, moving left|right|up|down, bouncing, entering from / leaving to the "
                "left|right|top|bottom"
            )

    def __call__(self, text: str) -> str | torch.Tensor:
        return text if self.fallback is None else self.fallback.encode(text)
