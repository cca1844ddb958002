"""`ropesp demo`: a web page that shows a stream's frames as they are generated (the [demo] extra).

The server (aiohttp, `server.py`) holds one warm pipeline; a page (`static/`) opens a WebSocket, asks for a
stream, and receives each frame as a JPEG in a binary message, each chunk's figures in a JSON message
before its frames. One stream runs at a time: another tab is answered "busy" until it stops (a pipeline
owns one KV cache and, with several ranks, one rank group).
"""

from __future__ import annotations

import importlib.util

from ropesp.errors import ConfigError

DEMO_PACKAGES = {"aiohttp": "aiohttp", "PIL": "pillow"}
"""Modules the demo imports -> the packages of the [demo] extra that provide them."""


def check_demo_dependencies() -> None:
    """ConfigError naming the [demo] extra when one of its packages is missing (before any work)."""
    missing = [pkg for mod, pkg in DEMO_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(
            f"ropesp demo needs {', '.join(missing)}: pip install -e '.[demo]' (or pip install 'ropesp[demo]')"
        )
