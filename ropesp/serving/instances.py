"""Many engines per Triton model: the GPUs each model instance's engine takes.

A repository written with `ropesp serve-repo --instances N` runs N Triton model instances (KIND_MODEL),
each one engine core with its own ranks, KV cache slots and decoder (triton_model.py). On CUDA, instance
i of engines of world size P takes GPUs i*P .. i*P+P-1 of those the server sees (the entries of
CUDA_VISIBLE_DEVICES when it is set, else every GPU the driver counts): before anything initialises CUDA
in its stub process, the instance narrows CUDA_VISIBLE_DEVICES to its slice, so its rank 0 and the ranks
it spawns (they inherit the environment) use cuda:0 .. cuda:P-1 of that slice. Triton's sequence batcher
sends every request of a stream to the instance that holds it (repository.py config_pbtxt).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from ropesp.errors import ConfigError

VISIBLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices, or UUIDs where the list
    names them); read without initialising CUDA, which would fix the visible set for this process."""
    listed = os.environ.get(VISIBLE)
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    return [str(i) for i in range(_driver_gpu_count())]


def _driver_gpu_count() -> int:
    """GPUs the NVIDIA driver knows (NVML, which creates no CUDA context); 0 without a driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        count = ctypes.c_uint(0)
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def instance_gpus(visible: Sequence[str], instance: int, instances: int, world_size: int) -> list[str]:
    """The GPUs of model instance `instance` (0-based) of `instances`, each an engine of `world_size`
    ranks on GPUs of their own: visible[instance*P : instance*P + P]. ConfigError when the instances
    together need more GPUs than `visible` holds (every instance refuses alike)."""
    if not 0 <= instance < instances:
        raise ConfigError(f"model instance {instance} is outside the repository's {instances} instances")
    need = instances * world_size
    if need > len(visible):
        raise ConfigError(
            f"--instances {instances} x --world-size {world_size} needs {need} GPUs (one engine's ranks each on "
            f"GPUs of their own); {_described(visible)}"
        )
    return list(visible[instance * world_size : (instance + 1) * world_size])


def _described(visible: Sequence[str]) -> str:
    listed = os.environ.get(VISIBLE)
    where = f" ({VISIBLE}={listed})" if listed is not None else ""
    return f"this host has {len(visible)} visible{where}"


def pin_instance_gpus(config, instance: int, instances: int) -> list[str] | None:
    """Narrow CUDA_VISIBLE_DEVICES to instance `instance`'s GPUs when the repository serves several
    engines on CUDA; returns them (None: one instance, or an engine on the CPU, which keeps the
    environment). Call before anything initialises CUDA in this process."""
    if instances == 1:
        return None
    from ropesp.manifest import Manifest
    from ropesp.runtime.pipeline import run_device

    visible = visible_gpus()
    manifest = Manifest.load(config.source.engines) if config.source.engines else None
    if run_device(config.compute.device, manifest, bool(visible)) != "cuda":
        return None
    gpus = instance_gpus(visible, instance, instances, config.parallel.world_size or 1)
    os.environ[VISIBLE] = ",".join(gpus)
    return gpus
