"""Up-front limits of a run, checked before any rank starts or any buffer is allocated: the rank count
against the chunk and this host, the KV cache against memory."""

from __future__ import annotations

import os
import sys

from ropesp.config import CacheConfig, ModelConfig
from ropesp.errors import ConfigError, arg

GIB = 1024**3


def check_rank_count(world_size: int, chunk_tokens: int) -> None:
    """Every rank holds at least one real token of the smallest chunk (chunk_tokens)."""
    if world_size > chunk_tokens:
        raise ConfigError(
            f"{arg('world_size', world_size)} exceeds the {chunk_tokens} tokens of a chunk: every rank needs at "
            "least one token"
        )


def check_local_ranks(world_size: int, device: str) -> None:
    """Ranks spawned on this host: ConfigError beyond its visible GPUs; a warning beyond its CPU cores."""
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if world_size > count:
            raise ConfigError(
                f"{arg('world_size', world_size)} needs {world_size} GPUs (one per rank); this host has {count} visible"
            )
        return
    cores = os.cpu_count() or 1
    if world_size > cores:
        print(
            f"ropesp: warning: {arg('world_size', world_size)} CPU ranks on {cores} cores: they will share the "
            "cores and run slower than fewer ranks",
            file=sys.stderr,
        )


def kv_cache_bytes(
    cfg: ModelConfig, frame_tokens: int, cache: CacheConfig, dtype_bytes: int, world_size: int
) -> int:
    """Bytes of one rank's self-attention cache: K and V [num_layers, 1, S, H, D] over P ranks
    (Ulysses splits the heads, the ring the slots S = slot frames x frame tokens)."""
    total = 2 * cfg.num_layers * cache.slot_frames * frame_tokens * cfg.dim * dtype_bytes
    return -(-total // world_size)


def memory_bytes(device: str) -> int | None:
    """Memory of one GPU (cuda) or of this host (cpu); None when unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory_bytes(device: str) -> int | None:
    """Memory free now on one GPU (cuda: the current device) or on this host (cpu); None when unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return memory_bytes(device)


def check_cache_fits(
    cfg: ModelConfig,
    frame_tokens: int,
    cache: CacheConfig,
    dtype_bytes: int,
    world_size: int,
    device: str,
    slots: int = 1,
) -> None:
    """Refuse KV cache slots (one per stream served at once) larger than the memory they would live in
    (a GPU per rank; the CPU ranks of a host share its memory) before anything is allocated."""
    per_rank = kv_cache_bytes(cfg, frame_tokens, cache, dtype_bytes, world_size) * slots
    need = per_rank if device == "cuda" else per_rank * world_size
    have = memory_bytes(device)
    if have is not None and need > have:
        where = "one GPU" if device == "cuda" else "this host"
        streams = f" x {slots} streams" if slots > 1 else ""
        raise ConfigError(
            f"the KV cache of {cache.slot_frames} latent frames{streams} needs {need / GIB:.1f} GiB, more than "
            f"the {have / GIB:.1f} GiB of {where}: use a shorter video ({arg('frames')}, {arg('max_frames')}), "
            f"a rolling window ({arg('local_attn_frames')}), fewer {arg('max_streams')} or more ranks"
        )
