"""The floating-point dtypes ropesp builds and runs in, by the names the CLI and manifests write."""

from __future__ import annotations

import torch

from ropesp.errors import ConfigError, arg

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(requested: str | None, device: str, given: str | None = None) -> str:
    """requested, else the device's default (bfloat16 on cuda, float32 on the cpu); ConfigError for a
    name outside DTYPES. given: the user's own setting (else requested came from an engines manifest,
    and the message says so)."""
    name = requested or ("bfloat16" if device == "cuda" else "float32")
    if name not in DTYPES:
        where = arg("dtype", name) if given else f"the engines' manifest dtype {name!r}"
        raise ConfigError(f"{where}: choose one of {sorted(DTYPES)}")
    return name
