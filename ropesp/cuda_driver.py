"""The CUDA driver library through ctypes, for the few calls that must not hold the GIL.

ctypes releases the GIL for the length of a foreign call, so these run alongside Python on other
threads: the primary context made while torch imports (runtime/cuda_context.py), the page-locked
staging blocks of the weights reader, freed on its threads (model/weights_file.py). Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import functools

DRIVER_LIBRARY = "libcuda.so.1"


@functools.cache
def load(library: str = DRIVER_LIBRARY) -> ctypes.CDLL | None:
    """The driver library, or None where this machine has none."""
    try:
        return ctypes.CDLL(library)
    except OSError:
        return None


def host_alloc(nbytes: int) -> int | None:
    """Page-locked host memory of nbytes for asynchronous copies (cuMemHostAlloc, what cudaHostAlloc
    calls), in the calling thread's current context; its address, or None where there is no driver or
    it refused (the caller then uses pageable memory: synchronous copies, the same bytes)."""
    driver = load()
    if driver is None:
        return None
    address = ctypes.c_void_p()
    if driver.cuMemHostAlloc(ctypes.byref(address), ctypes.c_size_t(nbytes), 0) != 0:
        return None
    return address.value


def host_free(address: int) -> None:
    """Free host_alloc's memory (no copy from it may be pending)."""
    driver = load()
    if driver is not None:
        driver.cuMemFreeHost(ctypes.c_void_p(address))
