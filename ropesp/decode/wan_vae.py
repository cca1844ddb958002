"""Streaming Wan2.1 VAE decoder on diffusers' `AutoencoderKLWan`, and loaders for its two checkpoint formats.

Streaming: diffusers' `AutoencoderKLWan._decode` runs the decoder one latent frame at a time and carries the
causal convolutions' inputs (the last CACHE_T=2 frames of every `WanCausalConv3d`'s input) in a list,
`feat_cache`, indexed by a counter `feat_idx` that each conv advances. The temporal upsamplers mark their
slot "Rep" on the stream's first frame and skip the time conv, so latent frame 0 gives 1 video frame and every
later one gives 4. `WanVAEDecoder` drives the same decoder with the same per-frame calls but keeps that list
between chunks instead of clearing it, so chunked decoding gives exactly the frames of one `vae.decode` of the
whole latent video: 3 latent frames per chunk -> 9, 12, 12, ... frames (81 for 21 latent frames).

Checkpoints (`load_wan_vae`):
- diffusers layout: a directory with config.json + diffusion_pytorch_model.safetensors (`vae/` of a diffusers
  Wan repository; the repository root itself is accepted too);
- original Wan layout: `Wan2.1_VAE.pth` (or a .safetensors file with the same key names, as ComfyUI ships it),
  keys `encoder.conv1.*`, `encoder.downsamples.N.*`, `decoder.middle.N.*`, `decoder.upsamples.N.*`,
  `decoder.head.*`, `conv1.*`, `conv2.*`; renamed with `wan_vae_key_map`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import time
from pathlib import Path

import torch

from ropesp.decode.base import frames_to_host
from ropesp.decode.preview import to_uint8
from ropesp.errors import CheckpointError, read_failure

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"

# Original Wan ResidualBlock: residual = Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout,
# CausalConv3d); shortcut = CausalConv3d(1x1x1) or Identity.
_RESNET_NAMES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}


def _wan_modules():
    """diffusers' Wan VAE classes, imported lazily (diffusers is the optional `vae` extra)."""
    try:
        from diffusers.models.autoencoders import autoencoder_kl_wan as wan
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(f"the Wan VAE needs diffusers (pip install 'ropesp[vae]'): {exc}") from None
    return wan


# --- key renaming --------------------------------------------------------------------------------
def wan_vae_key_map(vae: torch.nn.Module) -> dict[str, str]:
    """diffusers key -> original Wan key for every tensor of `vae` (an AutoencoderKLWan, meta device is fine).

    Derived from the module structure, so it holds for any Wan2.1-style config (any dim_mult /
    num_res_blocks): the decoder's flat `upsamples.N` index counts each up block's resnets, then its
    upsampler. Wan2.2's residual up/down blocks (`is_residual=True`) have no original-format counterpart here.
    """
    wan = _wan_modules()
    if getattr(vae.config, "is_residual", False):
        raise CheckpointError("the original-format key map covers the Wan2.1 VAE only (is_residual=False)")
    up_offsets = []  # flat original index of each decoder up block's first resnet
    n = 0
    for block in vae.decoder.up_blocks:
        if not isinstance(block, wan.WanUpBlock):
            raise CheckpointError(f"unsupported decoder block {type(block).__name__} for the original format")
        up_offsets.append(n)
        n += len(block.resnets) + (1 if block.upsamplers is not None else 0)

    def resnet(rest: str) -> str:
        if rest not in _RESNET_NAMES:
            raise CheckpointError(f"unexpected residual-block tensor {rest!r}")
        return _RESNET_NAMES[rest]

    def rename(key: str) -> str:
        top, _, rest = key.partition(".")
        if top == "quant_conv":
            return f"conv1.{rest}"
        if top == "post_quant_conv":
            return f"conv2.{rest}"
        if top not in ("encoder", "decoder"):
            raise CheckpointError(f"unexpected VAE tensor {key!r}")
        part, _, rest = rest.partition(".")
        if part == "conv_in":
            return f"{top}.conv1.{rest}"
        if part == "norm_out":
            return f"{top}.head.0.{rest}"
        if part == "conv_out":
            return f"{top}.head.2.{rest}"
        if part == "mid_block":  # middle = Sequential(resnet, attention, resnet)
            kind, j, rest = rest.split(".", 2)
            if kind == "resnets":
                return f"{top}.middle.{2 * int(j)}.{resnet(rest)}"
            return f"{top}.middle.{2 * int(j) + 1}.{rest}"  # attentions: norm / to_qkv / proj
        if part == "down_blocks":  # same flat list in both: resnets, (attentions), resamples
            i, rest = rest.split(".", 1)
            module = vae.encoder.down_blocks[int(i)]
            return f"encoder.downsamples.{i}.{resnet(rest) if isinstance(module, wan.WanResidualBlock) else rest}"
        if part == "up_blocks":
            i, kind, j, rest = rest.split(".", 3)
            block = vae.decoder.up_blocks[int(i)]
            if kind == "resnets":
                return f"decoder.upsamples.{up_offsets[int(i)] + int(j)}.{resnet(rest)}"
            if kind == "upsamplers":  # resample.1.* / time_conv.* keep their names
                return f"decoder.upsamples.{up_offsets[int(i)] + len(block.resnets)}.{rest}"
        raise CheckpointError(f"unexpected VAE tensor {key!r}")

    return {key: rename(key) for key in vae.state_dict()}


def original_to_diffusers(state_dict: dict[str, torch.Tensor], vae: torch.nn.Module, source: str) -> dict:
    """Rename an original-format state dict to `vae`'s keys; CheckpointError naming missing/unexpected keys."""
    to_original = wan_vae_key_map(vae)
    missing = sorted(v for v in to_original.values() if v not in state_dict)
    wanted = set(to_original.values())
    unexpected = sorted(k for k in state_dict if k not in wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the Wan2.1 VAE: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    return {new: state_dict[old] for new, old in to_original.items()}


def diffusers_to_original(state_dict: dict[str, torch.Tensor], vae: torch.nn.Module) -> dict:
    """The inverse rename (diffusers keys -> original Wan keys), e.g. to write a Wan2.1_VAE.pth."""
    return {old: state_dict[new] for new, old in wan_vae_key_map(vae).items()}


def infer_original_config(state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """AutoencoderKLWan kwargs from the tensor shapes of an original-format state dict.

    For Wan2.1_VAE.pth this gives base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True] (Wan's `_video_vae` config)."""
    try:
        base_dim = state_dict["encoder.conv1.weight"].shape[0]
        z_dim = state_dict["conv2.weight"].shape[0]
        decoder_out = state_dict["decoder.head.2.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(
            f"{source} is not an original-format Wan VAE: no tensor {exc.args[0]!r}"
        ) from None
    prefix = "encoder.downsamples."
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)})
    stages: list[list[int]] = [[]]  # output channels of each stage's residual blocks
    temporal: list[bool] = []
    for i in indices:
        p = f"{prefix}{i}."
        if p + "residual.2.weight" in state_dict:
            stages[-1].append(state_dict[p + "residual.2.weight"].shape[0])
        elif p + "resample.1.weight" in state_dict:
            temporal.append(p + "time_conv.weight" in state_dict)
            stages.append([])
        else:
            raise CheckpointError(
                f"{source}: encoder.downsamples.{i} is neither a residual block nor a resample"
            )
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(f"{source}: encoder stages have unequal residual block counts {sorted(counts)}")
    dim_mult = [s[-1] // base_dim for s in stages]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": decoder_out // dim_mult[0],
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": counts.pop(),
        "temperal_downsample": temporal,
    }


# --- loading -------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zip (legacy) torch.save format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"VAE checkpoint {path} could not be read: {read_failure(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"VAE checkpoint {path} is not a state dict of tensors (got {type(state).__name__})"
        )
    return state


def _build(config: dict, state: dict[str, torch.Tensor], source: str, original: bool, dtype, device):
    wan = _wan_modules()
    try:
        with torch.device("meta"):
            vae = wan.AutoencoderKLWan.from_config(config) if not original else wan.AutoencoderKLWan(**config)
    except Exception as exc:
        raise CheckpointError(f"{source}: invalid AutoencoderKLWan config: {exc}") from exc
    if original:
        state = original_to_diffusers(state, vae, source)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        raise CheckpointError(f"{source} does not match its config: {exc}") from None
    return vae.to(device=device).eval().requires_grad_(False)


def load_wan_vae(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """An AutoencoderKLWan from a diffusers `vae/` directory (or the repository above it) or an original
    `Wan2.1_VAE.pth` / original-named .safetensors file. Raises CheckpointError naming the path and problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / DIFFUSERS_CONFIG).is_file() and (path / "vae").is_dir():
            path = path / "vae"
        elif not (path / DIFFUSERS_CONFIG).is_file() and (path / ORIGINAL_VAE_FILE).is_file():
            return load_wan_vae(path / ORIGINAL_VAE_FILE, dtype, device)
        config_file, weights = path / DIFFUSERS_CONFIG, path / DIFFUSERS_WEIGHTS
        missing = [p.name for p in (config_file, weights) if not p.is_file()]
        if missing:
            present = sorted(p.name for p in path.iterdir())[:10]
            raise CheckpointError(
                f"VAE directory {path} lacks {missing}; a diffusers Wan VAE directory holds "
                f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS} (found {present})"
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
        if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
            raise CheckpointError(
                f"{config_file} describes a {config['_class_name']}, not an AutoencoderKLWan"
            )
        return _build(config, _read_state_dict(weights), str(weights), False, dtype, device)
    state = _read_state_dict(path)
    if "decoder.conv_in.weight" in state:
        raise CheckpointError(
            f"{path} holds diffusers-named VAE weights without a config: pass its directory "
            f"(with {DIFFUSERS_CONFIG}) instead"
        )
    return _build(infer_original_config(state, str(path)), state, str(path), True, dtype, device)


def set_conv_layout(vae: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Store every convolution weight of `vae` channels-last (Conv3d NDHWC, Conv2d NHWC) or back in the
    default layout, in place; returns `vae`.

    A convolution whose weight is channels-last produces a channels-last output, so the activations
    follow: cuDNN's tensor-core kernels read NDHWC directly instead of transposing every input, and the
    upsamplers' per-frame 2D convolutions see their [B*T, C, H, W] view of an NDHWC tensor as NHWC
    without a copy. The values are unchanged, so decoding gives the same frames up to kernel rounding.
    """
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        elif isinstance(module, torch.nn.Conv2d):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
        else:
            continue
        module.weight.data = module.weight.data.contiguous(memory_format=fmt)
    return vae


# --- streaming decode ----------------------------------------------------------------------------
def decoder_input(
    vae: torch.nn.Module, latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """One chunk's latents [B, F, C, h, w] float32 (normalized, as the DiT produces them) -> the decoder's
    input [B, C', F, h, w] in the VAE's dtype and device: de-normalized, through post_quant_conv.
    ValueError for a shape the VAE cannot take."""
    z_dim = vae.config.z_dim
    if latents.dim() != 5 or latents.shape[2] != z_dim or latents.shape[1] < 1:
        raise ValueError(f"Wan VAE expects latents [B, F, {z_dim}, h, w], got {tuple(latents.shape)}")
    param = next(vae.parameters())
    z = latents.to(param.device, torch.float32).transpose(1, 2)  # [B, C, F, h, w]
    z = z * std.to(z.device) + mean.to(z.device)  # de-normalize
    return vae.post_quant_conv(z.to(param.dtype))


class WanVAEDecoder:
    """StreamDecoder on an AutoencoderKLWan: chunk by chunk, bit-identical to one `vae.decode` of all latents.

    State: one causal-conv feature cache per stream (a list with one slot per WanCausalConv3d of the
    decoder) and whether the stream's first latent frame has been decoded. The VAE's weights are not
    changed (at most their memory layout), so several decoders may share one VAE.

    channels_last: store the convolution weights channels-last (`set_conv_layout`); None = on CUDA, where
    it measured 1.21x faster (bench/RESULTS.md, H200 bf16 832x480; same frames up to bf16 rounding).
    compile: run the decoder through `torch.compile` (Inductor fuses the fp32 RMS norms, SiLUs, paddings
    and cache concatenations around the cuDNN convolutions; the stream's first, second and later latent
    frames need different graphs because their cache states differ, and a graph break compiles each up
    block on its own, hence the raised recompile limit while decoding).
    """

    RECOMPILE_LIMIT = 64

    def __init__(
        self, vae: torch.nn.Module, channels_last: bool | None = None, compile: bool = False
    ) -> None:
        wan = _wan_modules()
        self.vae = vae
        if channels_last is None:
            channels_last = next(vae.parameters()).device.type == "cuda"
        set_conv_layout(vae, channels_last)
        self.compiled = compile
        self._decoder = torch.compile(vae.decoder, dynamic=False) if compile else vae.decoder
        self.num_convs = sum(isinstance(m, wan.WanCausalConv3d) for m in vae.decoder.modules())
        self._takes_first_chunk = "first_chunk" in inspect.signature(vae.decoder.forward).parameters
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.patch_size = getattr(cfg, "patch_size", None)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.reset()

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        compile: bool = False,
    ) -> WanVAEDecoder:
        return cls(load_wan_vae(path, dtype, device), compile=compile)

    @classmethod
    def random(
        cls,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        compile: bool = False,
    ) -> WanVAEDecoder:
        """The full-size Wan2.1 VAE (diffusers' default AutoencoderKLWan config) on seeded random
        weights: for timing decode where no checkpoint is at hand."""
        from diffusers import AutoencoderKLWan

        torch.manual_seed(seed)
        return cls(AutoencoderKLWan().to(device=device, dtype=dtype).eval(), compile=compile)

    @property
    def device(self) -> torch.device:
        """Where it decodes: the VAE's device."""
        return next(self.vae.parameters()).device

    def reset(self) -> None:
        self._feat_cache: list = [None] * self.num_convs
        self._first = True

    def fork(self) -> WanVAEDecoder:
        """A decoder of a new stream on the same VAE and compiled module: its own feature cache (the
        compiled graphs guard on the cache's shapes, not on the list, so the forks share them)."""
        other = copy.copy(self)
        other.reset()
        return other

    def warm_up(
        self, latent_height: int, latent_width: int, chunk_frames: int = 3, streams: int = 2
    ) -> float:
        """Decode `streams` throw-away streams of 3 zero chunks [1, chunk_frames, C, h, w] (the first,
        second and steady cache states), then reset; returns the seconds it took. With compile=True this
        is where the graphs are built, before a video's clock runs (on an H200 the second stream still
        compiled some: bench/RESULTS.md, fourth session)."""
        t0 = time.perf_counter()
        device = self.device
        zeros = torch.zeros(1, chunk_frames, self.z_dim, latent_height, latent_width, device=device)
        for _ in range(streams):
            self.reset()
            for _ in range(3):
                self.decode_video(zeros)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.reset()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 (normalized, as the DiT produces them) of one chunk
        -> video [B, 3, N, 8h, 8w] float32 in [-1, 1], N = 4F (4F - 3 for the stream's first chunk)."""
        x = decoder_input(self.vae, latents, self.latents_mean, self.latents_std)
        out = []
        limits = (
            torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT)
            if self.compiled
            else contextlib.nullcontext()
        )
        with limits:
            for f in range(x.shape[2]):  # one latent frame per call, as AutoencoderKLWan._decode does
                kwargs = {"first_chunk": self._first} if self._takes_first_chunk else {}
                out.append(
                    self._decoder(x[:, :, f : f + 1], feat_cache=self._feat_cache, feat_idx=[0], **kwargs)
                )
                self._first = False
        video = torch.cat(out, dim=2)  # [B, 3, N, H, W]
        if self.patch_size is not None:
            wan = _wan_modules()
            video = wan.unpatchify(video, patch_size=self.patch_size)
        return video.float().clamp_(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 of one chunk -> frames [B, N, 8h, 8w, 3] uint8 (on the CPU)."""
        video = self.decode_video(latents)
        return frames_to_host(to_uint8(video.permute(0, 2, 3, 4, 1)))  # [B, N, H, W, 3]
