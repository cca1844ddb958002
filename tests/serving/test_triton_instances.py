"""Many engines per Triton model (`serve-repo --instances N`): each instance one engine on GPUs of its
own, each stream pinned by Triton's sequence batcher to the instance that holds its KV cache, so that its
control requests reach it; admission per instance. On the CPU: two instances on a real tritonserver."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from helpers_triton import (
    CONFIG,
    first_switched,
    load_client,
    require_triton,
    running_server,
    second_prompt,
    steered_reference,
    steered_run,
)

from ropesp.cli import main
from ropesp.errors import ConfigError
from ropesp.runtime.pipeline import build_session
from ropesp.serving.instances import instance_gpus, pin_instance_gpus, visible_gpus
from ropesp.serving.repository import CONFIG_FILE, config_pbtxt, write_repository
from ropesp.settings import RunConfig

SERVED = CONFIG.replace(max_streams=1, local_attn_frames=9, sink_frames=3)
"""Two engines of one KV cache slot each, under the demo page's window (streams of any length)."""
STARTED = re.compile(r"ropesp: (\S+): stream '([^']+)' started")
"""The model's log line naming the instance that took a stream."""


# --- each instance's GPUs (pure) ---------------------------------------------------------------------
def test_instance_gpus_are_consecutive_slices_of_the_visible_list():
    visible = ["0", "1", "2", "3"]
    assert [instance_gpus(visible, i, 4, 1) for i in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [instance_gpus(visible, i, 2, 2) for i in range(2)] == [["0", "1"], ["2", "3"]]
    assert instance_gpus(visible, 0, 1, 3) == ["0", "1", "2"]  # a GPU left over stays unused
    # an existing CUDA_VISIBLE_DEVICES list is sliced as given (order, UUIDs)
    assert instance_gpus(["5", "GPU-a1", "2", "7"], 1, 2, 2) == ["2", "7"]


def test_too_few_gpus_are_refused_by_every_instance(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    for instance in range(2):  # instance 0 alone would fit: it refuses all the same
        with pytest.raises(ConfigError) as err:
            instance_gpus(visible_gpus(), instance, 2, 2)
        assert str(err.value) == (
            "--instances 2 x --world-size 2 needs 4 GPUs (one engine's ranks each on GPUs of their own); "
            "this host has 3 visible (CUDA_VISIBLE_DEVICES=4,5,6)"
        )


def test_an_instance_narrows_cuda_visible_devices_to_its_gpus(monkeypatch):
    cuda = RunConfig.of(preset="tiny", device="cuda", world_size=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert pin_instance_gpus(cuda, 1, 2) == ["2", "3"]
    assert visible_gpus() == ["2", "3"]  # what its ranks inherit
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert pin_instance_gpus(cuda, 0, 1) is None  # one instance: every GPU, as before
    assert pin_instance_gpus(cuda.replace(device="cpu"), 1, 2) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pin_instance_gpus(cuda.replace(device=None), 1, 2) is None  # no GPU: the engine runs on the CPU
    assert visible_gpus() == []


def test_sequence_batching_only_with_several_instances(tmp_path):
    assert "sequence_batching" not in config_pbtxt("m", 16, 1, instances=1)
    out = tmp_path / "repo"
    argv = ["serve-repo", "--out", str(out), "--preset", "tiny", "--device", "cpu", "--instances", "2"]
    assert main([*argv, "--latent-height", "8", "--latent-width", "8"]) == 0
    pbtxt = (out / "ropesp" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_MODEL count: 2 } ]" in pbtxt
    assert (
        "sequence_batching { max_sequence_idle_microseconds: 3600000000 oldest { max_candidate_sequences: 64 } }"
        in pbtxt
    )
    assert json.loads((out / "ropesp" / "1" / CONFIG_FILE).read_text())["instances"] == 2


# --- two instances on a real tritonserver ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two engines of one KV cache slot each (a third stream finds both at capacity)."""
    tmp = tmp_path_factory.mktemp("triton-instances")
    write_repository(tmp / "repo", SERVED, instances=2)
    log = tmp / "tritonserver.log"
    with running_server(tmp / "repo", log) as (server, procs):
        stubs = [p for p, cmd in procs.items() if "triton_python_backend_stub" in cmd]
        assert len(stubs) == 2  # one stub process, one engine, per instance
        yield server, log


@pytest.fixture(scope="module")
def client():
    return load_client()


@pytest.fixture(scope="module")
def other(tiny_cfg):
    return second_prompt(tiny_cfg.text_dim)


def instances_of(log) -> dict[str, str]:
    """{stream id: the instance that took it} from the server's log."""
    return {stream: instance for instance, stream in STARTED.findall(log.read_text())}


@pytest.mark.slow
def test_each_stream_is_steered_on_the_instance_that_holds_it(served, client, prompt, other):
    from tritonclient.utils import InferenceServerException

    server, log = served
    results, errors = {}, []
    started = {"a": threading.Event(), "b": threading.Event()}
    checked = threading.Event()  # a and b run, unbounded, until the third stream has been refused

    def run(name, seed, mode):
        try:
            results[name] = steered_run(
                client,
                server.grpc_url,
                prompt,
                seed,
                name,
                other,
                mode,
                1,
                started[name],
                True,
                until=checked,
            )
        except BaseException as exc:  # tritonclient's exception keeps its text out of repr()
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    a = threading.Thread(target=run, args=("a", 11, "recache"), daemon=True)
    b = threading.Thread(target=run, args=("b", 12, "swap"), daemon=True)
    try:
        a.start()
        assert started["a"].wait(120)  # b starts while a runs: Triton gives it the other instance
        b.start()
        assert started["b"].wait(120)
        # a third stream goes to one of the two instances, each at capacity: its engine refuses it
        inputs = client.make_inputs(prompt[0].numpy(), 13, 6, stream_id="c")
        with pytest.raises(InferenceServerException, match=r"at capacity: 1 stream running.*max_streams=1"):
            list(client.stream(server.grpc_url, inputs, timeout_s=120, sequence_id="c"))
    finally:
        checked.set()
        for t in (a, b):
            t.join(240)
    assert not errors, (errors, log.read_text()[-4000:])

    where = instances_of(log)
    assert sorted(where[s] for s in "ab") == ["ropesp_0_0", "ropesp_0_1"], where
    session = build_session(SERVED)
    for name, seed, mode in (("a", 11, "recache"), ("b", 12, "swap")):
        chunks, reported = results[name]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        j = first_switched(chunks)  # the control request reached its stream: routed to its instance
        assert j - (reported + 1) in (0, 1), (name, reported, j)
        got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
        want = steered_reference(session, prompt, seed, (j, other, mode), 3 * len(chunks))
        # the stream as it runs alone in this process, bit for bit: the other instance shares nothing
        assert torch.equal(got, want), (name, (got - want).abs().max())


@pytest.mark.slow
def test_requests_outside_their_sequence_are_refused(served, client, prompt, other):
    from tritonclient.utils import InferenceServerException

    server, _ = served
    inputs = client.make_inputs(prompt[0].numpy(), 3, 6)
    with pytest.raises(InferenceServerException, match="must specify a non-zero or non-empty correlation ID"):
        list(client.stream(server.grpc_url, inputs, timeout_s=120))  # no sequence: Triton's batcher refuses
    change = client.make_control(other[0].numpy(), "ghost")
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        client.control(server.grpc_url, change, sequence_id="ghost")  # a sequence never started
    inputs = client.make_inputs(prompt[0].numpy(), 3, 6, stream_id="one")
    with pytest.raises(
        InferenceServerException, match="input stream_id 'one' differs from the request's sequence"
    ):
        list(client.stream(server.grpc_url, inputs, timeout_s=120, sequence_id="two"))
    assert server.is_ready()


@pytest.mark.slow
def test_client_script_streams_and_steers_on_two_instances(served, client, prompt, other, tmp_path, capsys):
    server, _ = served
    torch.save(prompt, tmp_path / "p.pt")
    torch.save(other, tmp_path / "q.pt")
    argv = ["--url", server.grpc_url, "--prompt-embeds", str(tmp_path / "p.pt"), "--latent-frames", "30"]
    argv += ["--prompt-at", "2", str(tmp_path / "q.pt"), "--output", str(tmp_path / "out.mp4")]
    assert client.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("chunk ")]
    versions = [int(ln.rsplit("prompt ", 1)[1]) for ln in lines]
    assert len(versions) == 10 and versions[:2] == [0, 0] and versions[-1] == 1


@pytest.mark.slow
def test_too_few_gpus_fail_the_model_load_with_one_line(tmp_path, monkeypatch):
    """Instances of a CUDA repository on a host that shows fewer GPUs than they need: the load fails
    with the ConfigError, before anything touches CUDA (so on any host)."""
    require_triton()
    from ropesp.serving.server import ServerError, TritonServer

    model_dir = write_repository(tmp_path / "repo", CONFIG, instances=2)
    spec_path = model_dir / "1" / CONFIG_FILE
    spec = json.loads(spec_path.read_text())
    spec["config"]["compute"]["device"] = "cuda"  # as written on a GPU host
    spec_path.write_text(json.dumps(spec))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ServerError) as err:
        TritonServer(tmp_path / "repo", ready_timeout_s=120).start()
    assert (
        "--instances 2 x --world-size 1 needs 2 GPUs (one engine's ranks each on GPUs of their own); this host "
        "has 1 visible (CUDA_VISIBLE_DEVICES=0)"
    ) in str(err.value)
