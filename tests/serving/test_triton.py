"""A real tritonserver (nvidia-pytriton wheel) on a generated repository: streaming, errors, concurrency."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_triton import CONFIG, Reference, load_client, running_server

from ropesp.serving.repository import write_repository
from ropesp.video import read_video_info

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, on a repository that was moved after writing (relocatable)."""
    tmp = tmp_path_factory.mktemp("triton")
    write_repository(tmp / "written", CONFIG)
    shutil.move(tmp / "written", tmp / "repo")
    with running_server(tmp / "repo", tmp / "tritonserver.log") as (server, procs):
        assert any("triton_python_backend_stub" in cmd for cmd in procs.values())
        yield server


def test_the_stub_runs_numpy_1_from_the_triton_home_beside_numpy_2(server, tmp_path_factory):
    """Under ROPESP_TRITON_HOME (the test command's .triton) the model runs the home's numpy < 2, which
    the backend stub needs, while this environment keeps numpy 2."""
    from ropesp.serving.server import triton_home

    home = triton_home()
    if home is None or not (home / "numpy").is_dir():
        pytest.skip("Triton is installed in this environment (ROPESP_TRITON_HOME unset)")
    assert int(np.__version__.split(".")[0]) >= 2
    log = (server.log_path).read_text()
    served = re.search(r"streams at once \(numpy (\S+) from (.+)\)", log)
    assert served is not None, log[-2000:]
    assert served[1].startswith("1.") and Path(served[2]) == home


def test_a_triton_home_without_triton_is_named(tmp_path, monkeypatch):
    from ropesp.errors import BackendUnavailableError
    from ropesp.serving.server import find_triton

    monkeypatch.setenv("ROPESP_TRITON_HOME", str(tmp_path))
    with pytest.raises(BackendUnavailableError) as err:
        find_triton()
    assert str(err.value) == (
        f"ROPESP_TRITON_HOME={tmp_path} holds no Triton: pip install --target {tmp_path} --no-deps "
        "nvidia-pytriton 'numpy<2'"
    )


@pytest.fixture(scope="module")
def client():
    return load_client()


@pytest.fixture(scope="module")
def reference(prompt):
    return Reference(prompt)


def _run(client, server, prompt: torch.Tensor, seed: int, latent_frames: int = 6, outputs=None, **kw):
    inputs = client.make_inputs(prompt[0].numpy(), seed, latent_frames, **kw)
    return list(client.stream(server.grpc_url, inputs, timeout_s=120, outputs=outputs))


def test_triton_stream_equals_in_process_run(server, client, prompt, reference):
    chunks = _run(client, server, prompt, seed=3)
    assert [c.index for c in chunks] == [0, 1]
    assert [c.frames.shape for c in chunks] == [(9, 64, 64, 3), (12, 64, 64, 3)]
    assert all(c.frames.dtype == np.uint8 and c.latents.dtype == np.float32 for c in chunks)
    assert chunks[0].server_ms < chunks[1].server_ms
    latents = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
    torch.testing.assert_close(latents, reference(3), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("fp64 prompt", "data-type"),
        ("wrong text_dim", "shape"),
        ("too many tokens", "the model takes 1..512"),
        (
            "frames not a multiple of the chunk",
            "a video of 13 frames (4 latent) does not tile into chunks of",
        ),
        (
            "frames beyond the cache",
            "a video of 129 frames (33 latent) exceeds the KV cache of 30 latent frames",
        ),
        ("other height", "serves 64 x 64 pixels"),
        ("nan prompt", "prompt embeddings hold 1 NaN or Inf values"),
        ("zero frames", "an unbounded stream needs a rolling window"),  # 0: until cancelled
        ("negative frames", "latent_frames=-3 must be an integer >= 1"),
    ],
)
def test_triton_bad_request_gets_an_error_and_serving_goes_on(
    server, client, prompt, reference, case, message
):
    from tritonclient.utils import InferenceServerException

    p = prompt[0].numpy()
    inputs = {
        "fp64 prompt": lambda: client.make_inputs(p.astype(np.float64), 0, 6),
        "wrong text_dim": lambda: client.make_inputs(p[:, :100], 0, 6),
        "too many tokens": lambda: client.make_inputs(np.zeros((513, p.shape[1]), np.float32), 0, 6),
        "frames not a multiple of the chunk": lambda: client.make_inputs(p, 0, 4),
        "frames beyond the cache": lambda: client.make_inputs(p, 0, 33),
        "other height": lambda: client.make_inputs(p, 0, 6, height=128, width=64),
        "nan prompt": lambda: client.make_inputs(
            np.where(np.arange(p.size).reshape(p.shape) == 7, np.nan, p).astype(np.float32), 0, 6
        ),
        "zero frames": lambda: client.make_inputs(p, 0, 0),
        "negative frames": lambda: client.make_inputs(p, 0, -3),
    }[case]()
    with pytest.raises(InferenceServerException) as err:
        list(client.stream(server.grpc_url, inputs, timeout_s=60))
    assert message in err.value.message()
    assert server.is_ready()
    chunks = _run(client, server, prompt, seed=5)
    got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
    torch.testing.assert_close(got, reference(5), rtol=0, atol=1e-5)


def test_triton_sends_only_the_requested_outputs(server, client, prompt, reference):
    """A latents-only request (the server skips its decoder) and a frames-only one (the MP4 viewer's),
    against a request for everything with the same seed."""
    full = _run(client, server, prompt, seed=6)
    latents_only = _run(client, server, prompt, seed=6, outputs=("latents",))
    frames_only = _run(client, server, prompt, seed=6, outputs=client.VIEWER_OUTPUTS)
    assert [c.index for c in latents_only] == [c.index for c in frames_only] == [0, 1]
    assert all(c.frames is None and c.server_ms is None for c in latents_only)
    got = torch.from_numpy(np.concatenate([c.latents for c in latents_only]))
    torch.testing.assert_close(got, reference(6), rtol=0, atol=1e-5)
    assert all(c.latents is None and c.server_ms > 0 for c in frames_only)
    for a, b in zip(frames_only, full, strict=True):
        assert np.array_equal(a.frames, b.frames)


def test_triton_two_concurrent_streams_both_complete(server, client, prompt, reference):
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            results[seed] = _run(client, server, prompt, seed)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for seed in (11, 12):
        assert [c.index for c in results[seed]] == [0, 1]
        got = torch.from_numpy(np.concatenate([c.latents for c in results[seed]]))
        torch.testing.assert_close(got, reference(seed), rtol=0, atol=1e-5)


def test_triton_cancelled_stream_stops_early(server, client, prompt):
    """The client walks away after the first of 10 chunks; the model stops at a chunk boundary."""
    inputs = client.make_inputs(prompt[0].numpy(), 1, 30)
    for chunk in client.stream(server.grpc_url, inputs, timeout_s=60):
        assert chunk.index == 0
        break  # stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while "request cancelled after chunk" not in server.log_tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(s for s in server.log_tail(200).splitlines() if "request cancelled after chunk" in s)
    assert int(line.rsplit("chunk ", 1)[1].split()[0].strip('"')) < 9
    assert [c.index for c in _run(client, server, prompt, seed=2)] == [0, 1]


def test_triton_client_script_writes_the_mp4(server, client, prompt, tmp_path):
    torch.save(prompt, tmp_path / "prompt.pt")
    out = tmp_path / "out.mp4"
    argv = ["--url", server.grpc_url, "--prompt-embeds", str(tmp_path / "prompt.pt"), "--latent-frames", "6"]
    assert client.main([*argv, "--seed", "4", "--output", str(out)]) == 0
    assert read_video_info(out) == (21, 64, 64)
    assert client.main([*argv[:2], "--latent-frames", "5", "--output", str(tmp_path / "bad.mp4")]) == 2
    assert not (tmp_path / "bad.mp4").exists()


def test_client_script_refusals_leave_no_file(server, client, prompt, tmp_path, capsys):
    """A change asked for past the stream's end, a CHUNK that is not one, an --output that exists: one
    line naming the flag, exit 2, and no MP4 (nor .part) left where the stream was going."""
    torch.save(prompt, tmp_path / "p.pt")
    base = ["--url", server.grpc_url, "--prompt-embeds", str(tmp_path / "p.pt"), "--latent-frames", "6"]
    late = tmp_path / "late.mp4"
    assert client.main([*base, "--prompt-at", "2", str(tmp_path / "p.pt"), "--output", str(late)]) == 2
    err = capsys.readouterr().err
    assert "triton_client: error: --prompt-at 2: the stream ended after chunk 1 (2 chunks)" in err
    assert list(tmp_path.glob("late.mp4*")) == []
    assert client.main([*base, "--prompt-at", "0", str(tmp_path / "p.pt")]) == 2
    assert "--prompt-at 0: CHUNK must be >= 1" in capsys.readouterr().err
    twice = [*base, "--prompt-at", "1", str(tmp_path / "p.pt"), "--prompt-at", "1", str(tmp_path / "p.pt")]
    assert client.main(twice) == 2
    assert "--prompt-at chunks [1, 1]: each chunk may change the prompt once" in capsys.readouterr().err
    kept = tmp_path / "kept.mp4"
    kept.write_bytes(b"mine")
    assert client.main([*base, "--output", str(kept)]) == 2
    assert "--output" in capsys.readouterr().err and kept.read_bytes() == b"mine"
