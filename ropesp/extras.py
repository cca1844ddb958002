"""Optional dependencies: which extra of pyproject.toml brings which modules, checked before any work."""

from __future__ import annotations

import importlib.util

from ropesp.errors import ConfigError

EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime", "onnxruntime_extensions"),
    "trt": ("tensorrt",),
    "vae": ("diffusers",),
    "bench": ("matplotlib",),
    "demo": ("aiohttp", "PIL"),
    "cudnn": ("cudnn",),
}
"""Extra name -> the modules it provides (import names; located, not imported)."""

BACKEND_EXTRAS = {"ort": ("onnx",)}
"""Runtime backend -> the extras it needs. TensorRT is not listed: PyPI's full TensorRT wheels download
from a vendor index, so its own check (export/tensorrt.py, plugins/rope_sp_trt.py) says what to do."""


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """ConfigError naming the extra when one of its modules is missing; `what` says what needs it
    (e.g. "--plot", "--backend ort")."""
    missing = missing_modules(extra)
    if missing:
        raise ConfigError(
            f"{what} needs the [{extra}] extra (missing: {', '.join(missing)}): "
            f"pip install -e '.[{extra}]' (or pip install 'ropesp[{extra}]')"
        )


def require_backend(backend: str, what: str | None = None) -> None:
    """The extras a runtime backend needs (ort: [onnx])."""
    for extra in BACKEND_EXTRAS.get(backend, ()):
        require(extra, what or f"--backend {backend}")
