"""`--model-dir DIR`: the parts of a diffusers-layout Wan2.1 repository, with an optional DiT override.

    DIR/transformer/   config.json + diffusion_pytorch_model*.safetensors   (the base Wan DiT)
    DIR/vae/           config.json + diffusion_pytorch_model.safetensors    (or DIR/Wan2.1_VAE.pth)
    DIR/text_encoder/  config.json + model*.safetensors                     (umT5-XXL encoder)
    DIR/tokenizer/     tokenizer.json or spiece.model                       (google/umt5-xxl)

A Self-Forcing checkpoint (`--checkpoint`) replaces the transformer, which is then not required.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ropesp.errors import CheckpointError, arg
from ropesp.text_encoder import TOKENIZER_FILES, has_model_weights

TRANSFORMER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"

FOUND_SHOWN = 12
"""Entries of a wrong --model-dir named in its error."""


@dataclass(frozen=True)
class ModelDir:
    """Resolved paths of a Wan model directory."""

    root: Path
    """The --model-dir given."""
    vae: Path
    """vae/ directory (diffusers) or the original Wan2.1_VAE.pth; for `load_wan_vae`."""
    text_encoder: Path
    """text_encoder/ directory (UMT5EncoderModel)."""
    tokenizer: Path
    """tokenizer/ directory (umT5 tokenizer)."""
    transformer: Path | None
    """transformer/ directory when complete, else None."""
    checkpoint: Path | None
    """Self-Forcing checkpoint that overrides the transformer, if given."""

    @property
    def dit_weights(self) -> Path:
        """Where the DiT comes from: the checkpoint when given, else transformer/."""
        path = self.checkpoint or self.transformer
        assert path is not None, "resolve_model_dir guarantees a transformer or a checkpoint"
        return path


def _check_transformer(d: Path) -> str | None:
    if not d.is_dir():
        return "transformer/ (config.json + diffusion_pytorch_model*.safetensors)"
    lacks = []
    if not (d / "config.json").is_file():
        lacks.append("config.json")
    if not (
        any((d / f).is_file() for f in TRANSFORMER_WEIGHTS)
        or any(d.glob("diffusion_pytorch_model-*.safetensors"))
    ):
        lacks.append("diffusion_pytorch_model*.safetensors")
    return f"transformer/ lacks {' and '.join(lacks)}" if lacks else None


def _check_vae(root: Path) -> tuple[Path | None, str | None]:
    d = root / "vae"
    if d.is_dir():
        lacks = [f for f in VAE_FILES if not (d / f).is_file()]
        return (None, f"vae/ lacks {' and '.join(lacks)}") if lacks else (d, None)
    if (root / ORIGINAL_VAE_FILE).is_file():
        return root / ORIGINAL_VAE_FILE, None
    return None, f"vae/ ({' + '.join(VAE_FILES)}) or {ORIGINAL_VAE_FILE}"


def _check_text_encoder(d: Path) -> str | None:
    if not d.is_dir():
        return "text_encoder/ (config.json + model*.safetensors)"
    lacks = []
    if not (d / "config.json").is_file():
        lacks.append("config.json")
    if not has_model_weights(d):
        lacks.append("model*.safetensors")
    return f"text_encoder/ lacks {' and '.join(lacks)}" if lacks else None


def _check_tokenizer(d: Path) -> str | None:
    if not d.is_dir():
        return f"tokenizer/ ({' or '.join(TOKENIZER_FILES)})"
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return f"tokenizer/ lacks {' or '.join(TOKENIZER_FILES)}"
    return None


def resolve_model_dir(model_dir: str | Path, checkpoint: str | Path | None = None) -> ModelDir:
    """Check DIR's parts and return their paths; CheckpointError listing what was found and what is missing."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{arg('model_dir', root)} does not exist or is not a directory")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.exists():
        raise CheckpointError(f"{arg('checkpoint', ckpt)} does not exist")
    vae, vae_problem = _check_vae(root)
    problems = {
        "vae": vae_problem,
        "text_encoder": _check_text_encoder(root / "text_encoder"),
        "tokenizer": _check_tokenizer(root / "tokenizer"),
    }
    transformer_problem = _check_transformer(root / "transformer")
    if ckpt is None:
        problems["transformer"] = transformer_problem
    missing = [p for p in problems.values() if p]
    if missing:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        found = str(names[:FOUND_SHOWN])  # a wrong directory (a home, /tmp) may hold hundreds
        if len(names) > FOUND_SHOWN:
            found = f"{found[:-1]}, ... (+{len(names) - FOUND_SHOWN} more)]"
        hint = (
            ""
            if ckpt is not None or not transformer_problem
            else f" (or pass {arg('checkpoint')} for the DiT)"
        )
        raise CheckpointError(
            f"{arg('model_dir', root)} is not a complete diffusers Wan2.1 directory: found {found if names else 'nothing'}; "
            f"missing {'; '.join(missing)}{hint}"
        )
    assert vae is not None
    return ModelDir(
        root=root,
        vae=vae,
        text_encoder=root / "text_encoder",
        tokenizer=root / "tokenizer",
        transformer=None if transformer_problem else root / "transformer",
        checkpoint=ckpt,
    )
