"""ropesp.Pipeline: warm requests, switches (also on two owned ranks), cancel, unbounded, Python-named errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from switch_reference import generate_with_switches

import ropesp
from ropesp.errors import CheckpointError, ConfigError
from ropesp.runtime.engine_core import AtCapacity
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

SMALL = dict(preset="tiny", device="cpu", height=80, width=112)
"""Latents 10 x 14 (a 5 x 7 token grid: uneven over 2 ranks), 33 frames = 3 chunks."""


@pytest.fixture(scope="module")
def pipe():
    with ropesp.Pipeline(**SMALL) as p:
        yield p


@pytest.fixture(scope="module")
def reference_executor(pipe):
    return build_session(pipe.config).executor


def by_definition(pipe, executor, prompts: dict, mode: str, seed: int = 3) -> torch.Tensor:
    res = pipe.resolved
    g = res.geometry
    chunks = res.config.sampler.chunk_sizes(9)
    return generate_with_switches(
        executor,
        res.config.sampler,
        res.cache,
        (g.latent_height, g.latent_width),
        chunks,
        prompts,
        seed,
        mode,
    )


def test_package_root_exports_pipeline_lazily():
    import subprocess
    import sys

    code = "import sys, ropesp; assert 'torch' not in sys.modules; ropesp.Pipeline; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stream_and_generate_are_warm_and_agree(pipe, prompt, reference_executor):
    chunks = list(pipe.stream(prompt, seed=3, frames=33, latents=True))
    assert [c.index for c in chunks] == [0, 1, 2] and [c.start_frame for c in chunks] == [0, 3, 6]
    assert [c.frames.shape for c in chunks] == [(9, 80, 112, 3), (12, 80, 112, 3), (12, 80, 112, 3)]
    assert all(c.frames.dtype == np.uint8 and {"dit", "decode", "elapsed"} <= set(c.timings) for c in chunks)
    video = pipe.generate(prompt[0], seed=3, frames=33)  # [L, D] works too
    assert video.frames.shape == (33, 80, 112, 3) and video.latents.shape == (1, 9, 16, 10, 14)
    np.testing.assert_array_equal(video.frames, np.concatenate([c.frames for c in chunks]))
    want = by_definition(pipe, reference_executor, {0: prompt}, "swap")
    torch.testing.assert_close(video.latents, want, rtol=0, atol=1e-6)
    assert all(c.latents is None for c in pipe.stream(prompt, frames=33))  # latents only on request


@pytest.mark.parametrize("mode", ["swap", "recache"])
def test_set_prompt_while_iterating_equals_definition(pipe, prompt, reference_executor, mode):
    other = torch.randn(1, 12, pipe.text_dim, generator=torch.Generator().manual_seed(5)) * 0.1
    stream = pipe.stream(prompt, seed=3, frames=33, latents=True)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.index == 0:
            stream.set_prompt(other, mode=mode)
    assert [c.prompt_version for c in chunks] == [0, 1, 1]  # serial on the CPU: the very next chunk
    assert "switch" in chunks[1].timings and "switch" not in chunks[2].timings
    want = by_definition(pipe, reference_executor, {0: prompt, 1: other}, mode)
    torch.testing.assert_close(torch.cat([c.latents for c in chunks], 1), want, rtol=0, atol=1e-6)


def test_cancel_from_another_thread_and_unbounded_stream(prompt):
    with ropesp.Pipeline(
        preset="tiny", device="cpu", height=64, width=64, local_attn_frames=7, sink_frames=1, max_streams=1
    ) as p:
        stream = p.stream(prompt, frames=None)
        seen = []
        for chunk in stream:
            seen.append(chunk.index)
            if chunk.index == 4:
                threading.Thread(target=stream.cancel).start()
                threading.Event().wait(0.2)
        assert seen == [0, 1, 2, 3, 4]  # the cancel came before the boundary after chunk 4
        # one KV cache slot: a second stream is refused while a suspended one holds it
        first = iter(p.stream(prompt, frames=None))
        next(first)
        with pytest.raises(
            AtCapacity, match=r"at capacity: 1 stream running, every KV cache slot taken \(max_streams=1\)"
        ):
            list(p.stream(prompt, frames=9))
        first.close()  # a consumer that walks away frees the slot at once
        assert [c.index for c in p.stream(prompt, frames=9)] == [0]


def test_errors_name_python_arguments(pipe, prompt):
    cases = [
        (lambda: pipe.stream(prompt, frames=10), "frames=10 must be 4*k + 1 video frames"),
        (
            lambda: pipe.stream(prompt, frames=None),
            "set local_attn_frames (sink frames included) and sink_frames",
        ),
        (lambda: pipe.stream(prompt, frames=81), "raise max_frames to 21 (or set frames when building"),
        (
            lambda: pipe.stream("a fox"),
            "prompt is text, but this model has no text encoder: pass text_encoder (umT5) or model_dir",
        ),
        (lambda: pipe.stream(torch.zeros(5, 7)), "expected [L, 4096]"),
        (lambda: pipe.warm_up(prompt, frames="a"), "frames='a' must be an integer (4*k + 1 video frames)"),
        (lambda: pipe.warm_up(prompt, frames=None), "set local_attn_frames (sink frames included)"),
        (lambda: pipe.stream(prompt).set_prompt(prompt, mode="fade"), "mode='fade': choose one of"),
        (
            lambda: ropesp.Pipeline(preset="tiny", device="cpu", world_size=0),
            "world_size=0 must be >= 1",
        ),
        (lambda: ropesp.Pipeline(preset="nope"), "preset='nope': choose one of demo, tiny"),
        (
            lambda: ropesp.Pipeline(device="cpu", local_attn_frames=2, sink_frames=1),
            "local_attn_frames=2 must be >=",
        ),
        (lambda: ropesp.Pipeline(device="cpu", decoder="vae"), "decoder='vae' needs a Wan VAE: pass vae"),
        (lambda: ropesp.Pipeline(device="cpu", height=100), "height=100 must be a positive multiple of 16"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert message in str(err.value), (message, str(err.value))
        assert "--" not in str(err.value), str(err.value)
    with pytest.raises(CheckpointError, match=r"^checkpoint='/no/such/ckpt' does not exist$"):
        ropesp.Pipeline(device="cpu", checkpoint="/no/such/ckpt")
    with pytest.raises(CheckpointError, match=r"^checkpoint='[^']*test_api.py': unknown suffix"):
        ropesp.Pipeline(device="cpu", checkpoint=__file__)


def test_session_rough_edges(prompt):
    with pytest.raises(
        ConfigError, match=r"--world-size 2 needs its ranks: the engine core starts and owns them"
    ):
        build_session(RunConfig.of(preset="tiny", device="cpu", world_size=2))
    session = build_session(RunConfig.of(preset="tiny", device="cpu", latent_frames=3))
    session.reset(seed=0)  # no prompt yet: the default embedding, as `ropesp generate` without one
    assert session.generate().shape == (1, 3, 16, 16, 16)


def test_two_owned_ranks_switch_equals_definition(prompt, reference_executor, pipe):
    """world_size=2: the Pipeline starts rank 1, the switch travels to it at the chunk boundary."""
    other = torch.randn(1, 12, pipe.text_dim, generator=torch.Generator().manual_seed(5)) * 0.1
    with ropesp.Pipeline(**SMALL, world_size=2, decoder="none") as two:
        stream = two.stream(prompt, seed=3, frames=33, latents=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.index == 0:
                stream.set_prompt(other, mode="recache")
        assert chunks[0].frames is None and [c.prompt_version for c in chunks] == [0, 1, 1]
        want = by_definition(pipe, reference_executor, {0: prompt, 1: other}, "recache")
        torch.testing.assert_close(torch.cat([c.latents for c in chunks], 1), want, rtol=0, atol=1e-5)
        workers = list(two.workers)
    assert all(w.poll() is not None for w in workers)  # close() stopped rank 1


def test_unbounded_recache_stream_on_two_ranks_equals_one_rank(prompt):
    """An unbounded rolling stream cancelled after chunk 6 with a recache before chunk 3 (its replay
    skips frames that left the window): two owned ranks give one rank's latents."""
    other = prompt.flip(1)
    window = dict(preset="tiny", device="cpu", height=64, width=64, local_attn_frames=7, sink_frames=1)
    runs = {}
    for world in (1, 2):
        with ropesp.Pipeline(**window, world_size=world, decoder="none") as p:
            stream, chunks = p.stream(prompt, seed=2, frames=None, latents=True), []
            for chunk in stream:
                chunks.append(chunk)
                if chunk.index == 2:
                    stream.set_prompt(other, mode="recache")
                if chunk.index == 6:
                    stream.cancel()
        assert [(c.index, c.prompt_version) for c in chunks] == [(i, int(i >= 3)) for i in range(7)]
        runs[world] = torch.cat([c.latents for c in chunks], 1)
    torch.testing.assert_close(runs[2], runs[1], rtol=0, atol=1e-5)


def test_a_live_bounded_stream_takes_a_change_within_a_few_chunks_when_decode_overlaps():
    """With decode overlapped (the GPU default, forced here on the CPU) a bounded stream's DiT may run
    ahead of its consumer; a Pipeline stream can be steered, so it runs at most MAX_AHEAD chunks ahead and
    a change sent after chunk 1, however late, lands by chunk 1 + MAX_AHEAD + 1. generate(), which nobody
    steers, still runs the whole video ahead."""
    import time

    from ropesp.runtime.engine_core import MAX_AHEAD

    pipe = ropesp.Pipeline(local_attn_frames=9, sink_frames=3, overlap_decode=True, max_streams=1)
    try:
        stream = pipe.stream("two blue discs bouncing", seed=2, frames=117)  # 10 chunks
        chunks = iter(stream)
        taken = [next(chunks), next(chunks)]
        time.sleep(2.0)  # long enough for the DiT to finish all 10 chunks if it were not held back
        assert stream.set_prompt("a red square moving right")
        taken += list(chunks)
        versions = [c.prompt_version for c in taken]
        assert len(versions) == 10 and versions[-1] == 1, versions
        assert versions.index(1) <= 1 + MAX_AHEAD + 1, versions
        assert pipe.generate("two blue discs bouncing", seed=2, frames=117).latents.shape[1] == 30
    finally:
        pipe.close()
