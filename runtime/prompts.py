"""Prompt embeddings: from a file (.pt / .safetensors) or the embedded default."""

from __future__ import annotations

from pathlib import Path

import torch

from ropesp.config import ModelConfig
from ropesp.errors import ConfigError, read_failure

DEFAULT_PROMPT_SEED = 1234
DEFAULT_PROMPT_TOKENS = 32


def load_prompt_embeds(path: str | Path) -> torch.Tensor:
    """A .pt tensor [L, text_dim] / [1, L, text_dim], or a .safetensors file holding one tensor
    (any key) or the key `prompt_embeds`. Returns float32 [1, L, text_dim] (shape checked later)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompt-embeds {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "prompt_embeds" in tensors:
                t = tensors["prompt_embeds"]
            elif len(tensors) == 1:
                t = next(iter(tensors.values()))
            else:
                raise ConfigError(
                    f"--prompt-embeds {path} holds {len(tensors)} tensors {sorted(tensors)[:5]}; "
                    "expected one tensor or the key 'prompt_embeds'"
                )
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--prompt-embeds {path} could not be read: {read_failure(exc)}") from exc
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"--prompt-embeds {path} holds a {type(t).__name__}, expected a tensor")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] != 1:
        raise ConfigError(f"--prompt-embeds {path} has shape {tuple(t.shape)}; expected [L, D] or [1, L, D]")
    return t.float()


def default_prompt_embeds(cfg: ModelConfig) -> torch.Tensor:
    """A fixed seeded embedding [1, 32, text_dim] for runs without a prompt."""
    g = torch.Generator("cpu").manual_seed(DEFAULT_PROMPT_SEED)
    return torch.randn(1, min(DEFAULT_PROMPT_TOKENS, cfg.text_len), cfg.text_dim, generator=g) * 0.1
