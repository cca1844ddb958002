"""The one way every entry point (generate, bench, serving, scripts) gets its stream decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropesp.decode.base import StreamDecoder
from ropesp.decode.preview import PreviewDecoder
from ropesp.errors import ConfigError
from ropesp.settings import RANDOM_WEIGHTS

RANDOM_VAE = RANDOM_WEIGHTS
"""`vae` (or `taehv`) value for the decoder on seeded random weights (timing without a checkpoint)."""


def check_wan_vae_options(wan_vae: bool, compile: bool, decode_device: str | None, how: str) -> None:
    """--vae-compile and --decode-device act on the Wan VAE decoder only: refuse them without it.
    how: how this entry point selects the Wan VAE (e.g. "pass --vae too")."""
    if decode_device and not wan_vae:
        raise ConfigError(f"--decode-device places the Wan VAE decoder: {how}")
    if compile and not wan_vae:
        raise ConfigError(f"--vae-compile compiles the Wan VAE decoder: {how}")


@dataclass(frozen=True)
class WarmUp:
    """The latent size a compiled decoder is built for before the first real chunk."""

    latent_height: int
    latent_width: int
    chunk_frames: int


def make_decoder(
    vae: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    warm_up: WarmUp | None = None,
    fast: bool = False,
    cudnn: bool = False,
    taehv: str | None = None,
) -> StreamDecoder:
    """The preview decoder (vae and taehv None), the streaming Wan VAE (vae: a checkpoint path, or
    RANDOM_VAE) or TAEHV's tiny Wan decoder (taehv: a taew2_1 .pth / .safetensors, or RANDOM_VAE; vae
    then None, and compile, fast and cudnn, which act on the Wan VAE, False).

    dtype: the Wan VAE's or the tiny decoder's weights (default bfloat16 on CUDA, float32 elsewhere). compile: torch.compile
    the Wan VAE; with warm_up its graphs are built here (~2 min on an H200, bench/RESULTS.md), so no video
    or request pays for them. fast: the Wan VAE as `FastWanDecoder` (ropesp/decode/wan_fast.py: in-place
    caches, fused passes, CUDA graphs; the same frames), compile then ignored; with warm_up on CUDA its
    graphs are captured here. cudnn: the fast decoder's convolutions as cuDNN graphs (cudnn_conv.py).
    Raises CheckpointError for an unreadable VAE or tiny decoder.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if taehv is not None:
        assert vae is None and not (compile or fast or cudnn), "the Wan VAE's options with the tiny decoder"
        from ropesp.decode.taehv import TinyWanDecoder

        if taehv == RANDOM_VAE:
            return TinyWanDecoder.random(dtype, device)
        return TinyWanDecoder.from_path(taehv, dtype, device)
    if vae is None:
        return PreviewDecoder(device=device)
    from ropesp.decode.wan_vae import WanVAEDecoder, load_wan_vae

    if fast:
        from ropesp.decode.wan_fast import FastWanDecoder

        if vae == RANDOM_VAE:
            fast_decoder = FastWanDecoder.random(dtype, device, cudnn_graphs=cudnn)
        else:
            fast_decoder = FastWanDecoder(load_wan_vae(vae, dtype, device), cudnn_graphs=cudnn)
        if warm_up is not None and device.type == "cuda":
            fast_decoder.warm_up(warm_up.latent_height, warm_up.latent_width, warm_up.chunk_frames)
        return fast_decoder
    if vae == RANDOM_VAE:
        decoder = WanVAEDecoder.random(dtype, device, compile=compile)
    else:
        decoder = WanVAEDecoder.from_path(vae, dtype, device, compile=compile)
    if compile and warm_up is not None:
        decoder.warm_up(warm_up.latent_height, warm_up.latent_width, warm_up.chunk_frames)
    return decoder
