"""A tiny streaming Wan2.1 decoder: the decoder of TAEHV's `taew2_1` (madebyollin's Tiny AutoEncoder for
Hunyuan/Wan Video, MIT license), a few MB of 2-D convolutions instead of the Wan VAE's 3-D ones.

Architecture (the base decoder for Wan 2.1: 16 latent channels, no patching), an `nn.Sequential` whose
indices are the checkpoint's keys `decoder.{i}.…`:

    0 Clamp (3 tanh(x / 3))   1 conv 16 -> 256   2 ReLU
    3-5 MemBlock 256    6 Upsample 2x   7 TGrow 256 x1    8 conv 256 -> 128 (no bias)
    9-11 MemBlock 128   12 Upsample 2x  13 TGrow 128 x2   14 conv 128 -> 64 (no bias)
    15-17 MemBlock 64   18 Upsample 2x  19 TGrow 64 x2    20 conv 64 -> 64 (no bias)
    21 ReLU   22 conv 64 -> 3

Convolutions are 3x3 (padding 1) on single frames; time enters in two places only. A MemBlock sees its
input at the current time step and, concatenated along channels, its input at the previous time step (zeros
before the stream's first): relu(convs([x_t, x_{t-1}]) + x_t). A TGrow's 1x1 convolution makes `stride`
frames out of each: its output channels [k*C, (k+1)*C) are frame k. So one latent frame becomes 4 video
frames; the stream's first 3 are dropped (causal alignment with the Wan VAE), which leaves 1 + 4*(F-1)
frames, the Wan VAE's count. Latents go in as the DiT makes them (TAEHV was trained on Wan's normalized
latents: no de-normalization); frames come out in [0, 1], an approximation of the Wan VAE's frames.

Streaming: within a chunk every time step goes through each layer at once (the steps batched), and each
MemBlock's previous-step input is the chunk's own input shifted by one step, the first from the carried
state: the last step of that block's input in the previous chunk. Decoding chunk by chunk therefore gives
the frames of one whole-video pass (tests/decode/test_taehv.py).

Checkpoints: TAEHV's `taew2_1.pth` (torch.save of a state dict) or `taew2_1.safetensors`, from the TAEHV
project; the encoder's tensors in them are ignored. A stored TGrow convolution with more output channels
than the decoder's (the first TGrow, time upscaling off) keeps its last frame's channels, as TAEHV does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ropesp.decode.base import frames_to_host
from ropesp.errors import CheckpointError, read_failure

LATENT_CHANNELS = 16
"""Latent channels of Wan 2.1 (the DiT's out_dim): the only ones taew2_1 takes."""
WIDTHS = (256, 128, 64, 64)
"""Channels of the decoder's three stages and of its head."""
TIME_UPSCALE = (1, 2, 2)
"""Frames each stage's TGrow makes of one (taew2_1's decoder_time_upscale (False, True, True))."""
FRAMES_PER_LATENT = 4
"""Video frames per latent frame: the product of TIME_UPSCALE."""
FRAMES_TO_TRIM = FRAMES_PER_LATENT - 1
"""Frames dropped from a stream's start: latent frame 0 gives 1 frame, as in the Wan VAE."""
IMAGE_CHANNELS = 3


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv([x, past]))))) + x): x, past [N, C, H, W], past the block's input at
    the previous time step of each of the N frames. Keys: conv.0, conv.2, conv.4 (the skip is the
    identity: input and output widths are equal in this decoder)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(2 * channels, channels),
            nn.ReLU(inplace=True),
            _conv(channels, channels),
            nn.ReLU(inplace=True),
            _conv(channels, channels),
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(torch.cat([x, past], dim=1)) + x)  # cat: [N, 2C, H, W]


class TGrow(nn.Module):
    """[N*T, C, H, W] -> [N*T*stride, C, H, W]: a 1x1 convolution to stride*C channels, channels
    [k*C, (k+1)*C) of step t becoming step t*stride + k."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)  # [N*T, s*C, H, W] -> [N*T*s, C, H, W]


class TAEHVDecoder(nn.Module):
    """taew2_1's decoder; its state dict has the checkpoint's `decoder.{i}.…` keys."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [Clamp(), _conv(LATENT_CHANNELS, WIDTHS[0]), nn.ReLU(inplace=True)]
        for width, out, stride in zip(WIDTHS[:-1], WIDTHS[1:], TIME_UPSCALE):
            layers += [MemBlock(width), MemBlock(width), MemBlock(width)]
            layers += [nn.Upsample(scale_factor=2), TGrow(width, stride), _conv(width, out, bias=False)]
        layers += [nn.ReLU(inplace=True), _conv(WIDTHS[-1], IMAGE_CHANNELS)]
        self.decoder = nn.Sequential(*layers)

    def forward(
        self, latents: torch.Tensor, past: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """latents: [B, T, 16, h, w] in the weights' dtype; past: per MemBlock (in order) its input at the
        step before this chunk's first, [B, C_k, h_k, w_k], or None at a stream's start (zeros)
        -> (frames [B, 4T, 3, 8h, 8w] in [0, 1], untrimmed; per MemBlock its input at this chunk's last
        step, to pass as `past` with the next chunk)."""
        b = latents.shape[0]
        x = latents.flatten(0, 1)  # [B*T, 16, h, w]
        last: list[torch.Tensor] = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                steps = x.unflatten(0, (b, -1))  # [B, T_k, C, h_k, w_k]
                before = past[len(last)]
                first = torch.zeros_like(steps[:, :1]) if before is None else before.unsqueeze(1)
                shifted = torch.cat([first, steps[:, :-1]], dim=1)  # step t holds step t-1's input
                last.append(steps[:, -1].clone())  # a copy: a view would keep the chunk's activation
                x = layer(x, shifted.flatten(0, 1))  # [B*T_k, C, h_k, w_k]
            else:
                x = layer(x)
        return x.unflatten(0, (b, -1)).clamp_(0, 1), last  # [B, 4T, 3, 8h, 8w]

    def mem_blocks(self) -> int:
        return sum(isinstance(layer, MemBlock) for layer in self.decoder)


# --- checkpoints ---------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, torch.Tensor]:
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "a safetensors file" if safetensors else "a torch.save file (.pth)"
        raise CheckpointError(
            f"TAEHV checkpoint {path} could not be read as {kind}: {read_failure(exc)}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"TAEHV checkpoint {path} is not a state dict (got {type(state).__name__})")
    other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        kind = type(state[other]).__name__
        raise CheckpointError(f"TAEHV checkpoint {path} is not a state dict of tensors ({other!r}: {kind})")
    return state


def decoder_state(state: dict[str, torch.Tensor], model: TAEHVDecoder, source: str) -> dict:
    """The decoder's tensors of a TAEHV state dict, for `model.load_state_dict`: the encoder's dropped, a
    TGrow weight with more output channels than the model's cut to its last ones (the later frames'),
    as TAEHV's own loader does. CheckpointError naming source for a state dict of another decoder."""
    ours = {k: v for k, v in state.items() if k.startswith("decoder.")}
    if not ours:
        shown = ", ".join(sorted(state)[:4]) or "none"
        raise CheckpointError(
            f"{source} holds no decoder.* tensors (keys: {shown}...): not a TAEHV checkpoint"
        )
    stem = ours.get("decoder.1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] != LATENT_CHANNELS:
        raise CheckpointError(
            f"{source} decodes {stem.shape[1]} latent channels: the tiny decoder takes Wan 2.1's "
            f"{LATENT_CHANNELS} (taew2_1; taew2_2 and the other TAEHV files are for other VAEs)"
        )
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in ours:
            rows = layer.conv.weight.shape[0]
            if ours[key].shape[0] > rows:
                ours[key] = ours[key][-rows:]  # the last frame's output channels
    return ours


def load_taehv(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TAEHVDecoder:
    """taew2_1's decoder from a TAEHV `.pth` (tensors only: torch.load(weights_only=True)) or
    `.safetensors` file, in dtype on device. CheckpointError naming the file for a missing or unreadable
    file, or one whose tensors are not taew2_1's decoder."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"TAEHV checkpoint {path} {what} (taew2_1.pth or taew2_1.safetensors)")
    with torch.device("meta"):
        model = TAEHVDecoder()
    state = decoder_state(_read(path), model, str(path))
    state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing or unexpected keys, other shapes
        detail = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"{path} is not taew2_1's decoder (TAEHV for Wan 2.1): {detail}") from None
    return model.to(device).eval().requires_grad_(False)


def random_taehv(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> TAEHVDecoder:
    """taew2_1's decoder on seeded random weights (the global RNG untouched), scaled so its frames are
    neither black nor saturated: He-normal convolutions, each MemBlock's last one at a quarter (its output
    adds to the input), the head's at a twentieth with bias 0.5 (frames of mean ~0.6, std ~0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # no default initialization: every tensor is drawn from g below
        model = TAEHVDecoder()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
                continue
            fan_in = p[0].numel()
            p.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
            if name.endswith("conv.4.weight"):
                p.mul_(0.25)
        head = model.decoder[-1]
        head.weight.mul_(0.05)
        head.bias.fill_(0.5)
    return model.to(device, dtype).eval().requires_grad_(False)


# --- the stream decoder --------------------------------------------------------------------------
class TinyWanDecoder:
    """StreamDecoder on a TAEHVDecoder: chunk by chunk, the frames of one whole-video decode.

    State per stream: each MemBlock's input at the last step decoded (its `past` for the next chunk) and
    whether the stream's first frames are trimmed yet. The module is only read, so forks share it."""

    def __init__(self, model: TAEHVDecoder) -> None:
        self.model = model
        self.reset()

    @classmethod
    def from_path(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> TinyWanDecoder:
        return cls(load_taehv(path, dtype, device))

    @classmethod
    def random(
        cls, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
    ) -> TinyWanDecoder:
        """On seeded random weights (`random_taehv`): for timing decode without a checkpoint."""
        return cls(random_taehv(dtype, device, seed))

    @property
    def device(self) -> torch.device:
        """Where it decodes: the weights' device."""
        return next(self.model.parameters()).device

    def reset(self) -> None:
        self._past: list[torch.Tensor | None] = [None] * self.model.mem_blocks()
        self._started = False

    def fork(self) -> TinyWanDecoder:
        """A decoder of a new stream on the same module, with its own carried state."""
        other = copy.copy(self)
        other.reset()
        return other

    @torch.inference_mode()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, 16, h, w] float32 (as the DiT makes them) of one chunk -> video
        [B, N, 3, 8h, 8w] in [0, 1], in the weights' dtype on their device, N = 4F (4F - 3 for the
        stream's first chunk). ValueError for other shapes."""
        if latents.dim() != 5 or latents.shape[2] != LATENT_CHANNELS or latents.shape[1] < 1:
            raise ValueError(
                f"the tiny decoder expects latents [B, F, {LATENT_CHANNELS}, h, w] with F >= 1, got "
                f"{tuple(latents.shape)}"
            )
        weight = next(self.model.parameters())
        x = latents.to(weight.device, weight.dtype)
        frames, self._past = self.model(x, self._past)
        if not self._started:
            frames = frames[:, FRAMES_TO_TRIM:]
            self._started = True
        return frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, 16, h, w] float32 of one chunk -> frames [B, N, 8h, 8w, 3] uint8 (on the CPU)."""
        video = self.decode_video(latents)
        frames = (video.float() * 255).round().to(torch.uint8)  # [0, 1] -> 0..255
        return frames_to_host(frames.permute(0, 1, 3, 4, 2))  # [B, N, H, W, 3]
