"""The demo's web server: aiohttp, one WebSocket per page, each page its own stream of the engine.

Protocol (`/ws`). Page -> server, JSON text: `{"type": "start", "prompt": str, "seed": int}`,
`{"type": "prompt", "prompt": str}` (the running stream's next chunk boundary), `{"type": "stop"}`.
Server -> page, JSON text: `hello` (figures of the server), `started`, `chunk` (sent before the chunk's
frames: index, first frame, frame count, generation ms, prompt in effect), `busy`, `free`, `stopped`,
`error`; binary: one frame per message (`frames.FRAME_HEADER` + JPEG). A page that starts while the engine
is at capacity (every KV cache slot taken, or real time would be lost: runtime/engine_core.py) is told
`busy` with the engine's reason, and `free` when a stream has ended.

Threads: the pipeline's iterator blocks, so each stream runs it on a worker thread that encodes the frames
and hands chunks to the event loop. With `realtime`, a chunk is released only when the page's 16 FPS
playback reaches it, and the worker waits for a free slot before it hands over the next: generation stays
at most `lead_chunks` ahead of what is on screen, so an unbounded stream holds bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import ipaddress
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ropesp.errors import ConfigError, RopespError, python_names
from ropesp.settings import check_seed
from ropesp.video import VIDEO_FPS
from ropesp.webdemo.frames import encode_jpeg, frame_message
from ropesp.webdemo.prompts import PagePrompts

DEFAULT_PROMPT = "a red square moving right"
MAX_PROMPT_CHARS = 1000
_END = object()


@dataclass(frozen=True)
class DemoConfig:
    """How the demo serves."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default: the page controls a GPU-sized process)."""
    port: int = 8188
    """TCP port; 0 picks a free one."""
    frames: int | None = None
    """Video frames per stream; None: until the page stops it (needs a pipeline with a rolling window)."""
    jpeg_quality: int = 85
    realtime: bool = True
    """Hold generation to the page's 16 FPS playback (a faster model waits; a slower one is shown as its
    frames arrive)."""
    lead_chunks: int = 2
    """With realtime: chunks generated ahead of the one on screen."""
    default_prompt: str = DEFAULT_PROMPT
    title: str = "ropesp demo"
    """Shown on the page with the pipeline's description."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is outside 0..65535 (0: a free port)")
        if self.frames is not None and (self.frames < 1 or (self.frames - 1) % 4):
            raise ConfigError(
                f"--frames {self.frames} must be 4*k + 1 video frames, e.g. 33 or 81 (or omitted: stream "
                "until the page stops it)"
            )
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"--jpeg-quality {self.jpeg_quality} is outside 1..95")
        if self.lead_chunks < 1:
            raise ConfigError(f"lead_chunks {self.lead_chunks} must be >= 1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _ChunkOut:
    index: int
    first_frame: int
    jpegs: list[bytes]
    gen_ms: float
    timings: dict
    prompt: str


class _Run:
    """One stream: the pipeline's iterator on a worker thread; chunks go to `queue` on the event loop."""

    _ids = 0

    def __init__(
        self, pipe, encode, loop: asyncio.AbstractEventLoop, prompt: str, seed: int, config: DemoConfig
    ) -> None:
        _Run._ids += 1
        self.id = _Run._ids
        self.pipe, self.encode, self.loop, self.config = pipe, encode, loop, config
        self.prompt, self.seed = prompt, seed
        self.queue: asyncio.Queue = asyncio.Queue()
        self.slots = threading.Semaphore(config.lead_chunks)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self._stream = None
        self.thread = threading.Thread(target=self._work, name=f"ropesp-demo-stream-{self.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def set_prompt(self, prompt: str) -> None:
        """Applied by the worker before it asks for the next chunk."""
        with self._lock:
            self._pending_prompt = prompt

    def stop(self) -> None:
        """Thread-safe: the stream ends after its current chunk; the worker stops waiting for a slot."""
        self.stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def _hand_over(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        from ropesp.runtime.engine_core import AtCapacity

        stream = None
        try:
            stream = self.pipe.stream(self.encode(self.prompt), seed=self.seed, frames=self.config.frames)
            with self._lock:
                self._stream = stream
            if self.stopping.is_set():
                return
            iterator = iter(stream)
            # prompts[v]: the prompt of version v (chunk.prompt_version counts the changes applied)
            frame, prompts = 0, [self.prompt]
            while not self.stopping.is_set():
                with self._lock:
                    new, self._pending_prompt = self._pending_prompt, None
                if new is not None:
                    try:
                        stream.set_prompt(self.encode(new))  # applied from the next chunk
                        prompts.append(new)
                    except (RopespError, ValueError) as exc:  # e.g. a word the encoder does not know: go on
                        self._hand_over(_Notice(f"prompt change refused: {exc}"))
                t0 = time.perf_counter()
                try:
                    chunk = next(iterator, None)
                except AtCapacity as exc:  # the engine holds as many streams as it can keep in real time
                    self._hand_over(_Busy(str(exc)))
                    return
                gen_ms = (time.perf_counter() - t0) * 1e3
                if chunk is None:
                    break
                version = getattr(chunk, "prompt_version", len(prompts) - 1)
                prompt = prompts[min(version, len(prompts) - 1)]
                jpegs = [encode_jpeg(f, self.config.jpeg_quality) for f in chunk.frames]
                out = _ChunkOut(
                    chunk.index, frame, jpegs, gen_ms, dict(getattr(chunk, "timings", {}) or {}), prompt
                )
                while not self.slots.acquire(timeout=0.05):
                    if self.stopping.is_set():
                        return
                self._hand_over(out)
                frame += len(jpegs)
        except BaseException as exc:  # the page is told; the server goes on
            self._hand_over(exc)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()  # frees its KV cache slot for the next page now
            self._hand_over(_END)


@dataclass
class _Busy:
    """The engine refused the stream: at capacity."""

    text: str


@dataclass
class _Notice:
    """A message for the page that does not end the stream."""

    text: str


class _Hub:
    """The server's state: the pages connected and each page's running stream."""

    def __init__(self, pipe, config: DemoConfig, description: str) -> None:
        self.pipe, self.config, self.description = pipe, config, description
        self.prompts = PagePrompts(pipe, config.default_prompt)
        self.sockets: set[web.WebSocketResponse] = set()
        self.runs: dict[web.WebSocketResponse, tuple[_Run, asyncio.Task]] = {}
        self.refused: set[web.WebSocketResponse] = set()
        """Pages told `busy`: they are told `free` when a stream ends."""

    def hello(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": "hello",
            "title": c.title,
            "model": self.description,
            "fps": VIDEO_FPS,
            "frames": c.frames,
            "realtime": c.realtime,
            "default_prompt": c.default_prompt,
            "busy": len(self.runs) >= self.pipe.max_streams,
            "streams": len(self.runs),
            "max_streams": self.pipe.max_streams,
            "prompts": self.prompts.note,
            "examples": list(self.prompts.examples),
        }

    async def start(self, ws: web.WebSocketResponse, prompt: str, seed: int) -> None:
        await self.stop(ws)  # the same page starting again: its old stream ends first, at once
        run = _Run(self.pipe, self.prompts, asyncio.get_running_loop(), prompt, seed, self.config)
        await ws.send_json({"type": "started", "stream": run.id, "prompt": prompt, "seed": seed})
        run.start()
        self.runs[ws] = (run, asyncio.create_task(self._send(ws, run)))

    async def stop(self, ws: web.WebSocketResponse) -> None:
        """Stop this page's stream (if any) and wait until its worker thread has ended."""
        entry = self.runs.get(ws)
        if entry is None:
            return
        run, sender = entry
        run.stop()
        await sender

    async def stop_all(self) -> None:
        for ws in list(self.runs):
            await self.stop(ws)

    async def _send(self, ws: web.WebSocketResponse, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        reason, t_start, frames, gen_ms, playback_t0 = "finished", loop.time(), 0, 0.0, None
        try:
            while True:
                item = await run.queue.get()
                if item is _END:
                    break
                if isinstance(item, _Notice):
                    await ws.send_json({"type": "error", "message": item.text})
                    continue
                if isinstance(item, _Busy):
                    reason = "busy"
                    self.refused.add(ws)
                    await ws.send_json(
                        {
                            "type": "busy",
                            "message": f"busy: {item.text}; this page is told when a stream ends",
                        }
                    )
                    continue
                if isinstance(item, BaseException):
                    reason = "error"
                    text = str(item) if isinstance(item, RopespError | ValueError) else repr(item)
                    await ws.send_json({"type": "error", "message": text})
                    continue
                if run.stopping.is_set():
                    run.slots.release()
                    continue
                frames += len(item.jpegs)
                gen_ms += item.gen_ms
                await ws.send_json(
                    {
                        "type": "chunk",
                        "stream": run.id,
                        "index": item.index,
                        "first_frame": item.first_frame,
                        "frames": len(item.jpegs),
                        "gen_ms": round(item.gen_ms, 1),
                        "gen_fps": round(frames / (gen_ms / 1e3), 2) if gen_ms > 0 else None,
                        "since_start_ms": round((loop.time() - t_start) * 1e3, 1),
                        "timings": item.timings,
                        "prompt": item.prompt,
                    }
                )
                for i, jpeg in enumerate(item.jpegs):
                    await ws.send_bytes(frame_message(run.id, item.index, item.first_frame + i, jpeg))
                if playback_t0 is None:
                    playback_t0 = loop.time()
                if self.config.realtime:  # release the slot when the page's playback reaches this chunk
                    due = playback_t0 + item.first_frame / VIDEO_FPS
                    await asyncio.sleep(max(0.0, due - loop.time()))
                run.slots.release()
        except (ConnectionError, RuntimeError):  # the page went away mid-send
            reason = "disconnected"
        finally:
            if run.stopping.is_set() and reason == "finished":
                reason = "stopped"
            run.stop()
            await asyncio.to_thread(run.thread.join)
            if self.runs.get(ws, (None,))[0] is run:
                del self.runs[ws]
            if not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_json(
                        {
                            "type": "stopped",
                            "stream": run.id,
                            "reason": reason,
                            "frames": frames,
                            "gen_fps": round(frames / (gen_ms / 1e3), 2) if gen_ms > 0 else None,
                        }
                    )
            if reason != "busy":
                await self._tell_free()

    async def _tell_free(self) -> None:
        """A stream ended: the pages that were refused may try again."""
        for ws in list(self.refused):
            self.refused.discard(ws)
            if not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_json({"type": "free"})


HUB = web.AppKey("hub", _Hub)


def _same_origin(request: web.Request) -> bool:
    """A browser sends Origin on WebSocket handshakes: refuse pages of other sites (they could otherwise
    drive this server from the user's browser). Clients that send no Origin are not browsers."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.host


async def _websocket(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    hub.sockets.add(ws)
    try:
        await ws.send_json(hub.hello())
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                with python_names():  # the page's JSON fields are named as Python names them (seed=-1)
                    await _handle(hub, ws, msg.json(loads=_loads))
            except (ValueError, TypeError, KeyError) as exc:
                await ws.send_json({"type": "error", "message": f"bad request: {exc}"})
    finally:
        hub.sockets.discard(ws)
        hub.refused.discard(ws)
        await hub.stop(ws)
    return ws


class _LongNumber(str):
    """A JSON number too long to be any setting's value, kept as its digits (int() refuses them)."""

    def __repr__(self) -> str:
        return f"<a {len(self)}-digit integer>"


def _loads(text: str):
    return json.loads(
        text, parse_int=lambda digits: int(digits) if len(digits) <= 40 else _LongNumber(digits)
    )


def _prompt_of(message: dict, default: str) -> str:
    prompt = message.get("prompt", default)
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    prompt = prompt.strip() or default
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    return prompt


async def _handle(hub: _Hub, ws: web.WebSocketResponse, message) -> None:
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object with a 'type'")
    kind = message.get("type")
    if kind == "start":
        seed = message.get("seed", 0)
        try:
            seed = check_seed(seed)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        await hub.start(ws, _prompt_of(message, hub.config.default_prompt), seed)
    elif kind == "prompt":
        entry = hub.runs.get(ws)
        if entry is None:
            await ws.send_json({"type": "error", "message": "no stream of this page is running"})
            return
        prompt = _prompt_of(message, hub.config.default_prompt)
        entry[0].set_prompt(prompt)
        await ws.send_json({"type": "prompt_queued", "prompt": prompt})
    elif kind == "stop":
        await hub.stop(ws)
    else:
        raise ValueError(f"unknown message type {kind!r}")


def _static(name: str) -> bytes:
    return importlib.resources.files("ropesp.webdemo").joinpath("static", name).read_bytes()


def _host_name(host_header: str) -> str:
    """The host of a Host header ("127.0.0.1:8188", "[::1]:8188", "localhost")."""
    return urlsplit(f"//{host_header}").hostname or ""


def make_app(pipe, config: DemoConfig, description: str = "") -> web.Application:
    """The aiohttp application around a pipeline with the `ropesp.Pipeline` stream contract."""

    @web.middleware
    async def loopback_names_only(request: web.Request, handler):
        # served on loopback, a request naming another host is a page of another site whose name was
        # pointed at 127.0.0.1 (DNS rebinding): its Origin matches its Host, so the Origin check alone
        # would let it drive the stream
        if is_loopback(config.host) and not is_loopback(_host_name(request.host)):
            raise web.HTTPForbidden(text="this demo answers to loopback names only (127.0.0.1, localhost)")
        return await handler(request)

    app = web.Application(middlewares=[loopback_names_only])
    hub = app[HUB] = _Hub(pipe, config, description)
    pages = {name: _static(name) for name in ("index.html", "app.js", "style.css")}
    types = {"html": "text/html", "js": "text/javascript", "css": "text/css"}

    def page(name: str):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                body=pages[name],
                content_type=types[name.rsplit(".", 1)[1]],
                charset="utf-8",
                headers={"Cache-Control": "no-store"},
            )

        return handler

    app.router.add_get("/", page("index.html"))
    app.router.add_get("/app.js", page("app.js"))
    app.router.add_get("/style.css", page("style.css"))
    app.router.add_get("/ws", _websocket)

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app.router.add_get("/favicon.ico", no_icon)

    async def on_shutdown(app: web.Application) -> None:
        await hub.stop_all()
        for ws in list(hub.sockets):
            await ws.close(code=1001, message=b"server shutting down")

    app.on_shutdown.append(on_shutdown)
    return app


class DemoServer:
    """The demo on its own event loop thread (`start()` / `close()`, or a context manager), or in the
    calling thread until SIGINT/SIGTERM (`serve_forever()`). `close()` stops the stream, joins its worker
    thread and the loop's thread: nothing is left running."""

    def __init__(self, pipe, config: DemoConfig = DemoConfig(), description: str = "") -> None:
        self.pipe, self.config, self.description = pipe, config, description
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def _serve(self, on_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(make_app(self.pipe, self.config, self.description), handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"--host {self.config.host} --port {self.config.port}: cannot listen: {exc.strerror or exc}"
                ) from None
            self.port = runner.addresses[0][1]
            if on_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._loop.add_signal_handler(sig, self._stop.set)
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def serve_forever(self, on_ready=None) -> None:
        """Serve in this thread until SIGINT or SIGTERM; on_ready(server) once listening."""

        async def main() -> None:
            task = asyncio.create_task(self._serve(on_signals=True))
            ready = asyncio.create_task(asyncio.to_thread(self._ready.wait))
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if self._ready.is_set() and on_ready is not None:
                on_ready(self)
            self._ready.set()  # releases the waiting thread if serving failed
            await ready
            await task

        asyncio.run(main())

    def start(self) -> DemoServer:
        """Serve on a background thread; returns once listening (raises what stopped it otherwise)."""

        def run() -> None:
            try:
                asyncio.run(self._serve(on_signals=False))
            except BaseException as exc:
                self._error = exc
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=run, name="ropesp-demo-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def close(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def describe(pipe) -> str | None:
    """The pipeline's own one-line description, when it has one."""
    text = getattr(pipe, "description", None)
    if callable(text):
        text = text()
    return str(text) if text else None


def check_listen(host: str, port: int) -> None:
    """ConfigError when (host, port) cannot be listened on: checked before the model is built."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host {host}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen: {exc.strerror or exc}") from None


def warm_up(pipe, frames: int | None, prompt: str = DEFAULT_PROMPT) -> float:
    """Warm the pipeline (`Pipeline.warm_up`: on a GPU every KV cache slot's CUDA graphs captured) so the
    first pages start warm and a pipeline that cannot stream `frames` says so now; returns its ms."""
    return pipe.warm_up(PagePrompts(pipe, prompt)(prompt), frames)


def print_url(server: DemoServer) -> None:
    print(f"ropesp demo: serving on {server.url} (Ctrl-C stops it)", file=sys.stderr)
    if not is_loopback(server.config.host):
        print(
            f"ropesp demo: warning: --host {server.config.host} is not loopback: anyone who reaches this "
            "address can run streams on this machine",
            file=sys.stderr,
        )
