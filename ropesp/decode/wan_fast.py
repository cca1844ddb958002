"""A faster streaming Wan2.1 VAE decoder on the weights of diffusers' `AutoencoderKLWan`
(`make_decoder(..., fast=True)`).

The same computation as `WanVAEDecoder` (one decoder pass per latent frame, causal caches carried across
chunks: bit for bit the same frames in fp32 on the CPU, tests/decode), organized so that the GPU moves
few bytes besides the convolutions' own:
- every causal convolution reads one preallocated, zero-bordered input buffer [B, C, 2 + T, H + 2, W + 2]
  whose first two frames are its cache: the pass before the convolution writes the new frames into the
  interior, the convolution reads the buffer as it is (no concatenation, no padding copy), and afterwards
  the buffer's last two frames move to the front (2 of 2 + T frames; diffusers copies all 2 + T twice);
- RMS norm + SiLU, and the residual add and the residual blocks' convolution biases before them, are
  one pass that writes straight into that buffer (ropesp/decode/vae_kernels.py; PyTorch would add a
  cuDNN convolution's bias in a pass of its own: 114.5 ms of a 480p video's 839 ms of kernels on an
  H100, bench/notes-40.md); the nearest 2x upsampling (with the time upsampling's frame interleave
  and, before a 2-D upsampler, the residual add) is one pass into the 2-D convolution's padded buffer;
- activations and weights channels-last (cuDNN's NDHWC kernels; every pass reads whole pixel rows);
- on CUDA the per-latent-frame decode is replayed from a CUDA graph (one for the stream's first frame,
  whose upsamplers skip their time convolution, one for every later frame).

State: the caches live in the workspace (buffers + graphs per batch and latent size: 6.3 GB of buffers
at 480p, 14.5 GB at 720p, bf16), shared by every `fork()` of a decoder; each fork's own carried state is
its caches' copy, swapped into the workspace only when another fork decoded there last (1.9 GB each way
at 480p, 4.4 GB at 720p: ~1.3 / 2.9 ms at the H100's 3 TB/s, once per switch, estimated, not timed).
A lock serializes decodes of forks on one workspace.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from ropesp.decode import vae_kernels
from ropesp.decode.base import frames_to_host
from ropesp.decode.cudnn_conv import GraphConvs, torch_conv
from ropesp.decode.preview import to_uint8
from ropesp.decode.vae_kernels import norm_silu_into, upsample_into
from ropesp.decode.wan_vae import _wan_modules, decoder_input, set_conv_layout

CACHE_T = 2
"""Frames of input every causal convolution keeps (diffusers' CACHE_T, its kernels' time extent - 1)."""


def _zeros(shape: tuple[int, ...], like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Zeros [N, C, *spatial] in like's dtype and device; channels last in memory where asked."""
    if not channels_last:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    n, c, *spatial = shape
    order = (0, len(shape) - 1, *range(1, len(shape) - 1))  # [N, *spatial, C] -> [N, C, *spatial]
    return torch.zeros((n, *spatial, c), dtype=like.dtype, device=like.device).permute(order)


def _total(pending: tuple) -> torch.Tensor:
    """x + bias + res of a pending (x, res, bias), materialized (diffusers' order: the convolution's
    output with its bias, then the residual)."""
    x, res, bias = pending
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1, 1)
    return x if res is None else x + res


class CausalConvBuffer:
    """One causal convolution's input: buf [B, C_in, 2 + T_max, H + 2p, W + 2p], frames 0-1 its cache
    (zeros at a stream's start), p its spatial padding (1 for 3x3x3 kernels, 0 for the (3, 1, 1) time
    convolutions); the border stays zero."""

    def __init__(
        self,
        conv: torch.nn.Conv3d,
        batch: int,
        frames: int,
        height: int,
        width: int,
        cl: bool,
        run_conv=torch_conv,
    ):
        self.conv = conv
        self.run_conv = run_conv
        self.pad = conv.kernel_size[1] // 2
        assert conv.kernel_size[0] == CACHE_T + 1 and conv.stride == (1, 1, 1), conv
        p = self.pad
        shape = (batch, conv.in_channels, CACHE_T + frames, height + 2 * p, width + 2 * p)
        self.buf = _zeros(shape, conv.weight, cl)

    def interior(self, frames: int) -> torch.Tensor:
        """The view [B, C_in, frames, H, W] the next input goes to."""
        p = self.pad
        h, w = self.buf.shape[3] - 2 * p, self.buf.shape[4] - 2 * p
        return self.buf[:, :, CACHE_T : CACHE_T + frames, p : p + h, p : p + w]

    def run(self, frames: int, bias: bool = True) -> torch.Tensor:
        """The convolution over cache + interior -> [B, C_out, frames, H, W] (without its bias where
        bias is False: the consumer adds it); then the last two input frames become the cache."""
        out = self.run_conv(
            self.buf[:, :, : CACHE_T + frames], self.conv.weight, self.conv.bias if bias else None
        )
        if frames >= CACHE_T:
            self.buf[:, :, :CACHE_T].copy_(self.buf[:, :, frames : frames + CACHE_T])
        else:  # overlapping ranges: frame by frame, front to back
            for i in range(CACHE_T):
                self.buf[:, :, i].copy_(self.buf[:, :, i + frames])
        return out

    def cache(self) -> torch.Tensor:
        return self.buf[:, :, :CACHE_T]


@dataclass
class StreamState:
    """What one stream carries between chunks: whether its first latent frame is still to come, and its
    caches while another fork's are in the workspace (None: zeros, a fresh stream)."""

    first: bool = True
    saved: list[torch.Tensor] | None = None
    size: tuple[int, int, int] | None = None
    """(B, h, w) of the latents this stream decodes (None: nothing decoded yet)."""


@dataclass
class FrameGraph:
    graph: torch.cuda.CUDAGraph
    x_in: torch.Tensor
    out: torch.Tensor


@dataclass
class Workspace:
    """Every buffer one (B, h, w) needs, its CUDA graphs and the stream whose caches it holds."""

    convs: dict[int, CausalConvBuffer]
    upsample: dict[int, torch.Tensor]
    """id(WanResample) -> its 2-D convolution's padded input [B * T, C, 2h + 2, 2w + 2]."""
    graphs: dict[bool, FrameGraph] = field(default_factory=dict)
    pool: tuple | None = None
    resident: StreamState | None = None

    def caches(self) -> list[torch.Tensor]:
        return [c.cache() for c in self.convs.values()]

    def bind(self, state: StreamState) -> None:
        """Make state's caches the workspace's (saving the resident stream's first)."""
        if self.resident is state:
            return
        if self.resident is not None:
            self.resident.saved = [c.clone() for c in self.caches()]
        for cache, saved in zip(self.caches(), state.saved or [None] * len(self.convs)):
            cache.zero_() if saved is None else cache.copy_(saved)
        state.saved = None
        self.resident = state


class DecodeEngine:
    """What forks share: the VAE, its workspaces (buffers, caches in use, CUDA graphs) and the lock."""

    def __init__(
        self, vae: torch.nn.Module, channels_last: bool, cuda_graphs: bool, cudnn_graphs: bool = False
    ) -> None:
        wan = _wan_modules()
        self.vae, self.decoder = vae, vae.decoder
        if any(isinstance(b, wan.WanResidualUpBlock) for b in self.decoder.up_blocks):
            raise ValueError("the fast decoder covers the Wan2.1 VAE (is_residual=False) only")
        self.wan = wan
        self.channels_last = channels_last
        set_conv_layout(vae, channels_last)
        self.cuda_graphs = cuda_graphs
        self.fuse_bias = vae_kernels.triton is not None and next(vae.parameters()).is_cuda
        """Leave the residual blocks' convolution biases to the fused passes (where those run as kernels;
        on the CPU the convolution adds its bias itself, as diffusers', bit for bit)."""
        device = next(vae.parameters()).device
        self.run_conv = GraphConvs(device) if cudnn_graphs and device.type == "cuda" else torch_conv
        """Every convolution but the 1x1x1 shortcuts: PyTorch's, or cuDNN graphs (cudnn_conv.py)."""
        self.workspaces: dict[tuple[int, int, int], Workspace] = {}
        self.lock = threading.Lock()

    # --- buffers -------------------------------------------------------------------------------
    def workspace(self, batch: int, height: int, width: int) -> Workspace:
        key = (batch, height, width)
        if key not in self.workspaces:
            self.workspaces[key] = self._allocate(batch, height, width)
        return self.workspaces[key]

    def _allocate(self, batch: int, h: int, w: int) -> Workspace:
        """Walk the decoder in forward order, tracking the steady per-latent-frame size (T, H, W)."""
        d, cl = self.decoder, self.channels_last
        convs: dict[int, CausalConvBuffer] = {}
        upsample: dict[int, torch.Tensor] = {}
        t = 1

        def add(conv):
            convs[id(conv)] = CausalConvBuffer(conv, batch, t, h, w, cl, self.run_conv)

        add(d.conv_in)
        for resnet in d.mid_block.resnets:
            add(resnet.conv1)
            add(resnet.conv2)
        for block in d.up_blocks:
            for resnet in block.resnets:
                add(resnet.conv1)
                add(resnet.conv2)
            if block.upsamplers is not None:
                up = block.upsamplers[0]
                if up.mode == "upsample3d":
                    add(up.time_conv)
                    t *= 2
                elif up.mode != "upsample2d":
                    raise ValueError(f"unsupported decoder resample {up.mode!r}")
                shape = (batch * t, up.dim, 2 * h + 2, 2 * w + 2)
                upsample[id(up)] = _zeros(shape, up.resample[1].weight, cl)
                h, w = 2 * h, 2 * w
        add(d.conv_out)
        return Workspace(convs, upsample)

    # --- one latent frame ----------------------------------------------------------------------
    def frame(self, ws: Workspace, x: torch.Tensor, first: bool) -> torch.Tensor:
        """x [B, z, 1, h, w] (after post_quant_conv) -> [B, C_out, T, H, W], T = 1 on the stream's first
        latent frame, else 4 (Wan2.1); the workspace's caches advance."""
        d = self.decoder
        conv_in = ws.convs[id(d.conv_in)]
        conv_in.interior(1).copy_(x)
        # the next input, pending: (x, res, bias) = x + bias + res, each None where absent
        pending = (conv_in.run(1), None, None)
        t = 1
        pending = self._resnet(ws, d.mid_block.resnets[0], pending, t)
        for attention, resnet in zip(d.mid_block.attentions, d.mid_block.resnets[1:]):
            pending = (attention(_total(pending)), None, None)
            pending = self._resnet(ws, resnet, pending, t)
        for block in d.up_blocks:
            for resnet in block.resnets:
                pending = self._resnet(ws, resnet, pending, t)
            if block.upsamplers is not None:
                pending, t = self._upsample(ws, block.upsamplers[0], pending, t, first)
        conv_out = ws.convs[id(d.conv_out)]
        x, res, bias = pending
        norm_silu_into(x, res, d.norm_out, conv_out.interior(t), bias=bias)
        return conv_out.run(t)

    def _resnet(self, ws: Workspace, resnet, pending, t: int):
        """WanResidualBlock: (x, res, bias) -> (conv2 output, shortcut, conv2's bias or None), the sum
        left to its consumer."""
        x, res, bias = pending
        conv1, conv2 = ws.convs[id(resnet.conv1)], ws.convs[id(resnet.conv2)]
        whole = res is not None or bias is not None  # the block's input, needed by its shortcut
        total = norm_silu_into(x, res, resnet.norm1, conv1.interior(t), sum_out=whole, bias=bias)
        x = x if total is None else total
        shortcut = resnet.conv_shortcut(x)  # a 1x1x1 convolution, or Identity
        fused = self.fuse_bias
        h = conv1.run(t, bias=not fused)
        norm_silu_into(h, None, resnet.norm2, conv2.interior(t), bias=conv1.conv.bias if fused else None)
        return conv2.run(t, bias=not fused), shortcut, conv2.conv.bias if fused else None

    def _upsample(self, ws: Workspace, up, pending, t: int, first: bool):
        """WanResample upsample2d / upsample3d: -> ((the 2-D convolution's output, None, None), frames)."""
        x, res, bias = pending
        split = 1
        if up.mode == "upsample3d":
            time_conv = ws.convs[id(up.time_conv)]
            norm_silu_into(x, res, None, time_conv.interior(t), bias=bias)
            if first:  # diffusers' "Rep": the stream's first frame skips the time convolution
                x = time_conv.interior(t)
            else:
                x, split = time_conv.run(t), 2
            res = bias = None
        conv2d = up.resample[1]
        b = x.shape[0]
        frames = t * split
        padded = ws.upsample[id(up)][: b * frames]
        upsample_into(x, res, split, padded[:, :, 1:-1, 1:-1], bias=bias)
        out = self.run_conv(padded, conv2d.weight, conv2d.bias)  # [B * frames, C, 2h, 2w]
        out = out.view(b, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, C, frames, 2h, 2w]
        return (out, None, None), frames

    # --- CUDA graphs -----------------------------------------------------------------------------
    def run_frame(self, ws: Workspace, x: torch.Tensor, first: bool) -> torch.Tensor:
        """One latent frame through the graph for its state (captured on first use), or eagerly. The
        result is valid until the next call."""
        if not (self.cuda_graphs and x.is_cuda):
            return self.frame(ws, x, first)
        graph = ws.graphs.get(first)
        if graph is None:
            graph = ws.graphs[first] = self._capture(ws, x, first)
        graph.x_in.copy_(x)
        graph.graph.replay()
        return graph.out

    def _capture(self, ws: Workspace, x: torch.Tensor, first: bool) -> FrameGraph:
        """Warm up (kernels compiled, cuDNN plans chosen) on a copy of the resident caches, put them
        back, then capture; the capture itself runs nothing, so the caller's replay decodes x."""
        snapshot = [c.clone() for c in ws.caches()]
        self.frame(ws, x, first)
        for cache, saved in zip(ws.caches(), snapshot):
            cache.copy_(saved)
        del snapshot
        torch.cuda.synchronize(x.device)
        x_in = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=ws.pool):
            out = self.frame(ws, x_in, first)
        ws.pool = graph.pool()
        return FrameGraph(graph, x_in, out)


class FastWanDecoder:
    """StreamDecoder on an AutoencoderKLWan with preallocated in-place caches, fused passes and CUDA
    graphs (module docstring); frames equal `WanVAEDecoder`'s (bit for bit in fp32 on the CPU)."""

    def __init__(
        self,
        vae: torch.nn.Module | None = None,
        channels_last: bool | None = None,
        cuda_graphs: bool | None = None,
        engine: DecodeEngine | None = None,
        cudnn_graphs: bool = False,
    ) -> None:
        """vae: an AutoencoderKLWan (eval, no grad); or engine: an existing decoder's (fork).
        channels_last, cuda_graphs: None = on CUDA. cudnn_graphs: the convolutions through cuDNN's graph
        API with the fastest plan per shape (ropesp/decode/cudnn_conv.py; CUDA, half precision, the
        `nvidia-cudnn-frontend` package)."""
        if engine is None:
            if vae is None:
                raise ValueError("FastWanDecoder needs a vae or an engine")
            on_cuda = next(vae.parameters()).device.type == "cuda"
            engine = DecodeEngine(
                vae,
                on_cuda if channels_last is None else channels_last,
                on_cuda if cuda_graphs is None else cuda_graphs,
                cudnn_graphs,
            )
        self.engine = engine
        self.vae = engine.vae
        cfg = self.vae.config
        self.z_dim = cfg.z_dim
        self.patch_size = getattr(cfg, "patch_size", None)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.compiled = False
        self.state = StreamState()

    @classmethod
    def random(
        cls, dtype=torch.float32, device="cpu", seed: int = 0, cudnn_graphs: bool = False
    ) -> FastWanDecoder:
        """The full-size Wan2.1 VAE on seeded random weights (as WanVAEDecoder.random)."""
        from diffusers import AutoencoderKLWan

        torch.manual_seed(seed)
        vae = AutoencoderKLWan().to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(vae, cudnn_graphs=cudnn_graphs)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def fork(self) -> FastWanDecoder:
        """A decoder of its own stream on the same weights, workspaces and CUDA graphs."""
        return FastWanDecoder(engine=self.engine)

    def reset(self) -> None:
        for ws in self.engine.workspaces.values():
            if ws.resident is self.state:
                ws.resident = None
        self.state = StreamState()

    def warm_up(
        self, latent_height: int, latent_width: int, chunk_frames: int = 3, streams: int = 1
    ) -> float:
        """Decode throw-away streams of 2 random chunks on a fork (its graphs are captured here, before
        any video's clock runs); returns the seconds it took. This decoder's own stream is untouched."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, chunk_frames, self.z_dim, latent_height, latent_width, generator=g)
        for _ in range(streams):
            scratch = self.fork()
            for _ in range(2):
                scratch.decode_video(latents)
            scratch.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 (normalized) of one chunk -> video [B, 3, N, 8h, 8w] float32
        in [-1, 1], N = 4F (4F - 3 for the stream's first chunk)."""
        x = decoder_input(self.vae, latents, self.latents_mean, self.latents_std)
        b, _, frames, h, w = x.shape
        state, engine = self.state, self.engine
        if state.size not in (None, (b, h, w)):
            raise ValueError(
                f"latents [B={b}, h={h}, w={w}] in a stream of {state.size}: reset() starts a new stream"
            )
        out = []
        with engine.lock:
            ws = engine.workspace(b, h, w)
            ws.bind(state)
            state.size = (b, h, w)
            for f in range(frames):  # one latent frame per pass, as AutoencoderKLWan._decode
                video = engine.run_frame(ws, x[:, :, f : f + 1], state.first)
                out.append(video.float() if video.dtype != torch.float32 else video.clone())
                state.first = False
        video = torch.cat(out, dim=2)  # [B, 3, N, H, W]
        if self.patch_size is not None:
            video = self.engine.wan.unpatchify(video, patch_size=self.patch_size)
        return video.clamp_(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 of one chunk -> frames [B, N, 8h, 8w, 3] uint8 (on the CPU)."""
        video = self.decode_video(latents)
        return frames_to_host(to_uint8(video.permute(0, 2, 3, 4, 1)))  # [B, N, H, W, 3]
