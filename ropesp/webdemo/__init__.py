"""`ropesp demo`: a web page that shows a stream's frames as they are generated (the [demo] extra).

The server (aiohttp, `server.py`) holds one warm pipeline; a page (`static/`) opens a WebSocket, asks for a
stream, and receives each frame as a JPEG in a binary message, each chunk's figures in a JSON message
before its frames. One stream runs at a time: another tab is answered "busy" until it stops (a pipeline
owns one KV cache and, with several ranks, one rank group).
"""

from __future__ import annotations

from ropesp.extras import require


def check_demo_dependencies() -> None:
    """ConfigError naming the [demo] extra when one of its packages is missing (before any work)."""
    require("demo", "ropesp demo")
