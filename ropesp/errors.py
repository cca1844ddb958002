"""Exceptions that carry an actionable message for the user.

Every public entry point raises one of these for bad input; the CLI prints the message and exits
with status 2 instead of showing a traceback. Messages name a parameter through `arg`, so the same
check reads `--frames 5` on the command line and `frames=5` from Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import PurePath

_UNSET = object()


class RopespError(Exception):
    """Base class: a problem the user can fix, described in the message."""

    exit_code = 2
    """The CLI's exit status for it: 2 for a bad setting or input, 1 for a run that failed on the way."""


class ConfigError(RopespError, ValueError):
    """A size, flag or file content is outside the accepted range."""


class CheckpointError(RopespError):
    """A checkpoint is missing, unreadable or does not match the model config."""


class EngineError(RopespError):
    """An engine directory is missing, corrupted or built for another setup."""


class BackendUnavailableError(RopespError):
    """An optional backend (TensorRT, ONNX Runtime, Triton) is not installed here."""


class BuildError(RopespError):
    """An engine cannot be built here: a toolchain is missing or produces artifacts that would not load."""


class OutputError(RopespError):
    """An output could not be written (a full disk, a vanished directory); nothing partial is left."""

    exit_code = 1


# --- how a message names a parameter: as the caller spelled it -----------------------------------
_PYTHON_NAMES: ContextVar[bool] = ContextVar("ropesp_python_names", default=False)


def arg(name: str, value: object = _UNSET) -> str:
    """A parameter as the current caller wrote it: `--local-attn-frames 4` on the command line (the
    default), `local_attn_frames=4` inside `python_names()` (the Python API). name: the Python name."""
    if _PYTHON_NAMES.get():
        if isinstance(value, PurePath):  # a path as the caller wrote it, not its class
            value = str(value)
        return name if value is _UNSET else f"{name}={value!r}"
    flag = "--" + name.replace("_", "-")
    return flag if value is _UNSET else f"{flag} {value}"


@contextlib.contextmanager
def python_names() -> Iterator[None]:
    """Inside this block (this thread / task), messages name Python arguments, not CLI flags."""
    token = _PYTHON_NAMES.set(True)
    try:
        yield
    finally:
        _PYTHON_NAMES.reset(token)


def read_failure(exc: BaseException) -> str:
    """One line on why a weights or tensor file could not be read: the error's first line, except that
    torch's weights_only refusal (whose text suggests unpickling the file) becomes a plain statement."""
    import pickle

    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        return (
            "not a file of plain tensors (safetensors, or torch.save of tensors); ropesp never unpickles "
            "other objects"
        )
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}"
