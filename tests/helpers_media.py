"""Tiny random media models in the real on-disk formats, for tests (no hub access needed).

- `make_tiny_wan_vae` / `save_wan_vae_diffusers` / `save_wan_vae_original`: a Wan2.1-structured VAE
  (dim_mult [1, 2, 4, 4], 2 residual blocks, z_dim 16) with base_dim 4, in the diffusers `vae/` layout or
  as an original-named `Wan2.1_VAE.pth`.
- `make_tiny_umt5` / `save_text_encoder_dirs`: a 1-layer UMT5 encoder (d_model 32) and a word-level
  tokenizer with T5's special ids (pad 0, eos 1, unk 2), saved as `text_encoder/` + `tokenizer/`.
- `make_model_dir`: a diffusers Wan layout root (transformer/, vae/, text_encoder/, tokenizer/) from these,
  with a placeholder transformer unless one is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VAE_KWARGS = {
    "base_dim": 4,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}
TINY_TEXT_DIM = 32
TINY_VOCAB_SIZE = 300
TINY_WORDS = (
    "a the cat dog red blue green mat park sits runs on in and with under over sky sea tree car "
    "video of slowly fast small big bird flies above city street night day light walks"
).split()


def make_tiny_wan_vae(seed: int = 0):
    """AutoencoderKLWan with Wan2.1's structure at base_dim 4; every tensor random and distinct (norm gammas
    around 1, small biases), so a wrongly renamed key changes the output."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_VAE_KWARGS)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:  # conv weights: keep the default fan-in scale, fresh values
                p.copy_(noise * p.std().clamp_min(1e-3))
    return vae.eval().requires_grad_(False)


def save_wan_vae_diffusers(vae, directory: Path) -> Path:
    """`directory` as diffusers writes it: config.json + diffusion_pytorch_model.safetensors."""
    vae.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def save_wan_vae_original(vae, path: Path) -> Path:
    """The same weights under the original Wan key names, as a torch.save'd state dict (Wan2.1_VAE.pth)."""
    from ropesp.decode.wan_vae import diffusers_to_original

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in diffusers_to_original(vae.state_dict(), vae).items()}
    torch.save(state, path)
    return path


def make_tiny_tokenizer():
    """A word-level fast tokenizer with T5's special tokens, appending </s> like T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_umt5(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(
        vocab_size=TINY_VOCAB_SIZE, d_model=TINY_TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2
    )
    return UMT5EncoderModel(cfg).eval()


def save_text_encoder_dirs(root: Path, seed: int = 0) -> Path:
    """root/text_encoder (config.json + model.safetensors) and root/tokenizer, as in a diffusers Wan repo."""
    root = Path(root)
    make_tiny_umt5(seed).save_pretrained(str(root / "text_encoder"))
    make_tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    return root


def make_model_dir(root: Path, *, transformer: bool = True, vae_seed: int = 0) -> Path:
    """A complete diffusers-layout Wan directory; transformer/ holds a placeholder config + empty weights
    file unless transformer=False (then it is absent)."""
    root = Path(root)
    save_wan_vae_diffusers(make_tiny_wan_vae(vae_seed), root / "vae")
    save_text_encoder_dirs(root)
    if transformer:
        (root / "transformer").mkdir(parents=True)
        (root / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "WanTransformer3DModel"})
        )
        (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return root
