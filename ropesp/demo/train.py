"""Train the demo model on the procedural world, for the runtime's exact inference protocol.

    python -m ropesp.demo.train --out runs/demo --time-limit 255 [--resume runs/demo]
    python -m ropesp.demo.train --resume runs/demo --export ropesp/demo/weights

What `ropesp generate` does per chunk of 3 latent frames (runtime/session.py `_dit_chunks`): 4 denoising
forwards at t = 1000, 937.5, 833.3, 625 (SamplerConfig defaults: steps 1000,750,500,250, shift 5), the
queries of the chunk attending to the KV cache of the earlier chunks and to the chunk itself; then a
clean-context forward of the final x0 at t = 0 whose keys/values replace the chunk's in the cache.

Training reproduces that in one pass per video (teacher forcing): the sequence holds a clean copy of the
video (t = 0) and a noisy copy (each chunk at one of the sampler's timesteps), both with the same RoPE
positions. A block-causal mask lets clean chunk c attend to clean chunks <= c (as its clean-context pass
did) and noisy chunk c attend to clean chunks < c and to itself (as its denoising forwards do against the
cache). The loss is the flow-matching MSE (target eps - x0) on the noisy copy. A fraction of the batches
uses a rolling window (each chunk sees only the previous `--window-chunks` chunks: 1 is the cache a
`--local-attn-frames 6` run keeps), so the model also streams with a window; `--frames` longer than the
demo's 9 teaches it what follows (objects that bounce back, streams that go on). A fraction of the noisy
chunks takes a random timestep of the shifted schedule instead of one of the four, so other `--steps` /
`--shift` still work.

Streams (`--stream-prob`, ropesp/demo/segments.py): the page streams without end under a rolling window
(9 latent frames, 3 of them a sink), and the world goes on (objects reflect, leave, stay gone). Stream
batches cut samples from the world's streams up to `--horizon` frames under the windows of
`--stream-windows`: the sink chunk at RoPE position 0, warm chunks and supervised chunks at their stream
positions, each chunk seeing what the runtime's cache would hold (LongLive's streaming long tuning with
Rolling Forcing's sink; the one-pass forward is tested against the runtime's KV-cache forwards). A share of
them switch the prompt at a chunk (the new prompt's world from there, as `set_prompt` swaps it), and a share
(`--rollout-prob`) take the context from the model's own 4-step samples instead of the world's
(Self-Forcing's training on its own outputs; the world's next chunk stays the target).

    python -m ropesp.demo.train --out runs/stream --init ropesp/demo/weights --stream-prob 0.75 \
        --stream-windows 9/3,9/3,6/0,12/3 --switch-prob 0.15 --rollout-prob 0.5 --edge-weight 3

Why teacher forcing suffices here: every prompt nearly fixes its scene (world.py), so E[x0 | x_t] for the
first chunk is sharp already at t = 1000, and later chunks are fixed by the cached context. The model can
only compute that mean if its tokens know their absolute position: with RoPE alone (every Wan model) the
first chunk's inputs are i.i.d. noise at every position, and the prediction was a position-less haze of
the prompt's colour (bench/2026-12-01-demo/README.md); the demo preset adds a position embedding.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import math
import textwrap
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ropesp.config import ModelConfig, preset
from ropesp.decode.preview import latent_to_rgb
from ropesp.demo.adapter import StreamGates
from ropesp.demo.prompts import DemoTextEncoder, describe
from ropesp.demo.segments import Layout, segment_flow, stream_layout
from ropesp.demo.world import (
    MOTIONS,
    OVERDRIVE,
    all_specs,
    canonical_scene,
    jittered,
    latents_at,
    scene_latents,
    take,
    to_device,
)
from ropesp.model.checkpoint import block_index
from ropesp.model.rope import RopeTables, rotate_pairs
from ropesp.model.wan import CausalWanDiT, LowRankDelta, init_weights, timestep_sinusoid
from ropesp.output_paths import output_dir_problem, write_together
from ropesp.runtime.sampler import FlowSchedule
from ropesp.settings import SamplerConfig

STATE_FILES = ("state_model", "state_ema", "state_adam_m", "state_adam_v")


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of a training run (defaults: the shipped model's)."""

    preset: str = "demo"
    dim: int = 0
    """Model width, a multiple of the preset's head width (32), its FFN as many times wider as the
    preset's (0: the preset's 192). With --num-layers, a larger demo model, trained from scratch (--init
    takes weights of the same size); the runtime runs it as the demo model."""
    num_layers: int = 0
    """Transformer blocks (0: the preset's 4)."""
    batch: int = 48
    """Videos per step."""
    lr: float = 5e-4
    """Peak AdamW learning rate (cosine to lr_floor * lr over --time-limit or --schedule, after warmup)."""
    lr_floor: float = 0.05
    """The cosine schedule's last learning rate, as a share of lr."""
    warmup: int = 300
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    ema: float = 0.999
    """EMA decay of the weights that are shipped."""
    steps: int = 1_000_000
    """Stop after this many steps (the time limit usually comes first)."""
    time_limit_s: float = 270.0
    """Stop and save after this much training time (seconds)."""
    schedule_s: float = 0.0
    """Training seconds the cosine learning-rate schedule spans, counted over resumed runs too, for one
    schedule across runs of a few minutes each (0: every run decays over its own --time-limit)."""
    frames: int = 9
    """Latent frames per training video (the demo preset's 9: 33 video frames, 3 chunks). Longer videos
    (e.g. 21) teach what comes after: moving objects bouncing back, streams that go on."""
    window_prob: float = 0.25
    """Fraction of batches trained with the rolling window."""
    window_chunks: int = 1
    """Earlier chunks a chunk sees in the rolling-window batches (1: `--local-attn-frames 6`; 2: the
    demo page's window of 9 frames without a sink)."""
    random_t_prob: float = 0.15
    """Fraction of noisy chunks at a random timestep of the schedule instead of a sampler step."""
    step_weights: str = ""
    """Relative frequencies of the sampler's steps among the noisy chunks, e.g. "1,1,1,3": the last
    step, whose x0 is the chunk the stream shows, three times as often (empty: uniform)."""
    motion_weights: str = ""
    """Relative frequencies of the prompts' motions (MOTIONS order: moving, bouncing, entering, leaving)
    in the stream batches, e.g. "1,1,1,1": each class as often (empty: every prompt of the grammar as often,
    so bouncing, which has no direction, is 1 prompt in 13)."""
    stream_prob: float = 0.0
    """Fraction of batches cut from long streams under the runtime's rolling window (segments.py); the
    rest are `frames`-frame videos from the start (`window_prob` of them with the one-chunk window)."""
    stream_windows: str = "9/3,6/0,12/3"
    """Rolling windows (latent frames / sink frames, as --local-attn-frames/--sink-frames) that stream
    batches are drawn under, one per batch, uniformly; a window may be listed twice to weigh it more."""
    horizon: int = 240
    """Latent frames of the world's streams that stream batches are cut from."""
    far_prob: float = 0.75
    """Fraction of stream batches that start far into the stream (the sink, warm chunks, then the
    supervised ones); the others run from the stream's start."""
    segment_chunks: int = 3
    """Supervised chunks of a stream sample."""
    warm_chunks: int = 2
    """Context-only chunks before them in a far sample."""
    switch_prob: float = 0.0
    """Fraction of stream batches whose prompt changes at a chunk (the runtime's swap: from there the
    world of the new prompt, started afresh; the cache keeps the old chunks)."""
    rollout_prob: float = 0.0
    """Fraction of stream batches whose context chunks are the model's own 4-step samples (each chunk
    generated, without gradient, from the world's chunks before it), not the world's: it learns to go on
    from what it makes itself (Self-Forcing's point) while the world's next chunk stays the target."""
    edge_weight: float = 1.0
    """Loss weight of the latent pixels whose decoded target lies inside the preview decoder's clamp (the
    objects' anti-aliased edges, where an error shows in the video and decides a square from a disc);
    every other pixel weighs 1 (OVERDRIVE hides its errors up to a third of the range)."""
    stream_weight: float = 1.0
    """Loss weight of a stream batch against a short-video batch's 1 (a stream batch's gradient starts
    10x a short video's; weighting it down slows what the streams teach, and in the CPU probe of
    bench/RESULTS.md did not spare the short videos)."""
    anchor: float = 0.0
    """Pull toward the --init weights after every step (decoupled, as AdamW's weight decay but toward
    the start: each weight moves lr * anchor of its distance back; 0: off; L2-SP). Needs --init. In the
    CPU probe of bench/RESULTS.md it traded stream learning for the short videos as a lower lr does."""
    adapter_rank: int = 0
    """Train only a stream adapter of this rank on the frozen --init weights (ropesp.demo.adapter): low-rank
    deltas of the block linears that the runtime uses from stream frame --adapter-from on, so the frames
    before stay the init model's bit for bit (0: train every weight). Stream batches only (--stream-prob 1)."""
    adapter_from: int = 9
    """First stream latent frame whose chunks take the adapter (9: the length the shipped model learned)."""
    seed: int = 0
    """Seed of the world's videos, the noise and the initial weights."""
    log_every: int = 50
    """Steps between two log lines."""


def compiled_flow():
    """segment_flow through torch.compile: one graph per batch layout (window, sink, far, switch slot)
    and grad mode (training, rollouts), so the recompile limit is raised to hold a stream recipe's few
    dozen."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(segment_flow, dynamic=False)


def model_config(recipe: TrainConfig) -> ModelConfig:
    """The architecture a recipe trains: its preset's at the recipe's width and depth, with the stream
    adapter it asks for; ValueError naming --dim for a width of no whole heads."""
    cfg = preset(recipe.preset)[0]
    if recipe.dim or recipe.num_layers:
        dim, head = recipe.dim or cfg.dim, cfg.dim // cfg.num_heads
        if dim % head:
            raise ValueError(f"--dim {dim}: a multiple of the model's head width {head}")
        cfg = dataclasses.replace(
            cfg,
            dim=dim,
            num_heads=dim // head,
            ffn_dim=dim * cfg.ffn_dim // cfg.dim,
            num_layers=recipe.num_layers or cfg.num_layers,
        )
    if not recipe.adapter_rank:
        return cfg
    return dataclasses.replace(cfg, stream_rank=recipe.adapter_rank, stream_from_frame=recipe.adapter_from)


def parse_window(text: str, chunk: int) -> tuple[int, bool]:
    """'9/3' (--local-attn-frames 9 --sink-frames 3) -> (earlier chunks a chunk sees, whether chunk 0 is
    a sink), for chunks of `chunk` frames; ValueError naming --stream-windows for other windows."""
    try:
        window, _, sink = text.partition("/")
        frames, sink_frames = int(window), int(sink or 0)
    except ValueError:
        raise ValueError(f"--stream-windows {text!r}: write WINDOW/SINK latent frames, e.g. 9/3") from None
    if sink_frames not in (0, chunk) or (frames - sink_frames) % chunk or frames - sink_frames < 2 * chunk:
        raise ValueError(
            f"--stream-windows {text}: the sink must be 0 or one {chunk}-frame chunk, and the rest a whole "
            f"number (>= 2) of chunks, e.g. 9/3, 6/0, 12/3"
        )
    return (frames - sink_frames) // chunk - 1, bool(sink_frames)


def relative_weights(text: str, count: int, flag: str, each: str) -> list[float]:
    """'1,1,1,3' -> [1.0, 1.0, 1.0, 3.0]: `count` weights >= 0, not all 0; ValueError naming `flag` (and
    what one weight is for, `each`) otherwise."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != count or min(weights) < 0 or not sum(weights):
        raise ValueError(f"{flag} {text}: {count} weights >= 0, {each}")
    return weights


def motion_spec_weights(specs: list, text: str) -> torch.Tensor:
    """[len(specs)] float32 sampling weights giving each motion of MOTIONS the share `text` asks for
    ("1,4,1,1"; empty: uniform over the specs); ValueError naming --motion-weights otherwise."""
    if not text:
        return torch.ones(len(specs))
    weights = relative_weights(
        text, len(MOTIONS), "--motion-weights", f"one per motion ({', '.join(MOTIONS)})"
    )
    per_motion = {m: sum(s.motion == m for s in specs) for m in MOTIONS}
    share = dict(zip(MOTIONS, weights))
    return torch.tensor([share[s.motion] / per_motion[s.motion] for s in specs])


@dataclass(frozen=True)
class Batch:
    """One training batch (segments.py): clean and noisy slots, targets and the layout."""

    clean: torch.Tensor
    """[B, clean*chunk, C, h, w]: the context the cache would hold (the world's or the model's own)."""
    noisy: torch.Tensor
    """[B, noisy*chunk, C, h, w]: the supervised chunks at their timesteps."""
    x0: torch.Tensor
    """[B, noisy*chunk, C, h, w]: the world's supervised chunks."""
    eps: torch.Tensor
    t: torch.Tensor
    """[B, noisy*chunk] timesteps."""
    idx: torch.Tensor
    """[B, noisy] sampler step of each supervised chunk (-1: a random timestep)."""
    prompts: torch.Tensor
    layout: Layout
    chunks: torch.Tensor
    """[B, clean] stream chunk of every clean slot."""
    switch: tuple[torch.Tensor, int] | None = None


def block_mask(
    frames: int, frame_tokens: int, chunk: int, context_chunks: int | None, device
) -> torch.Tensor:
    """Boolean attention mask [2L, 2L] (True = attend) over [clean copy | noisy copy], L = frames*frame_tokens.

    context_chunks: how many earlier chunks a chunk sees (None: all), the rolling window's reach."""
    chunk_of = torch.arange(frames, device=device).repeat_interleave(frame_tokens) // chunk  # [L]
    q, k = chunk_of[:, None], chunk_of[None, :]
    reach = torch.ones_like(q - k, dtype=torch.bool) if context_chunks is None else (q - k) <= context_chunks
    clean_clean = (k <= q) & reach
    noisy_clean = (k < q) & reach
    noisy_noisy = k == q
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def teacher_forcing_flow(
    model: CausalWanDiT,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    t_noisy: torch.Tensor,
    prompt_embeds: torch.Tensor,
    mask: torch.Tensor,
    tables: RopeTables,
) -> torch.Tensor:
    """Flow prediction [B, F, C, H, W] for the noisy copy, every chunk in one pass.

    clean, noisy: [B, F, C, H, W] latents; t_noisy: [B, F] timesteps of the noisy frames (the clean copy
    is at t = 0); prompt_embeds: [B, Lt, text_dim]; mask: `block_mask`; tables: RoPE for the grid."""
    b, frames, _, height, width = clean.shape
    cfg = model.cfg
    rows, cols = height // cfg.patch_size[1], width // cfg.patch_size[2]
    length = frames * rows * cols
    tokens = model.patchify(torch.cat([clean, noisy], dim=1))  # [B, 2L, C]: clean copy, noisy copy
    t_all = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)  # [B, 2F]
    e, e0 = model.embed_time(timestep_sinusoid(t_all.flatten(), cfg.freq_dim).view(b, 2 * frames, -1))
    frame_of_token = torch.arange(2 * length, device=clean.device) // (rows * cols)  # [2L] over 2F frames
    cos, sin = tables.cos_sin(0, 0, length, frames, rows, cols)  # both copies share the positions
    cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])

    def rope(x: torch.Tensor) -> torch.Tensor:
        return rotate_pairs(x, cos, sin)

    cross = model.cross_kv(prompt_embeds)
    for i, block in enumerate(model.blocks):
        q, k, v = block.pre_attention(tokens, e0, frame_of_token, rope)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        tokens = block.post_attention(tokens, o, e0, frame_of_token, *cross[i])
    out = model.head(tokens[:, length:], e[:, frame_of_token[length:]])
    return model.unpatchify(out.float(), frames, rows, cols)


class Trainer:
    """Model, EMA, optimizer and the world's data on one device."""

    def __init__(self, cfg: TrainConfig, device: torch.device, compiled: bool = False) -> None:
        """compiled: the training forward and the rollouts' sampling forwards through torch.compile (the
        same function, fused: a graph per batch layout and grad mode; see `compiled_flow`)."""
        self.cfg, self.device = cfg, device
        if why := recipe_problem(cfg):
            raise ValueError(why)
        if cfg.adapter_rank < 0 or cfg.adapter_from < 1:
            raise ValueError(
                f"--adapter-rank {cfg.adapter_rank} / --adapter-from {cfg.adapter_from}: a rank >= 0 "
                "(0: no adapter) and a first frame >= 1"
            )
        if cfg.adapter_rank and cfg.stream_prob != 1:
            raise ValueError(
                f"--adapter-rank {cfg.adapter_rank} learns from stream batches only (short videos never "
                f"reach --adapter-from): pass --stream-prob 1, not {cfg.stream_prob}"
            )
        self.model_cfg = model_config(cfg)
        defaults = preset(cfg.preset)[1]
        self.frames = cfg.frames
        self.height, self.width = defaults.latent_height, defaults.latent_width
        self.rows = self.height // self.model_cfg.patch_size[1]
        self.cols = self.width // self.model_cfg.patch_size[2]
        self.sampler = SamplerConfig()
        self.chunk = self.sampler.chunk_frames
        if cfg.frames < self.chunk or cfg.frames % self.chunk:
            raise ValueError(f"--frames {cfg.frames}: a whole number of {self.chunk}-frame chunks")
        if not 1 <= cfg.window_chunks < cfg.frames // self.chunk:
            raise ValueError(
                f"--window-chunks {cfg.window_chunks}: 1 to {cfg.frames // self.chunk - 1} for {cfg.frames} frames"
            )
        schedule = FlowSchedule(self.sampler)
        self.step_t = schedule.timesteps.to(device)  # [4] float32
        self.step_sigmas = schedule.step_sigmas
        self.step_sigma = torch.tensor(self.step_sigmas, device=device)
        self.all_t = schedule.all_timesteps.to(device)
        self.all_sigma = schedule.sigmas.to(device)
        torch.manual_seed(cfg.seed)
        self.model = CausalWanDiT(self.model_cfg)
        init_weights(self.model, cfg.seed)
        with torch.no_grad():  # start from a zero flow prediction
            self.model.head.head.weight.zero_()
            self.model.head.head.bias.zero_()
        for block in self.model.blocks:
            # the inference FFN fuses Linear + GELU into one cuBLASLt epilogue op that has no backward;
            # training runs the same two modules unfused (same function)
            block.ffn.forward = types.MethodType(torch.nn.Sequential.forward, block.ffn)
        self.gates: StreamGates | None = None
        """The stream adapter's training form (--adapter-rank): only its deltas train."""
        if cfg.adapter_rank:
            self.model.requires_grad_(False)
            for delta in self.model.stream_adapter.modules():
                if isinstance(delta, LowRankDelta):
                    delta.reset_parameters()  # zero: the init model's output
                    delta.requires_grad_(True)
            self.gates = StreamGates.install(self.model)
        self.model.to(device)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.dim() < 2 or "norm" in name or "modulation" in name or name.endswith(".pos")
            (no_decay if plain else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.99),
            fused=device.type == "cuda",
        )
        self.step = 0
        self.curve: list[dict] = []
        self.elapsed_before = 0.0
        self.init_info: dict[str, str] | None = None
        self.specs = all_specs()
        encoder = DemoTextEncoder(self.model_cfg.text_len, self.model_cfg.text_dim)
        self.prompts = torch.stack([encoder.encode(describe(s)) for s in self.specs]).to(device)
        self.scenes = to_device(canonical_scene(self.specs, self.height, self.width), device)
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 1)
        self.host_generator = torch.Generator().manual_seed(cfg.seed + 2)
        self.step_weights = None
        if cfg.step_weights:
            weights = relative_weights(
                cfg.step_weights, len(self.step_t), "--step-weights", "one per sampler step"
            )
            self.step_weights = torch.tensor(weights, device=device)
        self.stream_spec_p = motion_spec_weights(self.specs, cfg.motion_weights).to(device)
        if cfg.schedule_s < 0:
            raise ValueError(
                f"--schedule {cfg.schedule_s}: training seconds >= 0 (0: each run's --time-limit)"
            )
        if cfg.anchor < 0:
            raise ValueError(f"--anchor {cfg.anchor}: a pull >= 0 (0: off)")
        self.anchor: list[torch.Tensor] | None = None
        """The --init weights, in parameter order, that --anchor pulls toward."""
        if not cfg.stream_weight > 0:
            raise ValueError(f"--stream-weight {cfg.stream_weight}: a loss weight above 0")
        self.windows = [parse_window(w, self.chunk) for w in cfg.stream_windows.split(",")]
        self.horizon_chunks = cfg.horizon // self.chunk
        run = cfg.warm_chunks + cfg.segment_chunks
        need = max(context for context, _ in self.windows) + 1 + run
        if cfg.segment_chunks < 1 or cfg.warm_chunks < max(context for context, _ in self.windows):
            raise ValueError(
                f"--segment-chunks {cfg.segment_chunks} / --warm-chunks {cfg.warm_chunks}: at least 1 "
                "supervised chunk, and as many warm chunks as the widest window's earlier chunks"
            )
        if self.horizon_chunks < need:
            raise ValueError(f"--horizon {cfg.horizon}: at least {need * self.chunk} latent frames")
        self.layouts: dict[tuple, Layout] = {}
        self.flow = compiled_flow() if compiled else segment_flow
        """The model's forward over a batch layout, for training and for the rollouts
        (segments.segment_flow, or its compiled form)."""

    def layout(self, window: int | None, sink: bool, far: bool, warm: int, supervised: int) -> Layout:
        """The (cached) segments.stream_layout of a sample."""
        key = (window, sink, far, warm, supervised)
        if key not in self.layouts:
            self.layouts[key] = stream_layout(window, sink, warm, supervised, far)
        return self.layouts[key]

    def stream_layout(self, window: int, sink: bool, far: bool) -> Layout:
        """A stream batch's layout: far, the warm chunks and the supervised ones; from the start, as many
        chunks, all supervised."""
        cfg = self.cfg
        if far:
            return self.layout(window, sink, True, cfg.warm_chunks, cfg.segment_chunks)
        return self.layout(window, sink, False, 0, cfg.warm_chunks + cfg.segment_chunks)

    # --- state ------------------------------------------------------------------------------
    def save(self, out: Path) -> None:
        """The training state in out (STATE_FILES, state_anchor with --anchor, train.json), replacing
        an earlier one whole: a failure or an interrupt while saving leaves that one as it was."""
        sd = {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}
        ema = {k: v.cpu().contiguous() for k, v in self.ema.items()}
        names = {p: n for n, p in self.model.named_parameters()}
        m, v = {}, {}
        for p, st in self.opt.state.items():
            m[names[p]] = st["exp_avg"].float().cpu().contiguous()
            v[names[p]] = st["exp_avg_sq"].float().cpu().contiguous()
        tensors = {"state_model": sd, "state_ema": ema, "state_adam_m": m, "state_adam_v": v}
        if self.anchor is not None:
            tensors["state_anchor"] = {
                n: a.cpu().contiguous() for (n, _), a in zip(self.model.named_parameters(), self.anchor)
            }
        meta = {
            "recipe": asdict(self.cfg),
            "init": self.init_info,
            "step": self.step,
            "train_seconds": self.elapsed_before,
            "curve": self.curve,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        writers = {f"{k}.safetensors": functools.partial(save_file, t) for k, t in tensors.items()}
        writers["train.json"] = lambda path: path.write_text(json.dumps(meta, indent=1))
        write_together(out, writers)

    def init_from(self, checkpoint: Path, base_only: bool = False) -> None:
        """Start model and EMA from a checkpoint's weights (fresh optimizer and schedule): continues an
        exported run whose optimizer state is gone. base_only: leave the checkpoint's stream adapter out
        (a fresh adapter, or a fine-tune of the model under it). An adapter of a lower rank than the
        recipe's grows into it (`grown`: the same function, more capacity to train); so does a model of
        fewer blocks (--num-layers above the checkpoint's): its blocks first, then blocks that add nothing
        (`silence_block`) until they have trained."""
        with safe_open(checkpoint / WEIGHTS_NAME, "pt", device=str(self.device)) as f:
            keys = [k for k in f.keys() if not (base_only and k.startswith("stream_adapter."))]
            sd = {k: f.get_tensor(k).float() for k in keys}
            info = f.metadata() or {}
        fresh = {k for k in self.model.state_dict() if k.startswith("stream_adapter.")}
        if any(k.startswith("stream_adapter.") for k in sd) and not fresh:
            raise ValueError(
                f"--init {checkpoint} holds a stream adapter: train it on with --adapter-rank (and "
                "--stream-prob 1), or fine-tune the model under it with --init-base-only"
            )
        width = sd["head.head.weight"].shape[1] if "head.head.weight" in sd else self.model_cfg.dim
        depth = 1 + max((i for k in sd if (i := block_index(k)) is not None), default=-1)
        if width != self.model_cfg.dim:
            raise ValueError(
                f"--init {checkpoint} is a model of dim {width}, this recipe's is dim {self.model_cfg.dim}: "
                f"pass --dim {width} (a wider model starts from scratch)"
            )
        if depth > self.model_cfg.num_layers:
            raise ValueError(
                f"--init {checkpoint} has {depth} blocks, more than this recipe's model ({self.size}): "
                f"pass --num-layers {depth} or more"
            )
        added = range(depth, self.model_cfg.num_layers) if 0 < depth else range(0)
        fresh |= {k for k in self.model.state_dict() if block_index(k) in added}
        own = self.model.state_dict()
        for key, value in sd.items():
            if key.startswith("stream_adapter.") and key in own and grows(value, own[key]):
                sd[key] = grown(value, own[key])
        try:
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches, e.g. an adapter of another rank
            lines = str(exc).strip().splitlines()
            raise ValueError(f"--init {checkpoint}: {lines[-1].strip()} ({self.size})") from None
        if unexpected or set(missing) - fresh:
            raise ValueError(
                f"--init {checkpoint} does not fit this recipe's model ({self.size}): missing "
                f"{sorted(set(missing) - fresh)[:4]}, unexpected {sorted(unexpected)[:4]}"
            )
        for i in added:
            silence_block(self.model.blocks[i])
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.init_info = {"checkpoint": checkpoint.name, **info}
        if added:
            self.init_info["grown_from_layers"] = str(depth)
        if self.cfg.anchor > 0:
            self.anchor = [p.detach().clone() for p in self.model.parameters()]

    @property
    def size(self) -> str:
        """The trained model's size, for messages: "demo, dim 192, 4 layers"."""
        return f"{self.cfg.preset}, dim {self.model_cfg.dim}, {self.model_cfg.num_layers} layers"

    def load(self, src: Path) -> None:
        self.model.load_state_dict(load_file(src / "state_model.safetensors", device=str(self.device)))
        self.ema = load_file(src / "state_ema.safetensors", device=str(self.device))
        m = load_file(src / "state_adam_m.safetensors", device=str(self.device))
        v = load_file(src / "state_adam_v.safetensors", device=str(self.device))
        meta = json.loads((src / "train.json").read_text())
        self.step, self.curve = meta["step"], meta["curve"]
        self.elapsed_before = meta["train_seconds"]
        self.init_info = meta.get("init")
        if self.cfg.anchor > 0 and (src / "state_anchor.safetensors").exists():
            anchor = load_file(src / "state_anchor.safetensors", device=str(self.device))
            self.anchor = [anchor[n] for n, _ in self.model.named_parameters()]
        # a resumed run draws other videos and noise than the run it continues
        self.generator.manual_seed(self.cfg.seed + 1 + 7919 * self.step)
        self.host_generator.manual_seed(self.cfg.seed + 2 + 7919 * self.step)
        for group in self.opt.param_groups:
            for p in group["params"]:
                name = next(n for n, q in self.model.named_parameters() if q is p)
                self.opt.state[p] = {
                    # fused AdamW keeps its step counts on the parameters' device
                    "step": torch.tensor(
                        float(self.step), device=p.device if self.opt.defaults["fused"] else None
                    ),
                    "exp_avg": m[name].to(p.dtype),
                    "exp_avg_sq": v[name].to(p.dtype),
                }

    # --- one step ---------------------------------------------------------------------------
    def coin(self, p: float) -> bool:
        """A batch-level decision, drawn on the host (no device sync)."""
        return float(torch.rand((), generator=self.host_generator)) < p

    def pick(self, lo: int, hi: int) -> int:
        """A batch-level integer in [lo, hi), drawn on the host."""
        return int(torch.randint(lo, hi, (), generator=self.host_generator))

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x_t, t [B, F], sampler-step index per chunk [B, n] (-1: random t), eps) for targets x0."""
        b, g = x0.shape[0], self.generator
        chunks = x0.shape[1] // self.chunk
        if self.step_weights is None:
            idx = torch.randint(len(self.step_t), (b, chunks), generator=g, device=self.device)
        else:
            idx = torch.multinomial(self.step_weights, b * chunks, replacement=True, generator=g).view(
                b, chunks
            )
        t, sigma = self.step_t[idx], self.step_sigma[idx]
        rnd = torch.rand(b, chunks, generator=g, device=self.device) < self.cfg.random_t_prob
        j = torch.randint(len(self.all_t), (b, chunks), generator=g, device=self.device)
        t = torch.where(rnd, self.all_t[j], t)
        sigma = torch.where(rnd, self.all_sigma[j], sigma)
        idx = torch.where(rnd, -1, idx)
        t_f = t.repeat_interleave(self.chunk, dim=1)  # [B, F]
        s_f = sigma.repeat_interleave(self.chunk, dim=1)[:, :, None, None, None]
        eps = torch.randn(x0.shape, generator=g, device=self.device)
        return (1 - s_f) * x0 + s_f * eps, t_f, idx, eps

    def video_batch(self) -> Batch:
        """`frames`-frame videos from the start, under global attention or (window_prob) the window of
        `window_chunks` earlier chunks without a sink (the shipped model's recipe)."""
        b, g = self.cfg.batch, self.generator
        ids = torch.randint(len(self.specs), (b,), generator=g, device=self.device)
        x0 = scene_latents(jittered(take(self.scenes, ids), g), self.frames, OVERDRIVE)  # [B, F, 16, h, w]
        noisy, t_f, idx, eps = self.noised(x0)
        window = self.cfg.window_chunks if self.coin(self.cfg.window_prob) else None
        layout = self.layout(window, False, False, 0, self.frames // self.chunk)
        chunks = layout.chunk_numbers(torch.zeros(b, dtype=torch.long, device=self.device))
        return Batch(x0, noisy, x0, eps, t_f, idx, self.prompts[ids], layout, chunks)

    def stream_batch(self) -> Batch:
        """Samples of the world's long streams under one of `stream_windows` (segments.py): from the
        start, or (far_prob) at a random chunk up to `horizon` with the sink and warm chunks before the
        supervised ones; with a prompt switch (switch_prob) and the model's own context (rollout_prob)."""
        cfg, g, b, dev = self.cfg, self.generator, self.cfg.batch, self.device
        window, sink = self.windows[self.pick(0, len(self.windows))]
        far = self.coin(cfg.far_prob)
        layout = self.stream_layout(window, sink, far)
        ids = self.stream_prompts(b)
        first = torch.zeros(b, dtype=torch.long, device=dev)
        if far:  # the window of the first run chunk stays clear of chunk 0
            run = cfg.warm_chunks + cfg.segment_chunks
            first = torch.randint(window + 1, self.horizon_chunks - run + 1, (b,), generator=g, device=dev)
        chunks = layout.chunk_numbers(first)  # [B, clean]
        clean = latents_at(jittered(take(self.scenes, ids), g), self.frame_times(chunks), OVERDRIVE)
        switch = None
        if cfg.switch_prob and self.coin(cfg.switch_prob):
            lo = max(1, layout.clean - layout.noisy)  # the first supervised chunk, never chunk 0
            slot = self.pick(lo, layout.clean)
            other = self.stream_prompts(b)
            since = (chunks - chunks[:, slot : slot + 1]).clamp_min(0)  # the new world starts afresh
            fresh = latents_at(jittered(take(self.scenes, other), g), self.frame_times(since), OVERDRIVE)
            after = (torch.arange(layout.clean, device=dev) >= slot).repeat_interleave(self.chunk)
            clean = torch.where(after[None, :, None, None, None], fresh, clean)
            switch = (self.prompts[other], slot)
        x0 = clean[:, (layout.clean - layout.noisy) * self.chunk :]  # the world's supervised chunks
        prompts = self.prompts[ids]
        if cfg.rollout_prob and self.coin(cfg.rollout_prob):
            clean = self.own_context(clean, prompts, window, sink, far, chunks, switch)
        noisy, t_f, idx, eps = self.noised(x0)
        return Batch(clean, noisy, x0, eps, t_f, idx, prompts, layout, chunks, switch)

    def stream_prompts(self, b: int) -> torch.Tensor:
        """[b] indices into `specs` drawn by `motion_weights`."""
        return torch.multinomial(self.stream_spec_p, b, replacement=True, generator=self.generator)

    def frame_times(self, chunks: torch.Tensor) -> torch.Tensor:
        """Latent frames [B, n*chunk] of stream chunks [B, n]."""
        offsets = torch.arange(self.chunk, device=chunks.device)
        return (chunks[:, :, None] * self.chunk + offsets).flatten(1)

    @torch.no_grad()
    def own_context(self, clean, prompts, window, sink, far, chunks, switch) -> torch.Tensor:
        """clean [B, clean*chunk, ...] with every run chunk whose window the sample holds whole (and that
        is not chunk 0) replaced by the model's own 4-step sample of it, generated as the runtime does
        (the sampler's steps and re-noising) against the world's chunks before it."""
        b, dev = clean.shape[0], self.device
        run = self.cfg.warm_chunks + self.cfg.segment_chunks
        sampling = self.layout(window, sink, far, 0, run)  # every run chunk noisy too
        x = torch.randn((b, run * self.chunk, *clean.shape[2:]), generator=self.generator, device=dev)
        x0 = x
        sigmas = self.step_sigmas
        for i, t in enumerate(self.step_t):
            with self.autocast():
                flow = self.flow(
                    self.model,
                    clean,
                    x,
                    t.expand(b, run * self.chunk),
                    prompts,
                    sampling,
                    chunks,
                    switch,
                    self.gates,
                )
            x0 = FlowSchedule.to_x0(x, flow, sigmas[i])
            if i + 1 < len(sigmas):
                eps = torch.randn(x.shape, generator=self.generator, device=dev)
                x = FlowSchedule.add_noise(x0, eps, sigmas[i + 1])
        keep = (window if far else 1) * self.chunk  # run chunks before this see less than the stream did
        out = clean.clone()
        out[:, out.shape[1] - x0.shape[1] + keep :] = x0[:, keep:]
        return out

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def train_step(self, elapsed: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """One optimizer step: (loss, per-chunk loss [B, n], sampler step of each chunk [B, n], whether
        the batch came from streams)."""
        return self.learn(*self.draw(), elapsed)

    def draw(self) -> tuple[Batch, bool]:
        """The next batch (with the model's own context where the recipe asks) and whether it came
        from streams."""
        stream = self.cfg.stream_prob > 0 and self.coin(self.cfg.stream_prob)
        return (self.stream_batch() if stream else self.video_batch()), stream

    def learn(
        self, batch: Batch, stream: bool, elapsed: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Forward, backward, optimizer and EMA on one batch (`train_step`'s result)."""
        lr = self.lr_at(elapsed)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast():
            flow = self.flow(
                self.model,
                batch.clean,
                batch.noisy,
                batch.t,
                batch.prompts,
                batch.layout,
                batch.chunks,
                batch.switch,
                self.gates,
            )
        err = (flow - (batch.eps - batch.x0)).pow(2).mean(dim=2)  # [B, F, h, w]
        if self.cfg.edge_weight != 1.0:
            edges = (latent_to_rgb(batch.x0).abs() < 1).any(dim=-1)  # [B, F, h, w]: not clamped
            err = err * (1 + (self.cfg.edge_weight - 1) * edges)
        err = err.mean(dim=(2, 3))  # [B, F]
        loss = err.mean()
        weighted = loss * self.cfg.stream_weight if stream else loss
        self.opt.zero_grad(set_to_none=True)
        weighted.backward()
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # before clipping
        self.opt.step()
        if self.anchor is not None:
            with torch.no_grad():
                pull = min(1.0, lr * self.cfg.anchor)
                for param, start in zip(self.model.parameters(), self.anchor):
                    param.lerp_(start, pull)
        self.step += 1
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            sd = self.model.state_dict()
            torch._foreach_lerp_([self.ema[k] for k in sd], [v.float() for v in sd.values()], 1 - decay)
        per_chunk = err.view(err.shape[0], -1, self.chunk).mean(dim=2)  # [B, n]
        return loss, per_chunk.detach(), batch.idx, stream

    def lr_at(self, elapsed: float) -> float:
        cfg = self.cfg
        if self.step < cfg.warmup:
            return cfg.lr * (self.step + 1) / cfg.warmup
        if cfg.schedule_s > 0:
            frac = min(1.0, (self.elapsed_before + elapsed) / cfg.schedule_s)
        else:
            frac = min(1.0, elapsed / cfg.time_limit_s)
        return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def run(self, out: Path) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        sums = torch.zeros(len(self.step_t) + 1, device=self.device)
        counts = torch.zeros_like(sums)
        total = torch.zeros((), device=self.device)
        streamed = torch.zeros((), device=self.device)
        norms = torch.zeros(2, device=self.device)  # summed gradient norms: video batches, stream batches
        n = n_stream = 0
        try:
            while self.step < cfg.steps:
                elapsed = time.perf_counter() - t0
                if elapsed >= cfg.time_limit_s:
                    break
                loss, per_chunk, idx, stream = self.train_step(elapsed)
                total += loss.detach()
                norms[int(stream)] += self.grad_norm.detach()
                n += 1
                if stream:
                    streamed += loss.detach()
                    n_stream += 1
                slot = torch.where(idx < 0, len(self.step_t), idx).flatten()
                sums.index_add_(0, slot, per_chunk.flatten())
                counts.index_add_(0, slot, torch.ones_like(per_chunk.flatten()))
                if self.step % cfg.log_every == 0:
                    per_t = (sums / counts.clamp_min(1)).tolist()
                    row = {
                        "step": self.step,
                        "seconds": round(self.elapsed_before + time.perf_counter() - t0, 1),
                        "loss": round(float(total) / n, 5),
                        "loss_per_step_t": [round(x, 5) for x in per_t[:-1]],
                        "lr": self.lr_at(elapsed),
                    }
                    if n > n_stream:
                        row["grad_norm"] = round(float(norms[0]) / (n - n_stream), 4)
                    if n_stream:
                        row["loss_stream"] = round(float(streamed) / n_stream, 5)
                        row["grad_norm_stream"] = round(float(norms[1]) / n_stream, 4)
                    self.curve.append(row)
                    print(json.dumps(row), flush=True)
                    sums.zero_()
                    counts.zero_()
                    total.zero_()
                    streamed.zero_()
                    norms.zero_()
                    n = n_stream = 0
        except KeyboardInterrupt:  # Ctrl-C ends the run as its time limit would: saved, resumable
            print(f"interrupted: saving step {self.step}", flush=True)
        self.elapsed_before += time.perf_counter() - t0
        self.save(out)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


RECIPE_RANGES: dict[str, tuple[float, float, bool]] = {
    "dim": (0, math.inf, False),
    "num_layers": (0, math.inf, False),
    "batch": (1, math.inf, False),
    "lr": (0, math.inf, True),
    "lr_floor": (0, 1, False),
    "warmup": (0, math.inf, False),
    "ema": (0, 1, False),
    "steps": (1, math.inf, False),
    "time_limit_s": (0, math.inf, True),
    "window_prob": (0, 1, False),
    "random_t_prob": (0, 1, False),
    "stream_prob": (0, 1, False),
    "far_prob": (0, 1, False),
    "switch_prob": (0, 1, False),
    "rollout_prob": (0, 1, False),
    "edge_weight": (0, math.inf, True),
    "seed": (0, math.inf, False),
    "log_every": (1, math.inf, False),
}
"""(low, high, whether low itself is out) of the recipe's plain numbers; the others are checked where
they are read (Trainer)."""


def recipe_flag(field: str) -> str:
    """The command-line flag of a TrainConfig field (time_limit_s -> --time-limit)."""
    return "--" + field.replace("_", "-").removesuffix("-s")


def recipe_problem(cfg: TrainConfig) -> str | None:
    """The first number of cfg outside RECIPE_RANGES, as one line naming its flag (None: all in range)."""
    for field, (low, high, open_low) in RECIPE_RANGES.items():
        value = getattr(cfg, field)
        if not (low < value if open_low else low <= value) or value > high or math.isnan(value):
            bound = f"> {low}" if open_low else f">= {low}"
            if high != math.inf:
                bound = f"in [{low}, {high}]" if not open_low else f"in ({low}, {high}]"
            return f"{recipe_flag(field)} {value}: must be {bound}"
    return None


def silence_block(block: torch.nn.Module) -> None:
    """Zero the three projections that write into the residual stream (self-attention out, cross-attention
    out, the FFN's second linear), weights and biases: the block then passes its input on unchanged, bit
    for bit, while its other weights keep their initialization, so the gradient reaches them as soon as
    those projections move."""
    with torch.no_grad():
        for linear in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
            linear.weight.zero_()
            linear.bias.zero_()


def grows(saved: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether a saved LowRankDelta factor (down [r0, in] or up [out, r0]) fits a model's factor of a
    higher rank r > r0 (own: down [r, in] or up [out, r])."""
    if saved.dim() != 2 or saved.shape == own.shape:
        return False
    rank_dim = 0 if saved.shape[1] == own.shape[1] else 1
    other = 1 - rank_dim
    return saved.shape[other] == own.shape[other] and saved.shape[rank_dim] < own.shape[rank_dim]


def grown(saved: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A saved factor of rank r0 inside the model's factor of rank r: down keeps the model's fresh rows
    past r0, up its zero columns (LowRankDelta.reset_parameters), so up @ down is the saved delta."""
    out = own.detach().clone().float()
    if saved.shape[1] == own.shape[1]:  # down [r0, in]
        out[: saved.shape[0]] = saved
    else:  # up [out, r0]
        out.zero_()
        out[:, : saved.shape[1]] = saved
    return out


def missing_state(state: Path, export: bool = False) -> list[str]:
    """The files of a training state (Trainer.save) that `state` lacks: all of them to resume, the EMA
    weights and train.json to export."""
    names = ("state_ema",) if export else STATE_FILES
    wanted = [f"{n}.safetensors" for n in names] + ["train.json"]
    return [name for name in wanted if not (state / name).is_file()]


def export_weights(state: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The EMA weights of a training state -> a checkpoint directory (weights in `dtype` + Wan
    config.json) that ropesp.model.checkpoint loads; fp16 halves the file (5.5 MB for the demo)."""
    meta = json.loads((state / "train.json").read_text())
    cfg = model_config(TrainConfig(**meta["recipe"]))
    ema = load_file(state / "state_ema.safetensors")
    sd = {k: v.to(dtype).contiguous() for k, v in sorted(ema.items())}
    info = {"format": "pt", "step": str(meta["step"]), "train_seconds": f"{meta['train_seconds']:.0f}"}
    config = {"_class_name": "WanModel", "model_type": "t2v", **cfg.to_dict()}
    write_together(
        out,
        {
            WEIGHTS_NAME: lambda path: save_file(sd, path, metadata=info),
            "config.json": lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )
    return out


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, one line} of a dataclass whose fields are documented by the string below
    them (read from its source: the recipe's help is written once, on the field)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ropesp.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="directory for the training state (resumable)")
    p.add_argument("--resume", help="training state directory of an earlier run")
    p.add_argument("--init", metavar="DIR", help="start from the weights of a checkpoint directory")
    p.add_argument(
        "--init-base-only",
        action="store_true",
        help="take --init's weights without its stream adapter (a fresh --adapter-rank, or a full fine-tune)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda if any)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the model's forwards through torch.compile (same function; a graph per batch layout)",
    )
    docs = field_docs(TrainConfig)
    for f in (
        "dim",
        "num_layers",
        "batch",
        "lr",
        "lr_floor",
        "warmup",
        "steps",
        "time_limit_s",
        "schedule_s",
        "frames",
        "window_prob",
        "window_chunks",
        "random_t_prob",
        "step_weights",
        "motion_weights",
        "stream_prob",
        "stream_windows",
        "horizon",
        "far_prob",
        "segment_chunks",
        "warm_chunks",
        "switch_prob",
        "rollout_prob",
        "edge_weight",
        "stream_weight",
        "anchor",
        "adapter_rank",
        "adapter_from",
        "seed",
        "ema",
        "log_every",
    ):
        default = getattr(TrainConfig, f)
        p.add_argument(
            recipe_flag(f),
            dest=f,
            type=type(default),
            default=default,
            help=f"{docs[f]} (default: {default!r})",
        )
    p.add_argument("--export", metavar="DIR", help="only write the EMA weights of --resume to DIR (fp16)")
    args = p.parse_args(argv)
    if args.resume and (missing := missing_state(Path(args.resume), export=bool(args.export))):
        p.error(f"--resume {args.resume}: not a training state of this trainer (no {', '.join(missing)})")
    if args.init and not (Path(args.init) / WEIGHTS_NAME).is_file():
        p.error(f"--init {args.init}: no {WEIGHTS_NAME} there (a checkpoint directory, as --export writes)")
    if args.export:
        if not args.resume:
            p.error("--export needs --resume STATE_DIR")
        if why := output_dir_problem(args.export, "--export"):
            p.error(why)
        try:
            print(f"wrote {export_weights(Path(args.resume), Path(args.export))}")
        except OSError as exc:
            p.exit(1, f"{p.prog}: error: --export {args.export}: the weights could not be written ({exc})\n")
        return
    if not args.out:
        p.error("--out is required for training")
    if why := output_dir_problem(args.out, "--out"):
        p.error(why)
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    cfg = TrainConfig(**fields)
    from ropesp.errors import ConfigError
    from ropesp.runtime.dist import parse_device

    try:
        device = parse_device(args.device, "--device")
    except ConfigError as exc:
        p.error(str(exc))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        trainer = Trainer(cfg, device, compiled=args.compile)
    except ValueError as exc:
        p.error(str(exc))
    if args.resume and args.init:
        p.error("--init and --resume exclude each other")
    if cfg.anchor and not (args.init or args.resume):
        p.error("--anchor pulls toward the --init weights: give --init DIR")
    if cfg.adapter_rank and not (args.init or args.resume):
        p.error("--adapter-rank trains an adapter on frozen weights: give them with --init DIR")
    if args.init:
        try:
            trainer.init_from(Path(args.init), base_only=args.init_base_only)
        except ValueError as exc:
            p.error(str(exc))
        print(f"started from {args.init} ({trainer.init_info})", flush=True)
    if args.resume:
        try:
            trainer.load(Path(args.resume))
        except (RuntimeError, KeyError) as exc:  # another architecture, adapter rank or optimizer set
            why = str(exc).strip().splitlines()[-1].strip()
            p.error(f"--resume {args.resume}: its state does not fit this recipe's model ({why})")
        if cfg.anchor and trainer.anchor is None:
            p.error(
                f"--anchor: {args.resume} holds no --init weights to pull toward (its run had no --anchor)"
            )
        print(f"resumed at step {trainer.step}", flush=True)
    try:
        trainer.run(Path(args.out))
    except OSError as exc:
        p.exit(1, f"{p.prog}: error: --out {args.out}: the training state could not be saved ({exc}); "
               "the state there before is unchanged\n")  # fmt: skip
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted while saving; --out {args.out} keeps the state before\n")
    except RuntimeError as exc:
        if not (args.compile and isinstance(exc, torch._dynamo.exc.BackendCompilerFailed)):
            raise
        why = str(exc).strip().splitlines()[0]
        p.exit(1, f"{p.prog}: error: --compile: torch.compile failed ({why}); train without --compile\n")
    print(f"saved step {trainer.step} to {args.out} ({trainer.elapsed_before:.0f} s of training)", flush=True)


if __name__ == "__main__":
    main()
