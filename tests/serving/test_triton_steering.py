"""Steering a running stream on a real tritonserver: a control request with the stream's id changes its
prompt at the next chunk boundary; two concurrent streams are unaffected by each other's changes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers_triton import (
    CONFIG,
    first_switched,
    load_client,
    running_server,
    second_prompt,
    steered_reference,
    steered_run,
)

from ropesp.runtime.pipeline import build_session
from ropesp.serving.repository import write_repository

pytestmark = pytest.mark.slow

STEERED = CONFIG.replace(local_attn_frames=9, sink_frames=3)
"""The served config under a rolling window: the steered streams run unbounded, so that a control
request always finds its stream running, however far the server gets ahead of a loaded client."""
LEAVE = threading.Event()
"""steered_run's `until`, set: the client leaves its stream two chunks past the control."""
LEAVE.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton-steer")
    write_repository(tmp / "repo", STEERED)
    with running_server(tmp / "repo", tmp / "tritonserver.log") as (server, _):
        yield server


@pytest.fixture(scope="module")
def client():
    return load_client()


@pytest.fixture(scope="module")
def session():
    return build_session(STEERED)


@pytest.fixture(scope="module")
def other(tiny_cfg):
    return second_prompt(tiny_cfg.text_dim)


def test_control_request_switches_the_running_stream_at_the_next_chunk(
    server, client, prompt, other, session
):
    chunks, reported = steered_run(
        client, server.grpc_url, prompt, 3, "solo", other, "recache", after_chunk=1, until=LEAVE
    )
    assert [c.index for c in chunks] == list(range(len(chunks)))
    j = first_switched(chunks)
    # the control arrived while chunk reported + 1 was being computed: it applies before that chunk's
    # successor at the latest (the latency is at most one chunk after the one in flight)
    assert reported >= 1 and j - (reported + 1) in (0, 1), (reported, j)
    got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
    torch.testing.assert_close(
        got, steered_reference(session, prompt, 3, (j, other, "recache"), 3 * len(chunks)), rtol=0, atol=1e-5
    )


def test_concurrent_streams_are_unaffected_by_each_others_switches(server, client, prompt, other, session):
    results, errors = {}, []
    started = threading.Event()

    def run(name, seed, mode, after, event=None):
        try:
            results[name] = steered_run(
                client, server.grpc_url, prompt, seed, name, other, mode, after, event, until=LEAVE
            )
        except BaseException as exc:  # tritonclient's exception keeps its text out of repr()
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    a = threading.Thread(target=run, args=("a", 11, "recache", 1, started))
    b = threading.Thread(target=run, args=("b", 12, "swap", 1))
    a.start()
    started.wait(120)  # b starts while a runs
    b.start()
    for t in (a, b):
        t.join(240)
    assert not errors, errors
    for name, seed, mode in (("a", 11, "recache"), ("b", 12, "swap")):
        chunks, reported = results[name]
        j = first_switched(chunks)
        assert j - (reported + 1) in (0, 1), (name, reported, j)
        got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
        want = steered_reference(session, prompt, seed, (j, other, mode), 3 * len(chunks))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    assert first_switched(results["b"][0]) >= 2  # a's change did not reach b's first chunks


def test_control_for_an_unknown_stream_is_an_error(server, client, other):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="no stream with stream_id 'ghost'"):
        client.control(server.grpc_url, client.make_control(other[0].numpy(), "ghost"))
    with pytest.raises(InferenceServerException, match="input control 'fade'"):
        client.control(server.grpc_url, client.make_control(other[0].numpy(), "ghost", "fade"))
    assert server.is_ready()


def test_client_script_steers_with_prompt_at(server, client, prompt, other, tmp_path, capsys):
    from ropesp.video import read_video_info

    torch.save(prompt, tmp_path / "p.pt")
    torch.save(other, tmp_path / "q.pt")
    out = tmp_path / "out.mp4"
    argv = ["--url", server.grpc_url, "--prompt-embeds", str(tmp_path / "p.pt"), "--latent-frames", "30"]
    argv += ["--prompt-at", "2", str(tmp_path / "q.pt"), "--prompt-mode", "recache", "--output", str(out)]
    assert client.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("chunk ")]
    versions = [int(ln.rsplit("prompt ", 1)[1]) for ln in lines]
    assert len(versions) == 10 and versions[:2] == [0, 0] and versions[-1] == 1
    assert read_video_info(out) == (117, 64, 64)
