"""ropesp: Causal-RoPE sequence-parallel export and runtime for streaming causal video DiTs.

`ropesp.Pipeline` (ropesp/api.py) is the Python API; it is imported on first use, so `import ropesp`
stays cheap (no torch).
"""

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "ropesp.api",
    "Stream": "ropesp.api",
    "StreamChunk": "ropesp.api",
    "Video": "ropesp.api",
    "AtCapacity": "ropesp.runtime.engine_core",
}
__all__ = ["AtCapacity", "Pipeline", "Stream", "StreamChunk", "Video", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ropesp' has no attribute {name!r}")
