"""The demo server's protocol and refusals, through a real WebSocket client (aiohttp) and the real
pipeline (the CPU default model); the page itself is tested in a browser in test_browser.py."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

aiohttp = pytest.importorskip("aiohttp")

import ropesp  # noqa: E402
from ropesp.cli import main  # noqa: E402
from ropesp.errors import ConfigError  # noqa: E402
from ropesp.extras import EXTRAS  # noqa: E402
from ropesp.webdemo import check_demo_dependencies  # noqa: E402
from ropesp.webdemo.frames import parse_frame_message  # noqa: E402
from ropesp.webdemo.server import DemoConfig, DemoServer, check_listen  # noqa: E402

DEMO_MODEL = (
    importlib.util.find_spec("ropesp.demo") is not None
    and __import__("ropesp.demo").demo.has_default_weights()
)
"""Whether this ropesp ships the embedded demo model's weights, the default Pipeline's model, with its own
prompt encoder (else the default model is a random-weight preset without one)."""
PROMPTS_NOTE = (
    "the demo model knows COUNT COLOUR SHAPE MOTION: a|two|three, red|green|blue|yellow|white|cyan|magenta, "
    "square|disc, moving left|right|up|down, bouncing, entering from / leaving to the left|right|top|bottom"
    if DEMO_MODEL
    else "this model has no text encoder: each prompt gets its own seeded embedding (the words carry no meaning)"
)


@pytest.fixture(scope="module")
def server():
    pipe = ropesp.Pipeline(local_attn_frames=9, sink_frames=3)  # streams until stopped
    demo = DemoServer(pipe, DemoConfig(port=0, realtime=False)).start()
    try:
        yield demo
    finally:
        demo.close()
        pipe.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ropesp-demo")]


async def _session(url: str, script):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
        hello = await ws.receive_json()
        assert hello["type"] == "hello" and hello["fps"] == 16 and hello["busy"] is False
        assert hello["prompts"] == PROMPTS_NOTE
        return await script(ws)


def run(server, script):
    return asyncio.run(asyncio.wait_for(_session(server.url, script), 60))


def test_stream_frames_then_stop(server):
    async def script(ws):
        await ws.send_json({"type": "start", "prompt": "a red square moving right", "seed": 3})
        assert (await ws.receive_json())["type"] == "started"
        chunk = await ws.receive_json()
        assert chunk["type"] == "chunk" and chunk["index"] == 0 and chunk["first_frame"] == 0
        frames = [parse_frame_message(await ws.receive_bytes()) for _ in range(chunk["frames"])]
        assert [f[2] for f in frames] == list(range(chunk["frames"]))
        assert all(f[3][:2] == b"\xff\xd8" for f in frames), "JPEG frames"
        await ws.send_json({"type": "prompt", "prompt": "two blue discs bouncing"})
        chunks = []
        while not chunks or chunks[-1]["prompt"] != "two blue discs bouncing":
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT and msg.json()["type"] == "chunk":
                chunks.append(msg.json())
        assert chunks[-1]["index"] <= 3, "the change shows within two chunks"
        await ws.send_json({"type": "stop"})
        while (msg := await ws.receive())[0] == aiohttp.WSMsgType.BINARY or msg.json()["type"] != "stopped":
            pass
        return msg.json()

    stopped = run(server, script)
    assert stopped["reason"] == "stopped" and stopped["frames"] >= 9


def test_bad_requests_get_one_clear_message(server):
    async def script(ws):
        replies = []
        for request in (
            {"type": "start", "seed": -1},
            {"type": "start", "seed": "x"},
            {"type": "start", "prompt": 5},
            {"type": "dance"},
            {"type": "prompt", "prompt": "a blue disc"},
            [1, 2, 3],
            '{"type": "start", "seed": 1' + "0" * 5000 + "}",
        ):
            await (ws.send_str(request) if isinstance(request, str) else ws.send_json(request))
            replies.append(await ws.receive_json())
        return replies

    replies = run(server, script)
    assert [r["type"] for r in replies] == ["error"] * 7
    assert replies[0]["message"] == "bad request: seed=-1 must be in 0..2^63-1"
    assert replies[1]["message"] == "bad request: seed='x' must be an integer"
    assert "prompt must be a string" in replies[2]["message"]
    assert "unknown message type 'dance'" in replies[3]["message"]
    assert replies[4]["message"] == "no stream of this page is running"
    assert replies[5]["message"] == "bad request: a message is a JSON object with a 'type'"
    assert replies[6]["message"] == "bad request: seed=<a 5001-digit integer> must be an integer"


def test_cross_origin_pages_are_refused(server):
    async def connect():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(server.url + "ws", headers={"Origin": "http://evil.example"})
            return err.value.status

    assert asyncio.run(connect()) == 403

    async def rebound():  # another site's name pointed at 127.0.0.1: Host and Origin agree, both foreign
        async with aiohttp.ClientSession() as http:
            headers = {"Host": "evil.example:80"}
            async with http.get(server.url, headers=headers) as page:
                return page.status

    assert asyncio.run(rebound()) == 403


def test_a_page_that_starts_again_hands_its_slot_over_at_once():
    """A page that starts a new stream while its own still runs is never told busy, even with its one
    slot taken: its old stream ends first (`stopped`), then the new one starts."""
    pipe = ropesp.Pipeline(local_attn_frames=9, sink_frames=3, max_streams=1)
    server = DemoServer(pipe, DemoConfig(port=0, realtime=False)).start()

    async def script(ws):
        await ws.send_json({"type": "start", "seed": 1})
        first = await ws.receive_json()
        assert first["type"] == "started"
        await ws.send_json({"type": "start", "seed": 2})
        seen, second = [], None
        while True:  # until the new stream's first chunk (or a refusal)
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = msg.json()
            seen.append(m["type"])
            if m["type"] == "started" and m["seed"] == 2:
                second = m["stream"]
            if m["type"] in ("busy", "error") or (m["type"] == "chunk" and m["stream"] == second):
                break
        await ws.send_json({"type": "stop"})
        return first["stream"], seen

    try:
        _, seen = run(server, script)
    finally:
        server.close()
        pipe.close()
    assert seen[-1] == "chunk" and "busy" not in seen and "error" not in seen, seen
    assert seen.index("stopped") < seen.index("started"), seen  # the old stream ended first


def test_a_page_that_goes_away_frees_the_server(server):
    async def script(ws):
        await ws.send_json({"type": "start"})
        assert (await ws.receive_json())["type"] == "started"
        # leaving the session closes the socket mid-stream

    run(server, script)

    async def again(ws):  # the next page is not told busy and can start
        await ws.send_json({"type": "start"})
        return (await ws.receive_json())["type"]

    # the worker thread ends first, then the server's loop clears the stream: wait for what a page sees
    for _ in range(100):
        if not _told_busy(server):
            break
        threading.Event().wait(0.05)
    assert run(server, again) == "started"


def _told_busy(server) -> bool:
    """Whether a page that connects now is told that another page is streaming (its hello's `busy`)."""

    async def hello():
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "ws") as ws:
            return (await ws.receive_json())["busy"]

    return asyncio.run(asyncio.wait_for(hello(), 60))


def test_refusals_before_any_work(capsys):
    with pytest.raises(ConfigError, match=r"--port 70000 is outside 0\.\.65535"):
        DemoConfig(port=70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: cannot listen"):
            check_listen("127.0.0.1", port)
        assert main(["demo", "--port", str(port)]) == 2
    assert f"ropesp: error: --host 127.0.0.1 --port {port}: cannot listen" in capsys.readouterr().err
    assert main(["demo", "--frames", "6"]) == 2
    assert "--frames 6 must be 4*k + 1 video frames" in capsys.readouterr().err
    assert main(["demo", "--frames", "5"]) == 2  # 2 latent frames: not a whole chunk, named by its flag
    assert "does not tile into chunks of --chunk-frames 3" in capsys.readouterr().err


def test_missing_demo_extra_is_named(monkeypatch):
    monkeypatch.setitem(EXTRAS, "demo", ("aiohttp", "ropesp_no_such_module"))
    with pytest.raises(
        ConfigError,
        match=r"ropesp demo needs the \[demo\] extra \(missing: ropesp_no_such_module\): pip install -e '\.\[demo\]'",
    ):
        check_demo_dependencies()


def test_seeded_prompt_embeddings_are_fixed_per_text():
    from ropesp.webdemo.prompts import SeededPromptEmbeddings

    enc = SeededPromptEmbeddings(64)
    a, b = enc.encode("a red square"), enc.encode("a blue disc")
    assert a.shape == (1, 32, 64) and a.dtype == torch.float32
    assert torch.equal(a, SeededPromptEmbeddings(64).encode("a red square")) and not torch.equal(a, b)


def test_demo_command_serves_until_sigint():
    """`ropesp demo --port 0` as a user starts it: builds, warms up, serves the page, stops on Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ropesp.cli", "demo", "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen, deadline = "", time.monotonic() + 120
        while "serving on" not in seen:
            assert proc.poll() is None and time.monotonic() < deadline, seen + proc.stderr.read()
            seen += proc.stderr.readline()
        url = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", seen).group(1)
        assert "warmed up" in seen and ("no text encoder" in seen) == (not DEMO_MODEL)
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b'<canvas id="screen"' in page.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "ropesp demo: stopped" in err and "Traceback" not in err
