"""The demo's prompt grammar and its text encoder (no download: fixed seeded word embeddings).

    prompt := COUNT COLOUR SHAPE MOTION
    COUNT  := a | an | one | two | three
    COLOUR := red | green | blue | yellow | white | cyan | magenta
    SHAPE  := square | disc        (plural after two/three: squares | discs)
    MOTION := moving left|right|up|down | bouncing
            | entering from the left|right|top|bottom | leaving to the left|right|top|bottom

e.g. "a red square moving right", "two blue discs bouncing", "three white squares entering from the top".
Case and surrounding punctuation are ignored.
"""

from __future__ import annotations

import re

import torch

from ropesp.demo.world import COLOURS, DIRECTIONS, SHAPES, SIDES, SceneSpec
from ropesp.errors import ConfigError, arg

COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
PLURALS = {f"{shape}s": shape for shape in SHAPES}
MOTION_WORDS = ("moving", "bouncing", "entering", "leaving", "from", "to", "the")
VOCABULARY: tuple[str, ...] = (
    *COUNTS,
    *COLOURS,
    *SHAPES,
    *PLURALS,
    *MOTION_WORDS,
    *sorted(set(DIRECTIONS) | set(SIDES)),
)
GRAMMAR = (
    "COUNT COLOUR SHAPE MOTION, e.g. 'a red square moving right', 'two blue discs bouncing', "
    "'three white squares entering from the top', 'a green disc leaving to the left'"
)
TEXT_LEN = 16
"""Tokens of the demo model's text input (prompts are at most 7 words)."""
TEXT_DIM = 64
"""Width of the demo word embeddings."""
EMBEDDING_SEED = 2026


class PromptError(ConfigError):
    """A prompt outside the demo grammar."""


def words(prompt: str) -> list[str]:
    """Lower-cased words of a prompt, punctuation around them dropped."""
    return [w for w in re.split(r"[\s,.;:!?\"']+", prompt.lower()) if w]


def parse(prompt: str) -> SceneSpec:
    """A prompt of the demo grammar -> the scene it describes; PromptError naming the problem."""
    ws = words(prompt)
    unknown = [w for w in ws if w not in VOCABULARY]
    if unknown:
        raise PromptError(
            f"prompt {prompt!r}: unknown word {unknown[0]!r}; the demo model knows: {', '.join(VOCABULARY)}"
        )
    if len(ws) < 4:
        raise PromptError(f"prompt {prompt!r} is too short; expected {GRAMMAR}")
    count_word, colour, shape_word, motion, *rest = ws

    def expect(what: str, word: str, choices) -> None:
        if word not in choices:
            raise PromptError(
                f"prompt {prompt!r}: expected {what} ({' | '.join(choices)}) where it says {word!r}; "
                f"the grammar is {GRAMMAR}"
            )

    expect("a count", count_word, list(COUNTS))
    expect("a colour", colour, list(COLOURS))
    count = COUNTS[count_word]
    shapes = list(SHAPES) if count == 1 else list(PLURALS)
    expect("a singular shape" if count == 1 else "a plural shape", shape_word, shapes)
    shape = PLURALS.get(shape_word, shape_word)
    expect("a motion", motion, ["moving", "bouncing", "entering", "leaving"])
    if motion == "bouncing":
        tail: list[str] = []
    elif motion == "moving":
        tail = [" | ".join(DIRECTIONS)]
    else:
        tail = ["from" if motion == "entering" else "to", "the", " | ".join(SIDES)]
    if len(rest) != len(tail):
        shown = " ".join([motion, *(tail or [""])]).strip()
        raise PromptError(f"prompt {prompt!r}: the motion must read '{shown}'; the grammar is {GRAMMAR}")
    for word, want in zip(rest, tail):
        expect(f"'{want}'", word, want.split(" | "))
    if motion == "bouncing":
        direction = None
    elif motion == "moving":
        direction = rest[0]
    else:
        side_direction = SIDES[rest[-1]]  # the direction pointing at that border
        if motion == "entering":  # comes in from that border: travels away from it
            side_direction = {"left": "right", "right": "left", "up": "down", "down": "up"}[side_direction]
        direction = side_direction
    return SceneSpec(count, colour, shape, motion, direction)


def prompts_problem(prompts: list[str]) -> str | None:
    """The first of prompts outside the demo grammar, as one line naming --prompt (None: all parse)."""
    for prompt in prompts:
        try:
            parse(prompt)
        except PromptError as exc:
            return f"{arg('prompt')}: {exc}"
    return None


def describe(spec: SceneSpec) -> str:
    """The canonical prompt of a scene (parse(describe(spec)) == spec)."""
    count = {1: "a", 2: "two", 3: "three"}[spec.count]
    shape = spec.shape if spec.count == 1 else f"{spec.shape}s"
    if spec.motion == "bouncing":
        motion = "bouncing"
    elif spec.motion == "moving":
        motion = f"moving {spec.direction}"
    else:
        towards = spec.direction if spec.motion == "leaving" else _opposite(spec.direction)
        side = {v: k for k, v in SIDES.items()}[towards]
        motion = f"entering from the {side}" if spec.motion == "entering" else f"leaving to the {side}"
    return f"{count} {spec.colour} {shape} {motion}"


def _opposite(direction: str) -> str:
    return {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]


class DemoTextEncoder:
    """Deterministic prompt encoder of the demo model: one fixed word embedding per vocabulary word
    (seeded normal vectors; a plural shares its singular's, 'an'/'one' share 'a'), zero rows after the
    prompt's words, as umT5's output is zero past its tokens."""

    def __init__(
        self, text_len: int = TEXT_LEN, text_dim: int = TEXT_DIM, seed: int = EMBEDDING_SEED
    ) -> None:
        self.text_len, self.text_dim = text_len, text_dim
        canonical = sorted({self._canonical(w) for w in VOCABULARY})
        g = torch.Generator("cpu").manual_seed(seed)
        table = torch.randn(len(canonical), text_dim, generator=g, dtype=torch.float32)
        self.table = {w: table[i] for i, w in enumerate(canonical)}

    @staticmethod
    def _canonical(word: str) -> str:
        return "a" if word in ("an", "one") else PLURALS.get(word, word)

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [text_len, text_dim] float32; PromptError for a prompt outside the grammar."""
        parse(prompt)
        ws = words(prompt)
        out = torch.zeros(self.text_len, self.text_dim, dtype=torch.float32)
        for i, w in enumerate(ws[: self.text_len]):
            out[i] = self.table[self._canonical(w)]
        return out
