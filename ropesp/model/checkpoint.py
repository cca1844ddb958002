"""Checkpoint reading and writing for CausalWanDiT (docs/MODEL.md section 1).

Layouts read, all normalised to the original Wan key names (`blocks.0.self_attn.q.weight`):
- Self-Forcing torch pickles (`.pt`, `.pth`, `.bin`): `generator_ema`, else `generator`, else `model`,
  else a bare state dict; `model.` prefixes and FSDP / activation-checkpoint / compile wrapper
  fragments are removed.
- Wan2.1 safetensors: one file, or shards named by a `*.safetensors.index.json` (the file or its
  directory). A `config.json` beside the weights is read as the model config.
- diffusers `WanTransformer3DModel` (a directory, or any of the above with diffusers key names),
  renamed through the one table `DIFFUSERS_NAMES`.
Tensors stay memory-mapped until `load_model` casts them one by one into a meta-built model.
`resolve_model` / `load_source` say which model config, default sizes and weights a ModelSource means,
for `ropesp build` and the runtime alike.
A StateDict maps each key to a tensor of the shape docs/MODEL.md section 1 names, e.g.
`blocks.0.self_attn.q.weight: [C, C]`, `patch_embedding.weight: [C, in_dim, 1, 2, 2]`.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ropesp.config import PRESETS, ModelConfig, PresetDefaults, defaults_preset, preset
from ropesp.errors import CheckpointError, ConfigError, read_failure
from ropesp.model.wan import RANDOM_WEIGHTS_SEED, CausalWanDiT, random_model
from ropesp.settings import ModelSource

StateDict = dict[str, torch.Tensor]
FORMATS = ("self-forcing", "wan", "wan-sharded", "diffusers")
_WRAPPER_KEYS = ("generator_ema", "generator", "model")
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_INDEX_SUFFIX = ".safetensors.index.json"
_WEIGHTS_NAME = "diffusion_pytorch_model"  # file stem used by Wan2.1 and diffusers
_LIST_LIMIT = 10

# Original Wan name -> diffusers WanTransformer3DModel name (module paths; `.weight`/`.bias` follow).
# `blocks.*.` stands for every block. Note the swap: diffusers' affine `norm2` is Wan's `norm3`.
DIFFUSERS_NAMES: dict[str, str] = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "blocks.*.modulation": "blocks.*.scale_shift_table",
    "blocks.*.norm3": "blocks.*.norm2",
    "blocks.*.ffn.0": "blocks.*.ffn.net.0.proj",
    "blocks.*.ffn.2": "blocks.*.ffn.net.2",
    **{
        f"blocks.*.{wan}.{a}": f"blocks.*.{hf}.{b}"
        for wan, hf in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for a, b in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    },
}
_FROM_DIFFUSERS = {hf: wan for wan, hf in DIFFUSERS_NAMES.items()}
BLOCK_PREFIX = re.compile(r"blocks\.(\d+)\.")
"""The prefix of a transformer block's weight key (`blocks.3.`; the block's index: group 1)."""


def block_index(key: str) -> int | None:
    """The transformer block a weight key belongs to (`blocks.3.ffn.0.weight` -> 3), None for others."""
    m = BLOCK_PREFIX.match(key)
    return int(m.group(1)) if m else None


def _rename(key: str, table: dict[str, str]) -> str:
    """Rename one key by the longest table entry that is a dotted prefix of it; unknown keys pass."""
    m = BLOCK_PREFIX.match(key)
    generic = "blocks.*." + key[m.end() :] if m else key
    for src in sorted(table, key=len, reverse=True):
        if generic == src or generic.startswith(src + "."):
            out = table[src] + generic[len(src) :]
            return out.replace("blocks.*.", m.group(0), 1) if m else out
    return key


def to_diffusers_key(key: str) -> str:
    """Original Wan key -> diffusers key (`blocks.3.norm3.weight` -> `blocks.3.norm2.weight`)."""
    return _rename(key, DIFFUSERS_NAMES)


def from_diffusers_key(key: str) -> str:
    """diffusers key -> original Wan key (`proj_out.bias` -> `head.head.bias`)."""
    return _rename(key, _FROM_DIFFUSERS)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


# --- reading ------------------------------------------------------------------------------------
def _locate(path: Path) -> tuple[list[Path], Path | None]:
    """Checkpoint path -> (files to read, sidecar config.json or None)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not any(path.glob("*.safetensors*")) and (path / "transformer").is_dir():
            path = path / "transformer"  # a diffusers pipeline root
        indexes = sorted(path.glob(f"*{_INDEX_SUFFIX}"))
        singles = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1 or (not indexes and len(singles) > 1):
            found = [p.name for p in (indexes or singles)]
            raise CheckpointError(f"checkpoint directory {path} is ambiguous: {found}; pass one file")
        if not indexes and not singles:
            raise CheckpointError(
                f"checkpoint directory {path} holds no *.safetensors or *{_INDEX_SUFFIX} file"
            )
        path = indexes[0] if indexes else singles[0]
    sidecar = path.parent / "config.json"
    if path.name.endswith(_INDEX_SUFFIX):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"shard index {path} is unreadable: {type(exc).__name__}: {exc}") from exc
        return [path.parent / name for name in sorted(set(weight_map.values()))], sidecar
    if path.suffix == ".safetensors":
        return [path], sidecar
    if path.suffix in _TORCH_SUFFIXES:
        return [path], None
    raise CheckpointError(
        f"checkpoint {path}: unknown suffix; expected {' '.join(_TORCH_SUFFIXES)}, .safetensors, "
        f"*{_INDEX_SUFFIX} or a directory"
    )


def _select_weights(obj: object, path: Path) -> StateDict:
    """Pick the generator weights out of a training checkpoint's top-level dict."""
    if isinstance(obj, dict):
        for name in _WRAPPER_KEYS:
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return obj
    keys = _listing([repr(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"checkpoint {path} has no state dict: expected a flat name->tensor dict, possibly under "
        f"{'/'.join(_WRAPPER_KEYS)}; found {keys}"
    )


def _read_file(path: Path) -> StateDict:
    """Tensors of one file, memory-mapped where the format allows."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) torch.save files cannot be mapped
    return _select_weights(torch.load(path, map_location="cpu", mmap=mmap, weights_only=True), path)


def _normalise(sd: StateDict, path: Path) -> StateDict:
    """Strip wrapper prefixes and rename diffusers keys to the original Wan names."""
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)
    out: StateDict = {}
    for key, tensor in sd.items():
        new = key
        for fragment in _WRAPPER_FRAGMENTS:
            new = new.replace(fragment, "")
        new = new.removeprefix("model.")
        new = from_diffusers_key(new) if diffusers else new
        if new in out:
            raise CheckpointError(f"checkpoint {path}: two tensors map to the key {new!r} (one is {key!r})")
        out[new] = tensor
    return out


def load_state_dict(
    path: str | Path, *, model_config_path: str | Path | None = None
) -> tuple[StateDict, ModelConfig | None]:
    """Read any supported layout -> (state dict in original Wan names, config if one is known).

    The config is `model_config_path` if given, else a `config.json` beside safetensors weights
    (Wan or diffusers style), else None. Tensors are CPU, memory-mapped, in the file's dtype.
    """
    path = Path(path)
    files, sidecar = _locate(path)
    sd: StateDict = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {file} does not exist")
        try:
            part = _read_file(file)
        except CheckpointError:
            raise
        except Exception as exc:  # torch/safetensors/pickle each raise their own types
            raise CheckpointError(f"cannot read checkpoint {file}: {read_failure(exc)}") from exc
        sd.update(part)
    sd = _normalise(sd, path)
    cfg_path = Path(model_config_path) if model_config_path is not None else sidecar
    if cfg_path is None or (model_config_path is None and not cfg_path.is_file()):
        return sd, None
    try:
        return sd, ModelConfig.from_json(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(f"model config {cfg_path} of checkpoint {path} is unusable: {exc}") from exc


# --- matching -----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model built from cfg (on the meta device: no memory)."""
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_config(state_dict: StateDict) -> ModelConfig:
    """The preset whose keys and shapes equal those of state_dict; CheckpointError if none does."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for make, _ in PRESETS.values():
        cfg = make()
        if _expected_shapes(cfg) == shapes:
            return cfg
    dim = shapes.get("patch_embedding.weight", ("?",))[0]
    layers = len({block_index(k) for k in shapes} - {None})
    raise CheckpointError(
        f"the checkpoint ({len(shapes)} tensors, dim {dim}, {layers} blocks) matches none of the "
        f"presets {sorted(PRESETS)}; pass --model-config with its config.json"
    )


def _check_fit(sd: StateDict, cfg: ModelConfig, path: Path) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} (checkpoint {list(sd[k].shape)}, model {list(shape)})"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    problems = [
        f"{len(items)} {label}: {_listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model (dim {cfg.dim}, {cfg.num_layers} layers, "
            f"{cfg.num_heads} heads): " + "; ".join(problems) + ". Check --preset / --model-config."
        )


def load_model(
    path: str | Path | None,
    cfg: ModelConfig | None = None,
    *,
    model_config_path: str | Path | None = None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = RANDOM_WEIGHTS_SEED,
) -> tuple[CausalWanDiT, ModelConfig]:
    """Build CausalWanDiT on the meta device and assign the checkpoint's tensors, cast to dtype.

    Config precedence: cfg, then model_config_path / config.json beside the weights, then the
    preset matching the tensor shapes. path=None gives seeded random weights (`random_model`) and
    needs cfg. Returns the model in eval mode on device, without gradients.
    """
    if path is None:
        if cfg is None:
            raise CheckpointError("no checkpoint and no model config: pass a checkpoint or a preset")
        model = random_model(cfg, dtype, device, seed)
    else:
        sd, file_cfg = load_state_dict(path, model_config_path=model_config_path)
        cfg = cfg or file_cfg or infer_config(sd)
        _check_fit(sd, cfg, Path(path))
        with torch.device("meta"):
            model = CausalWanDiT(cfg)
        cast: StateDict = {}
        for key in list(sd):  # one tensor at a time: never two full copies in RAM
            cast[key] = sd.pop(key).to(device=device, dtype=dtype)
        model.load_state_dict(cast, strict=True, assign=True)
        model.merge_stream_adapter()
    return model.eval().requires_grad_(False), cfg


# --- writing ------------------------------------------------------------------------------------
def _wan_config(cfg: ModelConfig) -> dict:
    return {"_class_name": "WanModel", "model_type": "t2v", **cfg.to_dict()}


def _diffusers_config(cfg: ModelConfig) -> dict:
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
    }


def _write_safetensors(sd: StateDict, directory: Path, num_shards: int) -> None:
    """One `diffusion_pytorch_model.safetensors`, or num_shards shards of similar size + index."""
    if num_shards == 1:
        save_file(sd, directory / f"{_WEIGHTS_NAME}.safetensors", metadata={"format": "pt"})
        return
    total = sum(t.nbytes for t in sd.values())
    target = math.ceil(total / num_shards)
    shards: list[StateDict] = [{}]
    size = 0  # bytes in the last shard
    for key, tensor in sd.items():
        if shards[-1] and size + tensor.nbytes > target and len(shards) < num_shards:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{_WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{_WEIGHTS_NAME}{_INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))


def save_checkpoint(
    model_or_state_dict: nn.Module | StateDict,
    path: str | Path,
    fmt: str,
    *,
    cfg: ModelConfig | None = None,
    num_shards: int | None = None,
) -> Path:
    """Write weights in a real-world layout; returns path.

    fmt: 'self-forcing' (torch pickle `{"generator_ema": {"model." + key: tensor}}`), 'wan' (one
    safetensors file), 'wan-sharded' (directory: num_shards >= 2 shards, index, Wan config.json) or
    'diffusers' (directory: renamed keys, diffusers config.json). cfg defaults to the model's, else
    the preset matching the state dict's shapes (needed for the directory formats' config.json).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is unknown; choose one of {FORMATS}")
    if isinstance(model_or_state_dict, nn.Module):
        cfg = cfg or getattr(model_or_state_dict, "cfg", None)
        model_or_state_dict = model_or_state_dict.state_dict()
    sd = {k: v.detach().contiguous() for k, v in model_or_state_dict.items()}
    path = Path(path)
    if fmt == "self-forcing":
        torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, path)
        return path
    if fmt == "wan":
        save_file(sd, path, metadata={"format": "pt"})
        return path
    cfg = cfg or infer_config(sd)
    shards = num_shards if num_shards is not None else (2 if fmt == "wan-sharded" else 1)
    if fmt == "wan-sharded" and shards < 2:
        raise ValueError(f"num_shards={shards}: 'wan-sharded' needs at least 2 shards")
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        sd = {to_diffusers_key(k): v for k, v in sd.items()}
    _write_safetensors(sd, path, shards)
    config = _diffusers_config(cfg) if fmt == "diffusers" else _wan_config(cfg)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def peek_config(
    path: str | Path, model_config_path: str | Path | None = None, preset_name: str | None = None
) -> ModelConfig:
    """The config a checkpoint will load with, checked against its keys and shapes (mmap: cheap).

    Precedence: --model-config, a config.json beside the weights, --preset, the matching preset.
    Raises CheckpointError before any rank starts when the checkpoint and the config disagree.
    """
    sd, file_cfg = load_state_dict(path, model_config_path=model_config_path)
    cfg = file_cfg or (preset(preset_name)[0] if preset_name else None) or infer_config(sd)
    _check_fit(sd, cfg, Path(path))
    return cfg


def resolve_model(
    source: ModelSource, default_preset: str | None = None
) -> tuple[ModelConfig, PresetDefaults]:
    """The model config of a source (peek_config's precedence for a checkpoint, then --model-config,
    then the preset: default_preset when source names none) and the sizes it runs at by default: those
    of the preset whose model it is (the demo's for the demo family at any size), else of source.preset,
    else Wan2.1-1.3B's. source.engines is the runtime's (it reads the manifest instead). Raises
    CheckpointError/ConfigError before any weights load."""
    if source.checkpoint:
        cfg = peek_config(source.checkpoint, source.model_config, source.preset)
    elif source.model_config:
        cfg = ModelConfig.from_json(source.model_config)
    else:
        return preset(source.preset or default_preset)
    return cfg, preset(defaults_preset(cfg) or source.preset or "wan2.1-1.3b")[1]


def load_source(source: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
    """The eager model of a resolved source (cfg from resolve_model) on device in dtype: the checkpoint's
    weights, or the preset's seeded random ones (the same for `ropesp build` and the runtime)."""
    return load_model(
        source.checkpoint, cfg, model_config_path=source.model_config, dtype=dtype, device=device
    )[0]
