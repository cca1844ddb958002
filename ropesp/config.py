"""Model and run configurations. Presets are functions; every field is documented.

Shape legend used across ropesp: B batch, F latent frames, C channels, L tokens this rank holds,
S cache slots, H heads (H_local per rank), D head_dim, P sequence-parallel size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ropesp.errors import ConfigError, arg

ROPE_THETA = 10000.0
VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: temporal 4x, spatial 8x


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a causal Wan2.1 DiT (names follow Wan's config.json)."""

    dim: int = 1536
    """Hidden width C."""
    ffn_dim: int = 8960
    """Width of the feed-forward hidden layer."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    num_heads: int = 12
    """Attention heads H."""
    num_layers: int = 30
    """Transformer blocks."""
    in_dim: int = 16
    """Latent channels in."""
    out_dim: int = 16
    """Latent channels out."""
    text_len: int = 512
    """Text tokens the cross-attention sees (prompt embeddings are zero-padded to this)."""
    text_dim: int = 4096
    """Width of the text encoder's output (umT5-XXL: 4096)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (frames, rows, cols) of the patch embedding."""
    qk_norm: bool = True
    """RMSNorm over all heads on q and k."""
    cross_attn_norm: bool = True
    """Affine LayerNorm (norm3) before the cross-attention."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and RMSNorm."""
    rope_theta: float = ROPE_THETA
    """RoPE base."""
    pos_grid: tuple[int, int] | None = None
    """(rows, cols) of a learned absolute position embedding added to every frame's tokens; None (every
    Wan model) = RoPE only. RoPE gives attention relative offsets only, so a model whose first chunk
    starts from pure noise cannot place anything at a fixed position without it (the demo model)."""
    stream_rank: int = 0
    """Rank of the stream adapter (0: none, every Wan model): low-rank deltas of the blocks' linears
    (STREAM_LINEARS) that a stream uses from latent frame `stream_from_frame` on, so a model trained on
    short videos keeps its first frames bit for bit and learns what long streams need apart (the demo
    model; ropesp.demo.train --adapter)."""
    stream_from_frame: int = 9
    """First latent frame of a stream whose chunks run with the stream adapter (a chunk uses it when its
    first frame is at or past this one)."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size={self.patch_size} must be three positive ints")
        if self.patch_size[0] != 1:
            raise ConfigError(
                f"patch_size={self.patch_size}: only a temporal patch of 1 is supported (all Wan2.1 models)"
            )
        if self.pos_grid is not None and (len(self.pos_grid) != 2 or min(self.pos_grid) < 1):
            raise ConfigError(f"pos_grid={self.pos_grid} must be None or two positive ints (rows, cols)")
        if self.stream_rank < 0 or self.stream_from_frame < 1:
            raise ConfigError(
                f"stream_rank={self.stream_rank}, stream_from_frame={self.stream_from_frame}: a rank >= 0 "
                "(0: no stream adapter) and a first frame >= 1"
            )
        for name in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def head_dim(self) -> int:
        """D = dim / num_heads."""
        return self.dim // self.num_heads

    @property
    def patch_out(self) -> int:
        """Channels of the head's output per token: prod(patch_size) * out_dim."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.out_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.pos_grid is None:
            del d["pos_grid"]  # Wan configs stay as Wan writes them
        else:
            d["pos_grid"] = list(self.pos_grid)
        if not self.stream_rank:
            del d["stream_rank"], d["stream_from_frame"]
        return d

    def without_stream_adapter(self) -> ModelConfig:
        """This architecture without its stream adapter (what presets and text encoders are matched on)."""
        return dataclasses.replace(self, stream_rank=0, stream_from_frame=ModelConfig.stream_from_frame)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Build from a Wan/diffusers-style config dict; absent fields take Wan defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        required = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim")
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise ConfigError(f"model config lacks required fields {missing}; a Wan config.json has them")
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        if kwargs.get("pos_grid") is not None:
            kwargs["pos_grid"] = tuple(int(p) for p in kwargs["pos_grid"])
        if isinstance(kwargs.get("qk_norm"), str):  # diffusers writes "rms_norm_across_heads"
            kwargs["qk_norm"] = kwargs["qk_norm"] in ("rms_norm_across_heads", "true", "True")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--model-config {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--model-config {path} is not valid JSON: {exc}") from None
        if "num_attention_heads" in raw and "num_heads" not in raw:  # diffusers transformer config
            raw = _diffusers_config_to_wan(raw)
        return cls.from_dict(raw)


def _diffusers_config_to_wan(raw: dict) -> dict:
    """diffusers WanTransformer3DModel config -> Wan config dict (T2V only)."""
    missing = [
        k for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers") if k not in raw
    ]
    if missing:
        raise ConfigError(f"diffusers transformer config lacks required fields {missing}")
    if raw.get("image_dim") is not None or raw.get("added_kv_proj_dim") is not None:
        raise ConfigError(
            "diffusers config is an image-to-video Wan (image_dim/added_kv_proj_dim set); only T2V is supported"
        )
    qk_norm = raw.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise ConfigError(
            f"diffusers qk_norm={qk_norm!r} is unsupported; Wan2.1 uses 'rms_norm_across_heads' or null"
        )
    heads = raw["num_attention_heads"]
    return {
        "dim": heads * raw["attention_head_dim"],
        "ffn_dim": raw["ffn_dim"],
        "freq_dim": raw.get("freq_dim", 256),
        "num_heads": heads,
        "num_layers": raw["num_layers"],
        "in_dim": raw.get("in_channels", 16),
        "out_dim": raw.get("out_channels", 16),
        "text_len": 512,
        "text_dim": raw.get("text_dim", 4096),
        "patch_size": raw.get("patch_size", [1, 2, 2]),
        "qk_norm": qk_norm is not None,
        "cross_attn_norm": raw.get("cross_attn_norm", True),
        "eps": raw.get("eps", 1e-6),
    }


def tiny() -> ModelConfig:
    """CPU-fast default: 12 heads of 16 dims, 2 layers (every world size 1..12 divides or tiles)."""
    return ModelConfig(dim=192, ffn_dim=768, num_heads=12, num_layers=2)


def demo() -> ModelConfig:
    """The embedded demo model (ropesp/demo): 6 heads of 32 dims (RoPE split 12/10/10), 4 layers, the
    demo prompt encoder's 16 x 64 text input, and an absolute position embedding for its 12 x 12 token
    grid (24 x 24 latents). Shipped trained on the procedural world."""
    return ModelConfig(
        dim=192, ffn_dim=768, num_heads=6, num_layers=4, text_len=16, text_dim=64, pos_grid=(12, 12)
    )


def wan_1_3b() -> ModelConfig:
    """Wan2.1-T2V-1.3B (Self-Forcing's base)."""
    return ModelConfig()


def wan_14b() -> ModelConfig:
    """Wan2.1-T2V-14B."""
    return ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


@dataclass(frozen=True)
class PresetDefaults:
    """Resolution and length a preset runs at unless told otherwise (latent units)."""

    latent_height: int
    latent_width: int
    latent_frames: int


PRESETS: dict[str, tuple] = {
    "tiny": (tiny, PresetDefaults(16, 16, 9)),
    "demo": (demo, PresetDefaults(24, 24, 9)),
    "wan2.1-1.3b": (wan_1_3b, PresetDefaults(60, 104, 21)),
    "wan2.1-14b": (wan_14b, PresetDefaults(60, 104, 21)),
}


def preset(name: str) -> tuple[ModelConfig, PresetDefaults]:
    """Model config and default sizes of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"{arg('preset', name)} is unknown; choose one of {sorted(PRESETS)}")
    make, defaults = PRESETS[name]
    return make(), defaults


def preset_of(cfg: ModelConfig) -> str | None:
    """The name of the preset whose model config is cfg, if one is."""
    base = cfg.without_stream_adapter()
    return next((name for name, (make, _) in PRESETS.items() if make() == base), None)


def in_demo_family(cfg: ModelConfig) -> bool:
    """Whether cfg is the demo model at any width or depth: its prompt input (the demo encoder's
    text_len x text_dim), patches, position grid and head width, as `python -m ropesp.demo.train --dim
    --num-layers` trains it. Such a model runs at the demo preset's sizes with the demo encoder."""
    d = demo()
    return (cfg.text_len, cfg.text_dim, cfg.patch_size, cfg.pos_grid, cfg.in_dim, cfg.out_dim) == (
        d.text_len,
        d.text_dim,
        d.patch_size,
        d.pos_grid,
        d.in_dim,
        d.out_dim,
    ) and cfg.dim // cfg.num_heads == d.dim // d.num_heads


def defaults_preset(cfg: ModelConfig) -> str | None:
    """The preset whose sizes cfg runs at by default: its own, or "demo" for the demo family."""
    return preset_of(cfg) or ("demo" if in_demo_family(cfg) else None)


@dataclass(frozen=True)
class CacheConfig:
    """Self-attention KV cache geometry, in latent frames (docs/MODEL.md section 4)."""

    max_frames: int
    """Frames the cache holds without a rolling window (the whole video)."""
    local_attn_frames: int = -1
    """Rolling window in frames, sink frames INCLUDED; -1 = global attention (no rolling)."""
    sink_frames: int = 0
    """Frames at the start of the stream that are never evicted (only with a rolling window)."""

    def __post_init__(self) -> None:
        if self.local_attn_frames == -1:
            if self.sink_frames:
                raise ConfigError(
                    f"{arg('sink_frames', self.sink_frames)} needs {arg('local_attn_frames')} (a rolling window)"
                )
            if self.max_frames < 1:
                raise ConfigError(f"max_frames={self.max_frames} must be >= 1")
        else:
            if self.local_attn_frames < 1:
                raise ConfigError(
                    f"{arg('local_attn_frames', self.local_attn_frames)} must be -1 (global) or >= 1"
                )
            if not 0 <= self.sink_frames < self.local_attn_frames:
                raise ConfigError(
                    f"{arg('sink_frames', self.sink_frames)} must be in [0, {arg('local_attn_frames')}="
                    f"{self.local_attn_frames}) (the window includes the sink)"
                )

    @property
    def rolling(self) -> bool:
        return self.local_attn_frames != -1

    @property
    def slot_frames(self) -> int:
        """Frames the buffer holds: the window when rolling, else max_frames."""
        return self.local_attn_frames if self.rolling else self.max_frames

    def check_chunk(self, chunk_frames: int) -> None:
        """A rolling window must hold the sink and the largest chunk (chunk_frames) at once."""
        if self.rolling and self.local_attn_frames < self.sink_frames + chunk_frames:
            raise ConfigError(
                f"{arg('local_attn_frames', self.local_attn_frames)} must be >= "
                f"{arg('sink_frames', self.sink_frames)} + chunk frames {chunk_frames}"
            )


def latent_frames_for(frames: int) -> int:
    """Latent frames of a video of `frames` frames (Wan's VAE: frames = 4*latent - 3); ConfigError else."""
    if frames < 1 or (frames - 1) % 4:
        raise ConfigError(
            f"{arg('frames', frames)} must be 4*k + 1 video frames (e.g. 33 = 9 latent frames, 81 = 21)"
        )
    return (frames + 3) // 4


@dataclass(frozen=True)
class VideoGeometry:
    """Latent size of one stream; derives the token grid of a frame."""

    latent_height: int
    latent_width: int
    patch_size: tuple[int, int, int] = field(default=(1, 2, 2))

    def __post_init__(self) -> None:
        _, ph, pw = self.patch_size
        if self.latent_height < 1 or self.latent_height % ph:
            raise ConfigError(
                f"{arg('latent_height', self.latent_height)} must be a positive multiple of the patch size {ph}"
            )
        if self.latent_width < 1 or self.latent_width % pw:
            raise ConfigError(
                f"{arg('latent_width', self.latent_width)} must be a positive multiple of the patch size {pw}"
            )

    @property
    def rows(self) -> int:
        return self.latent_height // self.patch_size[1]

    @property
    def cols(self) -> int:
        return self.latent_width // self.patch_size[2]

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame (rows * cols); 1560 for Wan 480p."""
        return self.rows * self.cols
