"""Prompt changes at chunk boundaries (swap / recache / cut) equal the stream computed by definition, on 1, 2
and 4 ranks; unbounded streams stay flat in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sp_worker
import torch
from switch_reference import generate_with_switches

from ropesp.errors import ConfigError, python_names
from ropesp.runtime.dist import Mapping
from ropesp.runtime.pipeline import build_session, resolve


@pytest.fixture(scope="module")
def prompts(tiny_cfg):
    g = torch.Generator("cpu").manual_seed(11)
    return [torch.randn(1, n, tiny_cfg.text_dim, generator=g) * 0.1 for n in (20, 9, 33)]


@pytest.fixture(scope="module")
def references(prompts):
    """Each case by definition, on one rank's executor (switch_reference.py)."""
    out = {}
    for case, (overrides, schedule, mode) in sp_worker.SWITCH_CASES.items():
        res = resolve(sp_worker.base_config(**overrides))
        executor = build_session(res).executor
        chunks = res.config.sampler.chunk_sizes(res.latent_frames)
        size = (res.geometry.latent_height, res.geometry.latent_width)
        by_chunk = {k: prompts[i] for k, i in schedule.items()}
        out[case] = generate_with_switches(
            executor, res.config.sampler, res.cache, size, chunks, by_chunk, 3, mode
        )
    return out


def test_switch_one_rank_equals_definition(prompts, references, tmp_path):
    got = sp_worker.run_switches(Mapping(1, 0, 0), prompts)
    for case, want in references.items():
        torch.testing.assert_close(got[case], want, rtol=0, atol=1e-6, msg=case)


def test_switches_change_the_video(prompts, references):
    """Each schedule matters: a stream without switches, and swap vs recache, differ after the switch."""
    session = build_session(sp_worker.base_config(latent_frames=9))
    session.reset(prompts[0], seed=3)
    plain = session.generate()
    swap, recache = references["swap"], references["recache"]
    torch.testing.assert_close(swap[:, :3], plain[:, :3], rtol=0, atol=1e-6)  # before the first switch
    assert (swap[:, 3:] - plain[:, 3:]).abs().max() > 1e-2
    torch.testing.assert_close(recache[:, :6], plain[:, :6], rtol=0, atol=1e-6)
    session.reset(prompts[0], seed=3)
    session.set_prompt(prompts[1], "swap", at_chunk=2)
    swap_at_2 = session.generate()
    # the re-cached window changes it (random tiny weights: small, but 100x the 1e-6 of the parity checks)
    assert (recache[:, 6:] - swap_at_2[:, 6:]).abs().max() > 1e-4


def test_a_cut_goes_on_as_a_fresh_stream_of_the_new_prompt(prompts, references):
    """After a cut the chunks are the new prompt's stream from its start: the same forwards as a fresh
    stream given the noise the cut stream draws there (its generator goes on), positions from 0."""
    overrides, _, _ = sp_worker.SWITCH_CASES["cut-rolling"]
    session = build_session(sp_worker.base_config(**overrides))
    session.reset(prompts[0], seed=3)
    plain = session.generate()
    cut = references["cut-rolling"]
    torch.testing.assert_close(cut[:, :6], plain[:, :6], rtol=0, atol=1e-6)
    assert (cut[:, 6:] - plain[:, 6:]).abs().max() > 1e-2
    seen = []
    forward = session.executor.forward
    session.executor.forward = lambda x, t, start: seen.append(start) or forward(x, t, start)
    session.reset(prompts[0], seed=3)
    session.set_prompt(prompts[1], "cut", at_chunk=2)
    chunks = list(session)
    assert [c.switch for c in chunks] == [None, None, "cut", None]
    steps = len(session.schedule.timesteps)
    # per chunk: its denoising forwards, then its clean-context pass (none after the last)
    assert seen == [0] * (steps + 1) + [3] * (steps + 1) + [0] * (steps + 1) + [3] * steps
    torch.testing.assert_close(torch.cat([c.latents for c in chunks], 1), cut, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size", [2, 4])
def test_switch_sp_equals_definition(world_size, prompts, references, tmp_path):
    got = sp_worker.on_ranks(world_size, sp_worker.run_switches, prompts)
    for case, want in references.items():
        torch.testing.assert_close(got[case], want, rtol=0, atol=1e-5, msg=case)


def test_switch_on_a_ring_layout_equals_definition(prompts, references, tmp_path):
    """World size 4 as U=2 x R=2: the token-sharded ring cache replays (and skips) as one rank does."""
    got = sp_worker.on_ranks(4, sp_worker.run_switches, prompts, ("recache", "recache-rolling"), 2)
    for case in ("recache", "recache-rolling"):
        torch.testing.assert_close(got[case], references[case], rtol=0, atol=1e-5, msg=case)


def test_switch_from_another_thread_takes_effect_at_the_next_chunk(prompts):
    """set_prompt while the stream is being iterated: the chunk after the call reports the new prompt."""
    session = build_session(sp_worker.base_config(latent_frames=9))
    session.reset(prompts[0], seed=3)
    versions = []
    for chunk in session:
        versions.append(chunk.prompt_version)
        if chunk.index == 0:
            session.set_prompt(prompts[1], "recache")
    assert versions == [0, 1, 1]


def test_bad_switch_and_unbounded_requests_are_refused(prompts):
    session = build_session(sp_worker.base_config(latent_frames=9))
    with pytest.raises(ConfigError, match=r"mode='fade': choose one of swap, recache"):
        with python_names():
            session.set_prompt(prompts[1], "fade")
    with pytest.raises(ConfigError, match="expected"):
        session.set_prompt(torch.zeros(4, 7), "swap")
    with pytest.raises(ConfigError, match="an unbounded stream needs a rolling window"):
        build_session(sp_worker.base_config()).__class__(
            session.executor, session.sampler, session.geometry, None
        )


FLAT_STREAM = """
import gc, json, resource, sys, warnings
import torch
from ropesp.decode import PreviewDecoder
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

def live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

torch.set_num_threads(1)  # one thread, one malloc arena (the env below): RSS moves only with what is kept
cfg = RunConfig.of(
    preset="tiny", latent_height=16, latent_width=16, local_attn_frames=7, sink_frames=1, device="cpu"
)
session = build_session(cfg, decoder=PreviewDecoder())
session.latent_frames = session.chunk_sizes = None  # unbounded, on the same executor
g = torch.Generator().manual_seed(11)
prompts = [torch.randn(1, n, session.executor.cfg.text_dim, generator=g) * 0.1 for n in (20, 9, 33)]
marks = {}
for run, chunks in (("warm", 2), ("3", 3), ("30", 30)):
    session.reset(prompts[0], seed=1)
    stream = iter(session)
    for chunk in stream:
        if chunk.index == 1:
            session.set_prompt(prompts[chunk.index % 2 + 1], "recache")
        if chunk.index + 1 == chunks:
            break
    stream.close()
    assert chunk.frames.shape[1:] == (12, 128, 128, 3), chunk.frames.shape
    del chunk
    marks[run] = (live_tensors(), rss_kb())
print(json.dumps(marks))
"""


def test_unbounded_stream_memory_is_flat():
    """30 chunks of an unbounded rolling stream hold no more than 3 do: the same live tensors, and RSS
    within 8 MB (each chunk's frames alone are 0.6 MB: a leak of them would show as 16 MB). In a fresh
    process: the suite's own heap would blur RSS and make the walk over every object slow."""
    # glibc's dynamic mmap threshold keeps a freed ~13 MB block on the heap or not, as it happens: a fixed
    # threshold returns every large block when freed, so RSS moves only with what is kept (measured here:
    # within 0.6 MB over 120 chunks, against jumps of 13 MB either way without it)
    env = dict(
        os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072"
    )
    proc = subprocess.run(
        [sys.executable, "-c", FLAT_STREAM], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    marks = json.loads(proc.stdout)
    assert marks["30"][0] == marks["3"][0]
    assert marks["30"][1] - marks["3"][1] < 8 * 1024, marks
