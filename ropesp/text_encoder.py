"""umT5 prompt encoding as Wan does it: once per prompt, [1, text_len, text_dim] with padded rows zeroed.

Wan (and Self-Forcing's WanTextEncoder) tokenizes with google/umt5-xxl's tokenizer, `padding="max_length"`,
`truncation=True`, `max_length=512`, special tokens added (a trailing </s>), runs the umT5-XXL encoder with
the attention mask, and sets every row past the prompt's length to zero. Those zero rows are what the DiT's
cross-attention sees as padding, so the full text_len rows are kept.

Weights come from a local directory, never from a hub (`local_files_only=True`):
- the diffusers Wan layout: DIR/text_encoder (UMT5EncoderModel config.json + model*.safetensors) and
  DIR/tokenizer;
- or a plain Hugging Face directory holding both the model and the tokenizer files.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch

from ropesp.errors import CheckpointError

TEXT_ENCODER_SUBDIR = "text_encoder"
TOKENIZER_SUBDIR = "tokenizer"
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def clean_prompt(text: str) -> str:
    """Wan's clean='whitespace': ftfy.fix_text when ftfy is installed, HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def find_text_encoder_dirs(path: str | Path, tokenizer_path: str | Path | None = None) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) of a diffusers Wan root, a plain HF directory, or a model directory plus
    `tokenizer_path`; CheckpointError naming what is incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"text encoder directory {path} does not exist")
    if tokenizer_path is not None:
        model_dir, tok_dir = path, Path(tokenizer_path)
    elif (path / TEXT_ENCODER_SUBDIR).is_dir() or (path / TOKENIZER_SUBDIR).is_dir():
        model_dir, tok_dir = path / TEXT_ENCODER_SUBDIR, path / TOKENIZER_SUBDIR
    else:
        model_dir = tok_dir = path
    problems = []
    if not model_dir.is_dir():
        problems.append(f"no {model_dir.name}/ directory")
    else:
        if not (model_dir / "config.json").is_file():
            problems.append(f"{model_dir} lacks config.json")
        if not has_model_weights(model_dir):
            problems.append(f"{model_dir} lacks model weights ({' / '.join(MODEL_WEIGHT_FILES[:2])})")
    if not tok_dir.is_dir():
        problems.append(f"no {tok_dir.name}/ directory")
    elif not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{tok_dir} lacks tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if problems:
        raise CheckpointError(
            f"text encoder {path} is incomplete: {'; '.join(problems)}. Expected the diffusers Wan layout "
            f"(text_encoder/ + tokenizer/) or one directory with the umT5 model and its tokenizer"
        )
    return model_dir, tok_dir


def has_model_weights(directory: Path) -> bool:
    """Whether a transformers model directory holds weights (single file, shards or an index)."""
    return any((directory / f).is_file() for f in MODEL_WEIGHT_FILES) or any(
        directory.glob("model-*.safetensors")
    )


class UMT5TextEncoder:
    """A tokenizer + UMT5EncoderModel pair; `encode(prompt)` -> [1, text_len, text_dim] float32 on the CPU."""

    def __init__(self, model: torch.nn.Module, tokenizer, text_len: int = 512) -> None:
        if text_len < 1:
            raise ValueError(f"text_len={text_len} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, text_dim] float32; rows past the prompt's tokens (and </s>) are exactly 0."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(device)  # [1, text_len]
        mask = enc["attention_mask"].to(device)  # [1, text_len]
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, text_len, text_dim]
        out = out.float().masked_fill(mask.unsqueeze(-1) == 0, 0.0)  # Wan: context[mask == 0] = 0
        return out.cpu()


def load_text_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    text_len: int = 512,
    tokenizer_path: str | Path | None = None,
) -> UMT5TextEncoder:
    """UMT5TextEncoder from a diffusers Wan root (text_encoder/ + tokenizer/), a plain HF directory, or a
    model directory plus `tokenizer_path` (e.g. ModelDir.text_encoder and ModelDir.tokenizer)."""
    model_dir, tok_dir = find_text_encoder_dirs(path, tokenizer_path)
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{model_dir / 'config.json'} is not valid JSON: {exc}") from None
    if model_type != "umt5":
        raise CheckpointError(
            f"{model_dir / 'config.json'} describes model_type={model_type!r}; Wan's text encoder is umT5 "
            "(model_type 'umt5', UMT5EncoderModel)"
        )
    from transformers import AutoTokenizer, UMT5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"tokenizer {tok_dir} could not be loaded: {exc}") from exc
    try:
        model, info = UMT5EncoderModel.from_pretrained(
            str(model_dir), local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except Exception as exc:
        raise CheckpointError(f"text encoder {model_dir} could not be loaded: {exc}") from exc
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(f"text encoder {model_dir} lacks {len(missing)} weights, e.g. {missing[:5]}")
    return UMT5TextEncoder(model.to(device).eval().requires_grad_(False), tokenizer, text_len)
