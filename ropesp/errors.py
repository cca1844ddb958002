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


class BuildError(RopespError):
    """An engine cannot be built here: a toolchain is missing or produces artifacts that would not load."""
