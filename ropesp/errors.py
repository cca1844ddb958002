"""Exceptions that carry an actionable message for the user.

Every public entry point raises one of these for bad input; the CLI prints the message and exits
with status 2 instead of showing a traceback.
"""


class RopespError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class ConfigError(RopespError, ValueError):
    """A size, flag or file content is outside the accepted range."""


class CheckpointError(RopespError):
    """A checkpoint is missing, unreadable or does not match the model config."""


class EngineError(RopespError):
    """An engine directory is missing, corrupted or built for another setup."""


class BackendUnavailableError(RopespError):
    """An optional backend (TensorRT, ONNX Runtime, Triton) is not installed here."""


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
