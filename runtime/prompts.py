"""Prompt embeddings: from a file (.pt / .safetensors), the embedded default, or text through the one
text encoder `text_encoder_for` chooses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ropesp.config import ModelConfig
from ropesp.errors import ConfigError, arg, read_failure

DEFAULT_PROMPT_SEED = 1234
DEFAULT_PROMPT_TOKENS = 32


def load_prompt_embeds(path: str | Path, flag: str = "--prompt-embeds") -> torch.Tensor:
    """A .pt tensor [L, text_dim] / [1, L, text_dim], or a .safetensors file holding one tensor
    (any key) or the key `prompt_embeds`. Returns float32 [1, L, text_dim] (shape checked later);
    errors name the file as `flag PATH`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist")
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
                    f"{flag} {path} holds {len(tensors)} tensors {sorted(tensors)[:5]}; "
                    "expected one tensor or the key 'prompt_embeds'"
                )
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{flag} {path} could not be read: {read_failure(exc)}") from exc
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{flag} {path} holds a {type(t).__name__}, expected a tensor")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] != 1:
        raise ConfigError(f"{flag} {path} has shape {tuple(t.shape)}; expected [L, D] or [1, L, D]")
    return t.float()


def default_prompt_embeds(cfg: ModelConfig) -> torch.Tensor:
    """A fixed seeded embedding [1, 32, text_dim] for runs without a prompt."""
    g = torch.Generator("cpu").manual_seed(DEFAULT_PROMPT_SEED)
    return torch.randn(1, min(DEFAULT_PROMPT_TOKENS, cfg.text_len), cfg.text_dim, generator=g) * 0.1


def load_umt5(
    path: str | Path, tokenizer: str | Path | None, cfg: ModelConfig, dtype, device, source: str, on_load=None
):
    """The umT5 encoder of `path` (+ `tokenizer`) on device, checked to give the DiT's text_dim; errors
    start with `source` (how the caller named the directory, e.g. `--model-dir DIR`). on_load(model dir)
    runs once the directory passed its checks, before the (slow) load."""
    import json

    from ropesp.errors import CheckpointError
    from ropesp.text_encoder import find_text_encoder_dirs, load_text_encoder

    try:
        model_dir, _ = find_text_encoder_dirs(path, tokenizer)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    try:
        d_model = json.loads((model_dir / "config.json").read_text()).get("d_model")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: {model_dir / 'config.json'} is not valid JSON: {exc}") from None
    if d_model != cfg.text_dim:
        raise ConfigError(
            f"{source}: the text encoder gives {d_model}-dim embeddings, but the model's text_dim is "
            f"{cfg.text_dim}; use the umT5 encoder the DiT was trained with"
        )
    if on_load is not None:
        on_load(model_dir)
    try:
        return load_text_encoder(path, dtype, device, cfg.text_len, tokenizer)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class TextEncoderChoice:
    """The text encoder a prompt goes through: a ready one (the caller's object, or the model's own) or
    a umT5 directory, loaded by `load` when first needed (it is large)."""

    source: str
    """How the user named it, for messages: `--text-encoder DIR` / `text_encoder='DIR'`, `--model-dir
    DIR` / `model_dir='DIR'`, or 'the model's own encoder'."""
    encoder: object | None = None
    """A ready encoder: encode(text) -> [L, text_dim] or [1, L, text_dim]."""
    path: Path | str | None = None
    """The umT5 directory (text_encoder/ + tokenizer/, or one HF directory) when encoder is None."""
    tokenizer: Path | str | None = None
    """Its tokenizer directory when apart from path (a model dir's tokenizer/)."""
    builtin: bool = False
    """The model's own encoder (e.g. the embedded demo model's word embeddings: no download)."""

    def load(self, cfg: ModelConfig, dtype, device, on_load=None):
        """The encoder, ready: the one held, or the umT5 of path loaded on device (checked against the
        DiT's text_dim; on_load(model dir) runs before the slow load, as load_umt5's)."""
        if self.encoder is not None:
            return self.encoder
        return load_umt5(self.path, self.tokenizer, cfg, dtype, device, self.source, on_load)


def text_encoder_for(encoder=None, model_dir=None, own=None) -> TextEncoderChoice | None:
    """The one choice of text encoder, first that applies: `encoder` (an object with encode(text), or a
    umT5 directory), `own` (the encoder the model brings with it: ropesp.demo.own_text_encoder(cfg),
    passed in by the callers above the runtime), the umT5 of `model_dir` (a resolved
    ropesp.model_dir.ModelDir); None when there is none (the caller says how else to give a prompt).
    Errors name the arguments through errors.arg (flags in the CLI, Python arguments inside
    python_names())."""
    if isinstance(encoder, (str, Path)):
        return TextEncoderChoice(arg("text_encoder", str(encoder)), path=encoder)
    if encoder is not None:
        if not callable(getattr(encoder, "encode", None)):
            raise ConfigError(f"{arg('text_encoder')} must be a directory or have encode(text) -> embeddings")
        return TextEncoderChoice(arg("text_encoder"), encoder=encoder)
    if own is not None:
        return TextEncoderChoice("the model's own encoder", encoder=own, builtin=True)
    if model_dir is not None:
        return TextEncoderChoice(
            arg("model_dir", str(model_dir.root)), path=model_dir.text_encoder, tokenizer=model_dir.tokenizer
        )
    return None


PROMPT_CACHE = 16
"""Text prompts whose embeddings a PromptEncoder keeps (a stream switching back and forth encodes once)."""


class PromptEncoder:
    """What every front end does with a prompt: text through the run's one text encoder (text_encoder_for:
    the caller's, else the model's own, else --model-dir's umT5; loaded at the first text, then kept),
    embeddings as they are. Returns float32 [1, L, text_dim] on the CPU (the engine core checks it)."""

    def __init__(self, res, encoder=None, device=None) -> None:
        """res: the ResolvedPipeline; encoder: an object with encode(text) or a umT5 directory (default:
        the settings' text_encoder); device: where umT5 runs (default: rank 0's)."""
        from ropesp.demo import own_text_encoder

        self.res = res
        given = encoder if encoder is not None else res.config.prompt.text_encoder
        self.choice = text_encoder_for(given, res.model_dir, own_text_encoder(res.model))
        self.device = device
        self._encoder = None
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def takes_text(self) -> bool:
        return self.choice is not None

    def encoder(self, on_load=None):
        """The loaded encoder (on_load(model dir) runs before a umT5 loads)."""
        if self._encoder is None:
            if self.choice is None:
                raise ConfigError(
                    f"{arg('prompt')} is text, but this model has no text encoder: pass {arg('text_encoder')} "
                    f"(umT5) or {arg('model_dir')}, or give embeddings [L, {self.res.model.text_dim}]"
                )
            from ropesp.runtime.dist import Mapping, device_for

            device = self.device or device_for(Mapping(self.res.world_size), self.res.device)
            self._encoder = self.choice.load(self.res.model, self.res.dtype, device, on_load)
        return self._encoder

    def __call__(self, prompt, on_load=None) -> torch.Tensor:
        if not isinstance(prompt, str):
            return prompt
        if prompt in self._cache:
            return self._cache[prompt]
        with torch.inference_mode():
            embeds = self.encoder(on_load).encode(prompt).detach().to("cpu", torch.float32)
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(0)
        self._cache[prompt] = embeds
        if len(self._cache) > PROMPT_CACHE:
            self._cache.pop(next(iter(self._cache)))
        return embeds

    def free(self) -> None:
        """Release a loaded umT5 (a one-shot run encodes its prompts, then frees the GPU for the DiT)."""
        self._encoder = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
