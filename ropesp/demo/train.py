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

Why teacher forcing suffices here: every prompt nearly fixes its scene (world.py), so E[x0 | x_t] for the
first chunk is sharp already at t = 1000, and later chunks are fixed by the cached context. The model can
only compute that mean if its tokens know their absolute position: with RoPE alone (every Wan model) the
first chunk's inputs are i.i.d. noise at every position, and the prediction was a position-less haze of
the prompt's colour (bench/2026-12-01-demo/README.md); the demo preset adds a position embedding.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ropesp.config import preset
from ropesp.demo.prompts import DemoTextEncoder, describe
from ropesp.demo.world import OVERDRIVE, all_specs, canonical_scene, jittered, scene_latents, take, to_device
from ropesp.model.rope import RopeTables, rotate_pairs
from ropesp.model.wan import CausalWanDiT, init_weights, timestep_sinusoid
from ropesp.runtime.sampler import FlowSchedule
from ropesp.settings import SamplerConfig

STATE_FILES = ("state_model", "state_ema", "state_adam_m", "state_adam_v")


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of a training run (defaults: the shipped model's)."""

    preset: str = "demo"
    batch: int = 48
    """Videos per step."""
    lr: float = 5e-4
    """Peak AdamW learning rate (cosine to lr_floor * lr over the time limit, after warmup)."""
    lr_floor: float = 0.05
    warmup: int = 300
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    ema: float = 0.999
    """EMA decay of the weights that are shipped."""
    steps: int = 1_000_000
    """Stop after this many steps (the time limit usually comes first)."""
    time_limit_s: float = 270.0
    """Stop and save after this much training time (seconds)."""
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
    seed: int = 0
    log_every: int = 50


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

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model_cfg, defaults = preset(cfg.preset)
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
        self.step_sigma = torch.tensor(schedule.step_sigmas, device=device)
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
        self.model.to(device)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
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
        self.tables = RopeTables(self.model_cfg.head_dim, self.frames, self.rows, self.cols, device=device)
        ft = self.rows * self.cols
        self.masks = {
            ctx: block_mask(self.frames, ft, self.chunk, ctx, device) for ctx in (None, cfg.window_chunks)
        }  # full cache, rolling window

    # --- state ------------------------------------------------------------------------------
    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(sd, out / "state_model.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, out / "state_ema.safetensors")
        names = {p: n for n, p in self.model.named_parameters()}
        m, v = {}, {}
        for p, st in self.opt.state.items():
            m[names[p]] = st["exp_avg"].float().cpu().contiguous()
            v[names[p]] = st["exp_avg_sq"].float().cpu().contiguous()
        save_file(m, out / "state_adam_m.safetensors")
        save_file(v, out / "state_adam_v.safetensors")
        meta = {
            "recipe": asdict(self.cfg),
            "init": self.init_info,
            "step": self.step,
            "train_seconds": self.elapsed_before,
            "curve": self.curve,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        (out / "train.json").write_text(json.dumps(meta, indent=1))

    def init_from(self, checkpoint: Path) -> None:
        """Start model and EMA from a checkpoint's weights (fresh optimizer and schedule): continues an
        exported run whose optimizer state is gone."""
        with safe_open(checkpoint / WEIGHTS_NAME, "pt", device=str(self.device)) as f:
            sd = {k: f.get_tensor(k).float() for k in f.keys()}
            info = f.metadata() or {}
        self.model.load_state_dict(sd)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.init_info = {"checkpoint": checkpoint.name, **info}

    def load(self, src: Path) -> None:
        self.model.load_state_dict(load_file(src / "state_model.safetensors", device=str(self.device)))
        self.ema = load_file(src / "state_ema.safetensors", device=str(self.device))
        m = load_file(src / "state_adam_m.safetensors", device=str(self.device))
        v = load_file(src / "state_adam_v.safetensors", device=str(self.device))
        meta = json.loads((src / "train.json").read_text())
        self.step, self.curve = meta["step"], meta["curve"]
        self.elapsed_before = meta["train_seconds"]
        self.init_info = meta.get("init")
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
    def batch(self) -> tuple[torch.Tensor, ...]:
        """(clean x0, noisy x_t, t [B, F], sampler-step index per chunk [B, n] (-1: random t), prompts, eps)."""
        b, g = self.cfg.batch, self.generator
        ids = torch.randint(len(self.specs), (b,), generator=g, device=self.device)
        x0 = scene_latents(jittered(take(self.scenes, ids), g), self.frames, OVERDRIVE)  # [B, F, 16, h, w]
        chunks = self.frames // self.chunk
        idx = torch.randint(len(self.step_t), (b, chunks), generator=g, device=self.device)
        t, sigma = self.step_t[idx], self.step_sigma[idx]
        rnd = torch.rand(b, chunks, generator=g, device=self.device) < self.cfg.random_t_prob
        j = torch.randint(len(self.all_t), (b, chunks), generator=g, device=self.device)
        t = torch.where(rnd, self.all_t[j], t)
        sigma = torch.where(rnd, self.all_sigma[j], sigma)
        idx = torch.where(rnd, -1, idx)
        t_f = t.repeat_interleave(self.chunk, dim=1)  # [B, F]
        s_f = sigma.repeat_interleave(self.chunk, dim=1)[:, :, None, None, None]
        eps = torch.randn(x0.shape, generator=g, device=self.device)
        noisy = (1 - s_f) * x0 + s_f * eps
        return x0, noisy, t_f, idx, self.prompts[ids], eps

    def lr_at(self, elapsed: float) -> float:
        cfg = self.cfg
        if self.step < cfg.warmup:
            return cfg.lr * (self.step + 1) / cfg.warmup
        frac = min(1.0, elapsed / cfg.time_limit_s)
        return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self, elapsed: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        x0, noisy, t_f, idx, prompts, eps = self.batch()
        windowed = torch.rand((), generator=self.generator, device=self.device) < self.cfg.window_prob
        ctx = self.cfg.window_chunks if windowed else None
        lr = self.lr_at(elapsed)
        for group in self.opt.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            flow = teacher_forcing_flow(self.model, x0, noisy, t_f, prompts, self.masks[ctx], self.tables)
        err = (flow - (eps - x0)).pow(2).mean(dim=(2, 3, 4))  # [B, F]
        loss = err.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                self.ema[k].lerp_(v.float(), 1 - decay)
        per_chunk = err.view(err.shape[0], -1, self.chunk).mean(dim=2)  # [B, n]
        return loss, per_chunk.detach(), idx

    def run(self, out: Path) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        sums = torch.zeros(len(self.step_t) + 1, device=self.device)
        counts = torch.zeros_like(sums)
        total = torch.zeros((), device=self.device)
        n = 0
        while self.step < cfg.steps:
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg.time_limit_s:
                break
            loss, per_chunk, idx = self.train_step(elapsed)
            total += loss.detach()
            n += 1
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
                self.curve.append(row)
                print(json.dumps(row), flush=True)
                sums.zero_()
                counts.zero_()
                total.zero_()
                n = 0
        self.elapsed_before += time.perf_counter() - t0
        self.save(out)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def export_weights(state: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The EMA weights of a training state -> a checkpoint directory (weights in `dtype` + Wan
    config.json) that ropesp.model.checkpoint loads; fp16 halves the file (5.5 MB for the demo)."""
    meta = json.loads((state / "train.json").read_text())
    cfg = preset(meta["recipe"]["preset"])[0]
    ema = load_file(state / "state_ema.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in sorted(ema.items())}
    info = {"format": "pt", "step": str(meta["step"]), "train_seconds": f"{meta['train_seconds']:.0f}"}
    save_file(sd, out / WEIGHTS_NAME, metadata=info)
    config = {"_class_name": "WanModel", "model_type": "t2v", **cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ropesp.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="directory for the training state (resumable)")
    p.add_argument("--resume", help="training state directory of an earlier run")
    p.add_argument("--init", metavar="DIR", help="start from the weights of a checkpoint directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in (
        "batch",
        "lr",
        "warmup",
        "steps",
        "time_limit_s",
        "frames",
        "window_prob",
        "window_chunks",
        "random_t_prob",
        "seed",
        "ema",
    ):
        default = getattr(TrainConfig, f)
        p.add_argument(
            "--" + f.replace("_", "-").removesuffix("-s"), dest=f, type=type(default), default=default
        )
    p.add_argument("--export", metavar="DIR", help="only write the EMA weights of --resume to DIR (fp16)")
    args = p.parse_args(argv)
    if args.export:
        if not args.resume:
            p.error("--export needs --resume STATE_DIR")
        print(f"wrote {export_weights(Path(args.resume), Path(args.export))}")
        return
    if not args.out:
        p.error("--out is required for training")
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    cfg = TrainConfig(**fields)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        trainer = Trainer(cfg, device)
    except ValueError as exc:
        p.error(str(exc))
    if args.resume and args.init:
        p.error("--init and --resume exclude each other")
    if args.init:
        trainer.init_from(Path(args.init))
        print(f"started from {args.init} ({trainer.init_info})", flush=True)
    if args.resume:
        trainer.load(Path(args.resume))
        print(f"resumed at step {trainer.step}", flush=True)
    trainer.run(Path(args.out))
    print(f"saved step {trainer.step} to {args.out} ({trainer.elapsed_before:.0f} s of training)", flush=True)


if __name__ == "__main__":
    main()
