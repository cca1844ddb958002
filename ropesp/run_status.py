"""What a run says before its long work: the settings in effect, what is about to take long, and warnings
for paths that are slow where they run."""

from __future__ import annotations

import os

import torch

COMPILE_NOTE = (
    "compiling the DiT with torch.compile before the first chunk "
    "(first run: ~2-3 min on a CPU, longer for big models; later runs reuse the cache)"
)


def cpu_threads_per_rank(world_size: int) -> int:
    """torch's intra-op threads on each rank: spawned ranks split the host's cores (runtime/launch.py),
    one rank keeps torch's own default."""
    if world_size > 1:
        return max(1, (os.cpu_count() or 1) // world_size)
    return torch.get_num_threads()


def settings_line(res) -> str:
    """One line: backend, precision, device, world size and layout, attention window, CPU threads.

    res: a ResolvedPipeline."""
    dtype = str(res.dtype).removeprefix("torch.")
    parts = [f"{res.backend} backend", f"{dtype} on {res.device}"]
    layout = res.layout
    if res.world_size > 1:
        parts.append(f"world size {res.world_size} (Ulysses {layout.ulysses} x ring {layout.ring})")
    else:
        parts.append("world size 1")
    cache = res.cache
    if cache.rolling:
        parts.append(f"rolling window {cache.local_attn_frames} latent frames ({cache.sink_frames} sink)")
    else:
        parts.append(f"global attention over {cache.max_frames} latent frames")
    threads = cpu_threads_per_rank(res.world_size)
    cpu = f"{threads} CPU thread{'s' if threads != 1 else ''} per rank"
    if res.backend == "ort":
        cpu += ", ONNX Runtime 1 intra-op thread"
    parts.append(cpu)
    return "ropesp: " + " · ".join(parts)


def long_work_lines(res) -> list[str]:
    """What takes long before the first chunk, said before it starts."""
    lines = []
    if res.request.engines:
        lines.append(
            f"loading {res.backend} engines from {res.request.engines} "
            f"({res.world_size} rank{'s' if res.world_size != 1 else ''}; SHA-256 checked)"
        )
    if res.backend == "compile":
        lines.append(COMPILE_NOTE)
    return lines


def slow_path_warnings(res) -> list[str]:
    """Warnings for settings that work but are slow on this device."""
    if res.device != "cpu":
        return []
    warnings = []
    if res.backend == "compile":
        warnings.append(
            "warning: --backend compile on the CPU spends minutes compiling before the first chunk and "
            "captures no CUDA graphs; eager (the default) or --backend ort start at once"
        )
    if res.dtype == torch.float16:
        warnings.append(
            "warning: --dtype float16 on the CPU is slow (a 1024x1536x1536 matrix product ran ~50x slower "
            "than in float32 on the project's CPU machine); use float32 (the CPU default) or bfloat16"
        )
    return warnings


def announce(res, out) -> None:
    """Print the settings line, warnings and long-work notes to `out` (a text stream)."""
    for line in [settings_line(res), *slow_path_warnings(res), *long_work_lines(res)]:
        print(line, file=out)
