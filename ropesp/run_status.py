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
    """torch's intra-op threads on each rank: spawned ranks split the host's cores (runtime/ranks.py),
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
    engines = res.config.source.engines
    if engines:
        lines.append(
            f"loading {res.backend} engines from {engines} "
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


def model_notes(res) -> list[str]:
    """What model runs, where the user named none (the embedded demo model, or random weights)."""
    source = res.config.source
    if res.random_weights:
        name = source.preset or "tiny"
        return [f"ropesp: no --checkpoint given: running the {name!r} preset on seeded random weights"]
    from ropesp.demo import default_checkpoint

    if source.checkpoint == str(default_checkpoint()) and res.model_dir is None:
        return [f"ropesp: no --checkpoint given: running the embedded demo model ({source.checkpoint})"]
    return []


def slow_model_warning(res) -> list[str]:
    """A model far too large for the CPU says so before the work, with the time to expect."""
    if res.device != "cpu":
        return []
    from ropesp.flops import video_flops

    flops = video_flops(
        res.model, res.geometry.frame_tokens, res.config.sampler, res.chunk_sizes()[0], res.cache
    )
    seconds = flops["total"] / CPU_FLOPS
    if seconds < SLOW_CHUNK_S:
        return []
    return [
        f"warning: this model on the CPU needs about {flops['total'] / 1e12:.1f} TFLOP per chunk: expect "
        f"{_duration(seconds)} for the first chunk (measured ~{CPU_FLOPS / 1e9:.0f} GFLOP/s on a 2-core CPU); "
        "use a GPU (--device cuda), or the demo model / --preset tiny to try it on the CPU"
    ]


CPU_FLOPS = 60e9
"""Matrix throughput of the project's 2-core CPU machine in float32 (GFLOP/s), for the slow-model warning."""
SLOW_CHUNK_S = 30.0
"""A first chunk expected to take longer than this on the CPU is warned about."""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def announce(res, out) -> None:
    """Print the settings line, warnings and long-work notes to `out` (a text stream)."""
    for line in [
        settings_line(res),
        *slow_path_warnings(res),
        *slow_model_warning(res),
        *long_work_lines(res),
    ]:
        print(line, file=out)
