"""Every run setting, declared once.

A setting is a field of a section (a frozen dataclass) that carries its type, default, choices, units
and help. Everything a user sets is generated from these declarations:

    ropesp generate --world-size 2 ...     the flags of every command (ropesp/cli/flags.py)
    ropesp.Pipeline(world_size=2, ...)     the keywords of the Python API (`RunConfig.of`)
    ropesp_config.json                     the Triton model's and the worker ranks' settings (`to_dict`)

A field's Python name is its keyword; its flag is the name with dashes (`local_attn_frames` ->
`--local-attn-frames`, made by ropesp/cli/flags.py), so `errors.arg` names a parameter the way the caller
wrote it. Values are checked
where they are declared (`Section.check`): types, finiteness, ranges and choices, before any work.

Sections: `ModelSource` (which model), `VideoConfig` (size, length, KV cache window), `SamplerConfig`
(denoising steps), `ParallelConfig` (sequence-parallel ranks), `ComputeConfig` (backend, dtype, device,
precision), `DecodeConfig` (frames from latents), `PromptConfig` (text prompts and their changes),
`StreamsConfig` (several streams on one engine). `RunConfig` holds one of each.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ropesp.config import PRESETS, latent_frames_for
from ropesp.errors import ConfigError, arg

# --- the choice lists, once ---------------------------------------------------------------------
RUN_BACKENDS = ("eager", "compile", "ort", "aoti", "tensorrt")
"""`--backend` of a run: the PyTorch model (eager, compile) or the engines of `ropesp build`."""
MODEL_BACKENDS = ("eager", "compile")
"""Run backends that execute the PyTorch model itself (no --engines)."""
BUILD_BACKENDS = ("onnx", "tensorrt", "aoti")
"""`--backend` of `ropesp build`."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("cuda", "cpu")
PRECISIONS = ("bf16", "fp8", "fp8-ffn")
"""bf16, or the blocks' Linear layers as e4m3 GEMMs (fp8: all of them; fp8-ffn: the FFN's)."""
ATTENTION_MODES = ("sdpa", "fa3", "fp8", "int8")
SP_ROPE_MODES = ("local", "allgather")
SP_COMM_MODES = ("fused", "unfused")
DECODERS = ("preview", "vae", "taehv", "none")
RANDOM_WEIGHTS = "random"
"""The value of --vae or --taehv that names seeded random weights instead of a file (timing without a
checkpoint)."""
WAN_VAE_OPTIONS = ("vae_compile", "vae_fast", "vae_cudnn", "decode_device")
"""The decode settings that act on the Wan VAE decoder only."""
PROMPT_MODES = ("swap", "recache", "cut")
"""How a prompt change mid-stream treats the self-attention cache (runtime/session.py)."""
SEED_RANGE = (0, 2**63 - 1)
"""Seeds of streams: non-negative 64-bit signed integers (torch.Generator.manual_seed's range, and
what every front end accepts: a flag, a keyword, a JSON number, a Triton INT64)."""


def setting(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple | None = None,
    units: str | None = None,
    metavar: str | None = None,
    minimum: float | None = None,
    parse: typing.Callable[[str], Any] | None = None,
) -> Any:
    """A section field with its documentation: help (one line, shown by --help and in errors' context),
    choices, units (shown as the flag's value name), the smallest value a number may take, and a parser
    for values that are not plain (e.g. `--steps 1000,750`)."""
    meta = {"help": help, "choices": choices, "units": units, "metavar": metavar, "minimum": minimum}
    meta["parse"] = parse
    return field(default=default, metadata=meta)


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_types(annotation: Any) -> tuple[type, ...]:
    """int | None -> (int,); tuple[int, ...] -> (tuple,)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in base_types(a) if t is not type(None))
    if origin is not None:
        return (origin,)
    return (annotation,)


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """value as the field `name` of type annotation takes it, or ConfigError naming the parameter as
    the caller wrote it: integers from any integral type (numpy's too, never bool), finite floats,
    strings, tuples of integers."""
    if value is None:
        if _optional(annotation):
            return None
        raise ConfigError(f"{arg(name, None)}: a value is required")
    kinds = base_types(annotation)
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{arg(name, value)} must be True or False")
    if int in kinds:
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"{arg(name, value)} must be an integer")
        try:
            return operator.index(value)
        except TypeError:
            raise ConfigError(f"{arg(name, _short(value))} must be an integer") from None
    if float in kinds:
        if isinstance(value, bool) or (
            not isinstance(value, (int, float)) and not hasattr(value, "__float__")
        ):
            raise ConfigError(f"{arg(name, _short(value))} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{arg(name, _short(value))} must be a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{arg(name, value)} must be a finite number")
        return number
    if str in kinds:
        if isinstance(value, str):
            return value
        if hasattr(value, "__fspath__"):  # pathlib paths name files
            return str(value.__fspath__())
        raise ConfigError(f"{arg(name, _short(value))} must be a string")
    if tuple in kinds:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{arg(name, _short(value))} must be a sequence of integers")
        items = list(value)
        if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in items):
            raise ConfigError(f"{arg(name, _short(value))} must be a sequence of integers")
        return tuple(operator.index(v) for v in items)
    return value


def _short(value: Any) -> Any:
    """A value as a message quotes it: a long one cut (a 5000-digit number must not fill the screen)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return _Shown(f"<a {int(value.bit_length() * math.log10(2)) + 1}-digit integer>")
    text = repr(value)
    return value if len(text) <= 40 else _Shown(text[:37] + "...")


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def check_seed(seed: Any, name: str = "seed") -> int:
    """The one rule for a stream's seed, everywhere: an integer (numpy's too) in SEED_RANGE."""
    if isinstance(seed, str) and seed.strip().lstrip("-").isdigit() and len(seed) < 40:
        seed = int(seed)
    value = coerce(name, seed, int)
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ConfigError(f"{arg(name, _short(value))} must be in {lo}..2^63-1")
    return value


def check_positive(**sizes: int | None) -> None:
    """Refuse (ConfigError) a given size below 1, named as the caller wrote it (None: the default)."""
    for name, value in sizes.items():
        if value is None:
            continue
        value = coerce(name, value, int)
        if value < 1:
            raise ConfigError(f"{arg(name, value)} must be >= 1")


class Section:
    """A section of settings: a frozen dataclass of `setting` fields. `check` validates every field
    (type, finiteness, minimum, choices) and then the section's own rules (`_check`)."""

    title: ClassVar[str] = ""
    """The --help group the section's flags appear under."""

    def __post_init__(self) -> None:
        types_ = hints(type(self))
        for f in dataclasses.fields(self):
            value = coerce(f.name, getattr(self, f.name), types_[f.name])
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if value is None or isinstance(value, bool):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(
                    f"{arg(f.name, value)}: choose one of {', '.join(map(str, meta['choices']))}"
                )
            minimum = meta.get("minimum")
            if minimum is not None and isinstance(value, (int, float)) and value < minimum:
                bound = int(minimum) if float(minimum).is_integer() else minimum
                raise ConfigError(f"{arg(f.name, value)} must be >= {bound}")
        self._check()

    def _check(self) -> None:
        """The section's rules between fields."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]):
        """Inverse of to_dict; unknown keys are refused by name."""
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{cls.__name__} has unknown settings {unknown}")
        return cls(**raw)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- the sections ---------------------------------------------------------------------------------
PRESET_NAMES = tuple(sorted(PRESETS))


@dataclass(frozen=True)
class ModelSource(Section):
    """Which model and weights (model/checkpoint.py resolve_model reads them)."""

    title: ClassVar[str] = "model"
    checkpoint: str | None = setting(
        None,
        "Self-Forcing .pt, Wan2.1 .safetensors (file, sharded index or directory) or a diffusers "
        "transformer directory",
        metavar="PATH",
    )
    model_config: str | None = setting(
        None,
        "Wan config.json of the checkpoint (default: the one beside it, else matched by shapes)",
        metavar="PATH",
    )
    preset: str | None = setting(
        None,
        "a named model, on seeded random weights without --checkpoint (default: the embedded trained "
        "demo model)",
        choices=PRESET_NAMES,
    )
    engines: str | None = setting(
        None,
        "engine directory from `ropesp build`: its manifest names the model, weights, backend, device, "
        "dtype and world size",
        metavar="DIR",
    )
    model_dir: str | None = setting(
        None,
        "diffusers Wan2.1 directory (transformer/, vae/, text_encoder/, tokenizer/); --checkpoint "
        "replaces transformer/",
        metavar="DIR",
    )

    def _check(self) -> None:
        if self.model_config and self.preset:
            raise ConfigError(f"give {arg('model_config')} or {arg('preset')}, not both")
        if self.engines and (self.checkpoint or self.preset or self.model_config or self.model_dir):
            others = [n for n in ("checkpoint", "preset", "model_config", "model_dir") if getattr(self, n)]
            raise ConfigError(
                f"{arg('engines')} brings its own model and weights: drop {', '.join(arg(n) for n in others)}"
            )

    @property
    def named(self) -> bool:
        """Whether anything names a model (else the embedded demo model is the default)."""
        return any(getattr(self, n) for n in self.names())


@dataclass(frozen=True)
class VideoConfig(Section):
    """The video's size and length and its KV cache geometry. Sizes in pixels or in latent units (one
    of the two); None: the model's default."""

    title: ClassVar[str] = "video"
    height: int | None = setting(None, "video height, a multiple of 16 (latent = pixels / 8)", units="PIXELS")
    width: int | None = setting(None, "video width, a multiple of 16 (latent = pixels / 8)", units="PIXELS")
    latent_height: int | None = setting(None, "video height in latent units (instead of --height)", minimum=1)
    latent_width: int | None = setting(None, "video width in latent units (instead of --width)", minimum=1)
    frames: int | None = setting(
        None,
        "video frames, 4k+1 (33 = 9 latent frames, 81 = 21, 4 per latent frame after the first); 0: a "
        "stream until stopped (needs a rolling window)",
        minimum=0,
    )
    latent_frames: int | None = setting(
        None, "video length in latent frames (instead of --frames)", minimum=0
    )
    max_frames: int | None = setting(
        None,
        "KV cache capacity in latent frames without a rolling window (default: the video's length)",
        minimum=1,
    )
    local_attn_frames: int = setting(
        -1, "rolling attention window in latent frames, sink frames included (-1: attend to the whole video)"
    )
    sink_frames: int = setting(
        0, "latent frames at the stream's start the rolling window never evicts", minimum=0
    )

    def _check(self) -> None:
        pixels = self.height is not None or self.width is not None
        if pixels and (self.latent_height is not None or self.latent_width is not None):
            raise ConfigError(
                f"give {arg('height')}/{arg('width')} (pixels) or {arg('latent_height')}/"
                f"{arg('latent_width')}, not both"
            )
        if pixels:
            for name in ("height", "width"):
                px = getattr(self, name)
                if px is None or px < 16 or px % 16:
                    raise ConfigError(
                        f"{arg(name, px)} must be a positive multiple of 16 pixels "
                        f"({arg('height')} and {arg('width')} go together)"
                    )
        if self.frames is not None and self.latent_frames is not None:
            raise ConfigError(f"give {arg('frames')} or {arg('latent_frames')}, not both")
        if self.frames:
            latent_frames_for(self.frames)
        if self.local_attn_frames != -1 and self.local_attn_frames < 1:
            raise ConfigError(
                f"{arg('local_attn_frames', self.local_attn_frames)} must be -1 (global) or >= 1"
            )
        if self.sink_frames and self.local_attn_frames == -1:
            raise ConfigError(
                f"{arg('sink_frames', self.sink_frames)} needs {arg('local_attn_frames')} (a rolling window)"
            )

    @property
    def latent_size(self) -> tuple[int | None, int | None]:
        """(latent height, latent width), from pixels or latent units; None: the model's default."""
        if self.height is not None:
            return self.height // 8, self.width // 8
        return self.latent_height, self.latent_width

    @property
    def length(self) -> int | None:
        """The video's length in latent frames: None for the model's default, 0 for unbounded."""
        if self.frames is not None:
            return 0 if self.frames == 0 else latent_frames_for(self.frames)
        return self.latent_frames

    @property
    def unbounded(self) -> bool:
        return self.length == 0


def parse_steps(text: str) -> tuple[int, ...]:
    """`--steps 1000,750,500,250` -> (1000, 750, 500, 250)."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--steps {text!r}: expected comma-separated integers in 1..1000, descending (e.g. 1000,750,500,250)"
        ) from None


@dataclass(frozen=True)
class SamplerConfig(Section):
    """Few-step flow-matching sampler (Self-Forcing DMD)."""

    title: ClassVar[str] = "sampler"
    steps: tuple[int, ...] = setting(
        (1000, 750, 500, 250),
        "denoising steps before warping with --shift, descending in 1..1000",
        metavar="T1,T2,...",
        parse=parse_steps,
    )
    shift: float = setting(5.0, "timestep shift of the schedule (Self-Forcing's inference: 5; its demo: 8)")
    chunk_frames: int = setting(3, "latent frames generated per chunk", minimum=1)
    independent_first_frame: bool = setting(
        False, "the first chunk is a single latent frame, then --chunk-frames"
    )
    context_noise: float = setting(
        0.0, "timestep of the clean-context pass that writes a chunk's KV cache", minimum=0
    )

    def _check(self) -> None:
        steps = list(self.steps)
        if not steps:
            raise ConfigError(f"{arg('steps')} must list at least one step")
        if any(not 1 <= s <= 1000 for s in steps):
            raise ConfigError(f"{arg('steps', ','.join(map(str, steps)))}: every step must be in 1..1000")
        if any(a <= b for a, b in itertools.pairwise(steps)):
            raise ConfigError(f"{arg('steps', ','.join(map(str, steps)))}: steps must be strictly descending")
        if self.shift <= 0:
            raise ConfigError(f"{arg('shift', self.shift)} must be > 0")
        if self.context_noise > 1000:  # a timestep of the 1000-step training schedule, as --steps are
            raise ConfigError(f"{arg('context_noise', self.context_noise)} must be a timestep in 0..1000")

    def chunk_sizes(self, latent_frames: int) -> list[int]:
        """Frames per chunk for a video of latent_frames; refuses lengths that do not tile, naming the
        valid video lengths."""
        n = self.chunk_frames
        first = 1 if self.independent_first_frame else n
        if latent_frames < first or (latent_frames - first) % n:
            valid = [first + n * k for k in range(4)]
            frames = ", ".join(str(4 * f - 3) for f in valid)
            raise ConfigError(
                f"a video of {4 * latent_frames - 3} frames ({latent_frames} latent) does not tile into chunks "
                f"of {arg('chunk_frames', n)}"
                + (f" after a 1-frame first chunk ({arg('independent_first_frame')})" if first == 1 else "")
                + f": valid lengths are {frames}, ... frames ({', '.join(map(str, valid))}, ... latent)"
            )
        return [first] + [n] * ((latent_frames - first) // n)

    def chunk_size(self, index: int) -> int:
        """Latent frames of chunk `index` of any stream (bounded or not)."""
        return 1 if self.independent_first_frame and index == 0 else self.chunk_frames


@dataclass(frozen=True)
class ParallelConfig(Section):
    """How sequence-parallel ranks split the work (runtime/sp.py, ropesp/parallel.py)."""

    title: ClassVar[str] = "parallel"
    world_size: int | None = setting(
        None,
        "sequence-parallel ranks P (spawned locally, or torchrun's; default: the launcher's, else the "
        "engines', else 1)",
        minimum=1,
    )
    ulysses_degree: int | None = setting(
        None,
        "U of the layout P = U x R: heads split over U ranks (default: the largest that fits)",
        minimum=1,
    )
    ring_degree: int | None = setting(
        None, "R of the layout: the KV cache's tokens split over R ranks", minimum=1
    )
    sp_rope: str = setting(
        "local", "local: Causal-RoPE SP; allgather: the paper's baseline", choices=SP_ROPE_MODES
    )
    sp_comm: str = setting(
        "fused", "fused: one all-to-all for q, k, v; unfused: three", choices=SP_COMM_MODES
    )
    collective_timeout: float | None = setting(
        None,
        "while streaming, how long a rank waits for the others before the run stops and names the stalled "
        "rank (default 60; --backend compile: 300)",
        units="SECONDS",
    )

    def _check(self) -> None:
        if self.collective_timeout is not None and self.collective_timeout <= 0:
            raise ConfigError(f"{arg('collective_timeout', self.collective_timeout)} must be > 0 seconds")


@dataclass(frozen=True)
class ComputeConfig(Section):
    """Where and in what precision the DiT runs."""

    title: ClassVar[str] = "compute"
    backend: str | None = setting(
        None,
        "eager | compile (regional torch.compile + CUDA graphs) | the engines of `ropesp build`: ort, aoti, "
        "tensorrt (default: the engines', else eager)",
        choices=RUN_BACKENDS,
    )
    dtype: str | None = setting(
        None, "default: the engines', else bfloat16 on cuda, float32 on cpu", choices=DTYPE_NAMES
    )
    device: str | None = setting(
        None, "default: the engines', else cuda where a GPU is visible", choices=DEVICES
    )
    precision: str = setting(
        "bf16",
        "fp8: the blocks' Linear layers as e4m3 GEMMs; fp8-ffn: the FFN's only (eager/compile, CUDA >= sm_89)",
        choices=PRECISIONS,
    )
    attention: str = setting(
        "sdpa",
        "self-attention over the KV cache: sdpa (cuDNN first) | fa3 (FlashAttention-3) | fp8 (FA3 e4m3 over "
        "an e4m3 cache) | int8 (SageAttention)",
        choices=ATTENTION_MODES,
    )
    cuda_graphs: bool = setting(
        True, "replay chunk forwards from CUDA graphs (compile backend and engines, on GPU)"
    )


@dataclass(frozen=True)
class DecodeConfig(Section):
    """How latents become frames (rank 0 decodes)."""

    title: ClassVar[str] = "decode"
    decoder: str | None = setting(
        None,
        "vae: the streaming Wan VAE; taehv: TAEHV's tiny Wan decoder (--taehv); preview: a fast linear map; "
        "none: latents only (default: taehv with --taehv, else vae when --vae or --model-dir gives one, else "
        "preview)",
        choices=DECODERS,
    )
    vae: str | None = setting(
        None, "Wan VAE: a diffusers vae/ directory or Wan2.1_VAE.pth (default: --model-dir's)", metavar="PATH"
    )
    taehv: str | None = setting(
        None,
        "TAEHV's tiny streaming Wan decoder (its frames approximate the VAE's; with it Wan-1.3B streams 480p at "
        "54.1 FPS against the FP8 DiT's 57.4 alone, 720p at 15.1 against 15.7, on an H100): the TAEHV "
        "project's taew2_1.pth or .safetensors, or 'random' (seeded weights, for timing)",
        metavar="PATH",
    )
    vae_compile: bool = setting(
        False, "torch.compile the Wan VAE decoder once per process (its graphs built at load)"
    )
    vae_fast: bool = setting(
        False,
        "the Wan VAE as FastWanDecoder: in-place causal caches, fused passes, a CUDA graph per latent frame; "
        "frames within bf16 rounding of the default's (1.23x --vae-compile on an H100, 11 s of warm-up instead "
        "of 79 s)",
    )
    vae_cudnn: bool = setting(
        False,
        "with --vae-fast: its convolutions through cuDNN's graph API, the bias in the epilogue and of cuDNN's "
        "plans the fastest, timed at load (CUDA; the [cudnn] extra; the decoder 1.14x --vae-fast's alone at "
        "480p and 720p on an H100; end to end with the FP8 DiT 1.13x at 480p, 1.08x at 720p)",
    )
    decode_device: str | None = setting(
        None,
        "run the Wan VAE on this device (cuda:N), e.g. a GPU of its own beside the DiT's",
        metavar="DEVICE",
    )
    overlap_decode: bool | None = setting(
        None, "decode chunk c while the DiT computes chunk c+1 (default: on CUDA)"
    )
    early_first_frame: bool = setting(
        False,
        "hand a stream's first video frame over as soon as it is decoded, before the rest of its first chunk "
        "(that chunk then comes in two pieces with the same index: latent frame 0, then the others; the frames "
        "are the same)",
    )

    def _check(self) -> None:
        for name in ("vae", "taehv"):
            if self.decoder in ("preview", "none") and getattr(self, name):
                raise ConfigError(f"{arg(name)} is for {arg('decoder', name)}")
        if self.vae and self.taehv and self.decoder is None:
            raise ConfigError(
                f"{arg('vae')} and {arg('taehv')} each name a decoder: pick one with {arg('decoder', 'vae')} "
                f"or {arg('decoder', 'taehv')}"
            )
        if self.decoder == "taehv" and not self.taehv:
            raise ConfigError(
                f"{arg('decoder', 'taehv')} needs {arg('taehv')}: a taew2_1 .pth or .safetensors file, or random"
            )
        if self.tiny:
            for name in WAN_VAE_OPTIONS:
                if getattr(self, name):
                    raise ConfigError(
                        f"{arg(name)} acts on the Wan VAE decoder, not on {arg('taehv')}'s tiny one"
                    )
        if self.vae_cudnn and not self.vae_fast:
            raise ConfigError(
                f"{arg('vae_cudnn')} acts on {arg('vae_fast')}'s decoder: pass {arg('vae_fast')} too"
            )
        if self.decoder != "vae" and not self.vae:
            for name in WAN_VAE_OPTIONS:
                if getattr(self, name):
                    raise ConfigError(
                        f"{arg(name)} acts on the Wan VAE decoder: give {arg('vae')} or {arg('model_dir')}"
                    )

    @property
    def tiny(self) -> bool:
        """Whether the decoder is TAEHV's tiny one: --decoder taehv, or --taehv without --decoder."""
        return self.decoder == "taehv" or (self.decoder is None and bool(self.taehv))


@dataclass(frozen=True)
class PromptConfig(Section):
    """How text prompts are encoded and how prompt changes apply."""

    title: ClassVar[str] = "prompt"
    text_encoder: str | None = setting(
        None,
        "umT5 directory (text_encoder/ + tokenizer/, or one HF directory) for text prompts",
        metavar="DIR",
    )
    prompt_mode: str = setting(
        "swap",
        "how a prompt change applies: swap = the cross-attention K/V only; recache = also recompute the "
        "window's self-attention cache under the new prompt (one forward per cached chunk); cut = a new "
        "scene: the cache cleared, the stream going on as a fresh one of the new prompt",
        choices=PROMPT_MODES,
    )


@dataclass(frozen=True)
class StreamsConfig(Section):
    """Several streams on one engine: each its own KV cache slot, scheduled chunk by chunk."""

    title: ClassVar[str] = "streams"
    max_streams: int | None = setting(
        None,
        "streams served at once, each with a KV cache slot allocated at start (default: 1 for generate, "
        "else what half the device's free memory holds, at most 4)",
        minimum=1,
    )
    realtime_fps: float = setting(
        0.0,
        "admit a new stream only while every running stream keeps this many video frames per second "
        "(0: admit up to --max-streams and share the device fairly)",
        units="FPS",
        minimum=0,
    )


SECTIONS: dict[str, type[Section]] = {
    "source": ModelSource,
    "video": VideoConfig,
    "sampler": SamplerConfig,
    "parallel": ParallelConfig,
    "compute": ComputeConfig,
    "decode": DecodeConfig,
    "prompt": PromptConfig,
    "streams": StreamsConfig,
}
"""RunConfig's sections by attribute name."""


def _owner() -> dict[str, str]:
    owner: dict[str, str] = {}
    for part, cls in SECTIONS.items():
        for name in cls.names():
            assert name not in owner, f"setting {name} declared twice ({owner[name]}, {part})"
            owner[name] = part
    return owner


SETTING_SECTION = _owner()
"""Setting name -> the RunConfig section that declares it (every name is declared once)."""


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, by section. `RunConfig.of(preset="tiny", world_size=2)` builds one from
    the settings' names (as `ropesp.Pipeline` takes them); read them by section
    (`config.parallel.world_size`)."""

    source: ModelSource = field(default_factory=ModelSource)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)

    @classmethod
    def of(cls, base: RunConfig | None = None, **settings: Any) -> RunConfig:
        """A RunConfig from settings by name, over base (default: every default). An unknown name is
        refused with the known ones."""
        return (base or cls()).replace(**settings)

    def replace(self, **settings: Any) -> RunConfig:
        """A copy with settings (by name) changed, each in the section that declares it."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in settings.items():
            part = SETTING_SECTION.get(name)
            if part is None:
                raise ConfigError(
                    f"unknown setting {arg(name)}; the settings are {', '.join(sorted(SETTING_SECTION))}"
                )
            changes.setdefault(part, {})[name] = value
        parts = {p: dataclasses.replace(getattr(self, p), **c) for p, c in changes.items()}
        return dataclasses.replace(self, **parts)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready, by section."""
        return {part: getattr(self, part).to_dict() for part in SECTIONS}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Mapping[str, Any]]) -> RunConfig:
        """Inverse of to_dict; unknown sections or settings are refused by name."""
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"run config has unknown sections {unknown}")
        return cls(**{part: SECTIONS[part].from_dict(raw.get(part, {})) for part in SECTIONS})


SERVED_DEFAULTS: dict[str, Any] = {
    "local_attn_frames": 9,
    "sink_frames": 3,
    "realtime_fps": 16.0,
    "early_first_frame": True,
    "prompt_mode": "cut",
}
"""What an engine serving viewers (`ropesp demo`, `serve-repo`) runs with unless told: a rolling window of
three chunks, the first kept as the sink (streams run until the viewer stops them), admission that
keeps every stream at the video's 16 FPS, a new viewer's first frame handed over before the rest of
its first chunk is decoded, and a new prompt from the page starting its scene at the next chunk (with
swap the old scene stays in the window's cache: the demo model showed the new prompt's objects on time
after 1 of 8 switches, against 8 of 8 with cut, bench/RESULTS.md)."""

BUILD_SECTIONS = {
    "source": ("checkpoint", "model_config", "preset"),
    "video": (
        "height", "width", "latent_height", "latent_width", "frames", "latent_frames", "max_frames",
        "local_attn_frames", "sink_frames",
    ),
    "sampler": ("chunk_frames", "independent_first_frame"),
    "parallel": ("world_size", "ulysses_degree", "ring_degree"),
    "compute": ("dtype", "device"),
}  # fmt: skip
"""The run settings a build takes (the sections it shares with the runtime; the rest are the run's)."""
