"""The CUDA driver library through ctypes, for the few calls that must not hold the GIL.

ctypes releases the GIL for the length of a foreign call, so these run alongside Python on other
threads: the primary context made while torch imports (runtime/cuda_context.py), the page-locking of
the weights reader's staging blocks (model/weights_file.py). PyTorch's own bindings of the same calls
(`torch.cuda.cudart().cudaHostRegister`) keep the GIL. Nothing here imports torch.
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


def host_register(address: int, nbytes: int) -> bool:
    """Page-lock [address, address + nbytes) of host memory for asynchronous copies (cuMemHostRegister);
    False where it cannot be (no driver, or the driver refused: the memory stays pageable, and copies
    from it are synchronous but correct)."""
    driver = load()
    if driver is None:
        return False
    return driver.cuMemHostRegister_v2(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), 0) == 0


def host_unregister(address: int) -> None:
    """Undo host_register (the memory must not be in use by a pending copy)."""
    driver = load()
    if driver is not None:
        driver.cuMemHostUnregister(ctypes.c_void_p(address))
