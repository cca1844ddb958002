"""Many streams on one engine: each in its own KV cache slot, interleaved chunk by chunk; a stream's latents
are bit-identical whether it runs alone or beside others that join, leave, switch prompts and cancel at
other chunks (fp32 on the CPU, 1 and 2 ranks); admission by slots and by real-time capacity."""

from __future__ import annotations

import threading

import pytest
import torch

import ropesp
from ropesp.decode import PreviewDecoder
from ropesp.runtime.engine_core import AtCapacity, EngineCore
from ropesp.runtime.pipeline import resolve
from ropesp.runtime.scheduler import Scheduled, pick
from ropesp.settings import RunConfig

WINDOW = RunConfig.of(
    preset="tiny",
    latent_height=8,
    latent_width=8,
    local_attn_frames=6,
    sink_frames=3,
    device="cpu",
    dtype="float32",
)
"""Streams of any length through a rolling window of 6 latent frames (3 sink)."""


def _prompts(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(1, 10 + i, 4096, generator=g) * 0.1 for i in range(n)]


PROMPTS = _prompts(4)
PLAN = {
    # stream: (seed, prompt, chunks, {chunk: (prompt, mode)} changes, cancel after chunk or None)
    "a": (1, 0, 6, {2: (1, "recache")}, None),
    "b": (2, 1, 5, {1: (2, "swap"), 3: (3, "recache")}, 3),  # cancelled after its chunk 3
    "c": (3, 2, 4, {}, None),  # joins after a's chunk 1
}


def _alone(core: EngineCore, name: str, on_chunk=lambda index: None) -> torch.Tensor:
    seed, prompt, chunks, changes, cancel = PLAN[name]
    stream = core.open(core.request(PROMPTS[prompt], seed, latent_frames=None))
    got = []
    for chunk in stream:
        got.append(chunk.latents)
        on_chunk(chunk.index)
        if chunk.index + 1 in changes:
            p, mode = changes[chunk.index + 1]
            stream.set_prompt(PROMPTS[p], mode)
        if chunk.index + 1 == (chunks if cancel is None else cancel + 1):
            stream.cancel()
    return torch.cat(got, dim=1)


def _together(core: EngineCore) -> dict[str, torch.Tensor]:
    """a and b start together, c joins after a's chunk 1; each consumer on its own thread, as a server's."""
    results, errors, joined = {}, [], threading.Event()

    def consume(name: str) -> None:
        try:
            if name == "c":
                joined.wait(60)
            on_chunk = (lambda index: index == 1 and joined.set()) if name == "a" else (lambda index: None)
            results[name] = _alone(core, name, on_chunk)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(name,)) for name in PLAN]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("world_size", [1, 2])
def test_interleaved_streams_equal_each_stream_alone(world_size):
    config = WINDOW.replace(world_size=world_size, max_streams=3)
    with EngineCore(resolve(config)).start() as core:
        alone = {name: _alone(core, name) for name in PLAN}
        together = _together(core)
        assert core.running() == 0  # every slot free again
    for name, (_, _, chunks, _, cancel) in PLAN.items():
        frames = 3 * (chunks if cancel is None else cancel + 1)
        assert alone[name].shape[1] == frames
        torch.testing.assert_close(together[name], alone[name], rtol=0, atol=0, msg=name)


def test_streams_are_admitted_by_slots_and_by_real_time_capacity():
    prompt = PROMPTS[0]
    with EngineCore(resolve(WINDOW.replace(max_streams=2))).start() as core:
        first = core.open(core.request(prompt, 0, latent_frames=None))
        second = core.open(core.request(prompt, 1, latent_frames=None))
        next(first), next(second)
        with pytest.raises(
            AtCapacity,
            match=r"^at capacity: 2 streams running, every KV cache slot taken \(--max-streams 2\)",
        ):
            core.open(core.request(prompt, 2, latent_frames=None))
        second.cancel()  # a slot frees at once
        third = core.open(core.request(prompt, 2, latent_frames=None))
        next(third)
        first.cancel(), third.cancel()
    # a rate no CPU keeps for two streams: the running one's measured chunk time refuses a second
    with EngineCore(resolve(WINDOW.replace(max_streams=2, realtime_fps=1000.0))).start() as core:
        running = core.open(core.request(prompt, 0, latent_frames=None))
        for _ in range(2):
            next(running)
        assert core.step_ms is not None and core.step_ms > 0
        with pytest.raises(
            AtCapacity,
            match=r"^at capacity: 1 stream at [0-9.]+ FPS each \(a chunk takes \d+ ms\); one more would bring them below --realtime-fps 1000",
        ):
            core.open(core.request(prompt, 1, latent_frames=None))
        next(running)  # the admitted stream goes on unharmed
        running.cancel()


def test_a_warm_up_runs_every_slot_then_leaves_the_engine_as_new():
    """EngineCore.warm_up (what the demo and the Triton model run before serving): throwaway streams on
    every slot, each for a few chunks through the rolling window, then closed; every slot is free again
    and a stream after it gives the latents of a cold engine's."""
    config = WINDOW.replace(max_streams=2)
    with EngineCore(resolve(config)).start() as cold:
        want = _latents_of(cold.open(cold.request(PROMPTS[1], 5, latent_frames=12)))
    with EngineCore(resolve(config)).start() as core:
        served = []
        real_open = core.open
        core.open = lambda request: served.append(request) or real_open(request)
        ms = core.warm_up(PROMPTS[0], None, streams=2, chunks=4)
        assert ms > 0 and len(served) == 2 and core.running() == 0
        assert [r.seed for r in served] == [0, 1] and all(r.latent_frames is None for r in served)
        # off a GPU the default warms one stream's first chunk
        core.warm_up(PROMPTS[0], 6)
        assert len(served) == 3 and served[-1].latent_frames == 6
        core.open = real_open
        both = [core.open(core.request(PROMPTS[1], 5, latent_frames=12)) for _ in range(2)]
        got = [_latents_of(s) for s in both]
    for latents in got:
        torch.testing.assert_close(latents, want, rtol=0, atol=0)


def _latents_of(stream) -> torch.Tensor:
    return torch.cat([chunk.latents for chunk in stream], dim=1)


class _HeldPreview(PreviewDecoder):
    """A preview decoder whose second decode waits until the test lets it go (a chunk in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.entered, self.go = 0, threading.Event(), threading.Event()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            self.entered.set()
            assert self.go.wait(60)
        return super().decode(latents)


def test_a_slot_reused_while_a_cancelled_chunk_decodes_starts_its_decoder_afresh():
    """A stream cancelled while its chunk decodes, its slot taken at once by a new stream: the new
    stream's first chunk is a first chunk (4F - 3 frames), not a continuation of the old one's."""
    decoder = _HeldPreview()
    with EngineCore(resolve(WINDOW.replace(max_streams=1)), decoder=decoder).start() as core:
        old = core.open(core.request(PROMPTS[0], 0, latent_frames=None))
        assert next(old).frames.shape[1] == 9
        taker = threading.Thread(target=lambda: list(old), daemon=True)  # asks for chunk 1
        taker.start()
        assert decoder.entered.wait(60)  # chunk 1 is being decoded on the engine's thread
        old.cancel()
        new = core.open(core.request(PROMPTS[1], 1, latent_frames=None))  # the freed slot, its decoder
        decoder.go.set()
        assert next(new).frames.shape[1] == 9
        assert next(new).frames.shape[1] == 12
        new.cancel()
        taker.join(60)


def test_pipeline_streams_from_several_threads():
    """ropesp.Pipeline: several stream()s at once, each iterated from its own thread, each as if alone."""
    settings = dict(preset="tiny", device="cpu", height=64, width=64, max_streams=3)
    with ropesp.Pipeline(**settings) as pipe:
        alone = {seed: pipe.generate(PROMPTS[seed], seed=seed, frames=21).latents for seed in range(3)}
        got, errors = {}, []

        def run(seed: int) -> None:
            try:
                got[seed] = pipe.generate(PROMPTS[seed], seed=seed, frames=21).latents
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for seed in range(3):
            torch.testing.assert_close(got[seed], alone[seed], rtol=0, atol=0)


def test_the_scheduler_serves_first_frames_first_then_deadlines_then_turns():
    new = Scheduled(stream=3, chunks=0, video_frames=0, opened=5.0, last_step=0.0)
    late = Scheduled(stream=1, chunks=4, video_frames=45, opened=0.0, last_step=4.0)  # due at 45/16 s
    early = Scheduled(stream=2, chunks=2, video_frames=21, opened=1.0, last_step=4.5)  # due at 1 + 21/16 s
    assert pick([late, early, new], realtime_fps=16.0) == 3  # a new viewer's first frame first
    assert pick([late, early], realtime_fps=16.0) == 2  # then the earliest deadline (2.31 s < 2.81 s)
    assert pick([late, early], realtime_fps=0.0) == 2  # no real time: fewest chunks, round robin
    assert pick([], realtime_fps=16.0) is None


@pytest.mark.parametrize("latent_frames", [3, 9])
def test_the_engine_hands_the_first_frame_over_apart(latent_frames):
    """early_first_frame through the engine core: the first chunk in two pieces (1 frame, then 8), the same
    frames and latents as without; a one-chunk stream still ends after its second piece."""
    got = {}
    for early in (False, True):
        config = WINDOW.replace(early_first_frame=early)
        with EngineCore(resolve(config), decoder=PreviewDecoder()).start() as core:
            got[early] = list(core.open(core.request(PROMPTS[0], 5, latent_frames=latent_frames)))
    whole, pieces = got[False], got[True]
    assert [c.frames.shape[1] for c in whole] == [9] + [12] * (latent_frames // 3 - 1)
    assert [(c.index, c.frames.shape[1]) for c in pieces] == [(0, 1), (0, 8)] + [
        (i, 12) for i in range(1, latent_frames // 3)
    ]
    assert torch.equal(torch.cat([c.frames for c in pieces], 1), torch.cat([c.frames for c in whole], 1))
    assert torch.equal(torch.cat([c.latents for c in pieces], 1), torch.cat([c.latents for c in whole], 1))
