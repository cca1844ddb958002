"""The CUDA driver's primary context of one GPU, made on a thread while `import torch` runs.

A fresh process pays for CUDA's start at its first device use: the driver's initialization (`cuInit`)
and the device's primary context (`cuDevicePrimaryCtxRetain`). PyTorch's CUDA runtime works in that same
primary context, retaining it at its own first use, so a context made earlier is simply found. Made
through ctypes on a thread (ctypes releases the GIL for the foreign call), it overlaps the ~1.8 s
import of torch instead of following it. Nothing here imports torch.

    context = PrimaryContext.start(ordinal)   # None where there is no CUDA driver
    ...                                       # import torch, load the model
    context.release()                         # where this process will not use the GPU after all
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

DRIVER_LIBRARY = "libcuda.so.1"


class PrimaryContext:
    """The retained primary context of device `ordinal` (an index among CUDA_VISIBLE_DEVICES, as
    torch's cuda:N), made on a daemon thread."""

    def __init__(self, driver: ctypes.CDLL, ordinal: int) -> None:
        self._driver, self.ordinal = driver, ordinal
        self._device = ctypes.c_int(-1)
        self.error: str | None = None
        self.seconds: float | None = None
        """How long the driver took (cuInit and the context), once the thread has ended."""
        self._retained = False
        self.handle: ctypes.c_void_p | None = None
        """The context (CUcontext), once made."""
        self._thread = threading.Thread(target=self._make, name="ropesp-cuda-context", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, ordinal: int = 0, library: str = DRIVER_LIBRARY) -> PrimaryContext | None:
        """Begin making the context; None where the CUDA driver library is not on this machine."""
        try:
            driver = ctypes.CDLL(library)
        except OSError:
            return None
        return cls(driver, ordinal)

    def _make(self) -> None:
        t0 = time.perf_counter()
        drv = self._driver
        context = self.handle = ctypes.c_void_p()
        for call, args in (
            ("cuInit", (0,)),
            ("cuDeviceGet", (ctypes.byref(self._device), self.ordinal)),
            ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), self._device)),
        ):
            status = getattr(drv, call)(*args)
            if status != 0:  # no GPU, a bad ordinal, a busy device: torch's own start reports it
                self.error = f"{call} returned CUDA error {status}"
                break
        else:
            self._retained = True
        self.seconds = time.perf_counter() - t0

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the context is made (after waiting up to timeout seconds for the thread)."""
        self._thread.join(timeout)
        return self._retained

    def release(self) -> None:
        """Give the retained reference back (the context goes once no user holds it)."""
        self._thread.join()
        if self._retained:
            self._driver.cuDevicePrimaryCtxRelease(self._device)
            self._retained = False


def start_for_local_device(world_size: int | None) -> PrimaryContext | None:
    """The context of the GPU this process will use, where that is known before anything is parsed:
    a single-rank run (world_size None or 1: cuda:0) or a rank under a launcher (LOCAL_RANK). None
    otherwise (the parent of spawned ranks uses no GPU)."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return PrimaryContext.start(int(local))
    if world_size in (None, 1):
        return PrimaryContext.start(0)
    return None
