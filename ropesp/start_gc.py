"""The cyclic garbage collector held off while a `ropesp generate` process starts.

    hold()      disable the collector (the CLI, before the command's imports)
    release()   collect once, freeze what is left alive into the permanent generation and enable
                the collector again (after the first chunk; idempotent, a no-op without hold())

A fresh process allocates ~180K objects that live as long as it does (torch's import, the model's
modules, the engines' wrappers): each full (generation-2) collection walks all of them, and a CPU
`ropesp generate` of the demo model ran three, 25-112 ms each (290 ms of collections in all; whole
process 3.07 s without the hold, 2.56 s with it; bench/RESULTS.md thirteenth session; a GPU engines
process started as fast without it, fourteenth session). After `gc.freeze` later collections skip
them. Nothing is collected while the collector is held, so the hold covers the start only, never a
whole stream or a server's life; the one collection at release frees the start's garbage (a compile
backend's start leaves much) instead of freezing it, once the first chunk is out.
"""

from __future__ import annotations

import gc

_held = False


def hold() -> None:
    """Disable the collector until release()."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def release() -> None:
    """Collect, freeze what is alive and enable the collector again, where hold() disabled it."""
    global _held
    if _held:
        _held = False
        gc.collect()
        gc.freeze()
        gc.enable()


def held() -> bool:
    """Whether hold() has the collector off now."""
    return _held
