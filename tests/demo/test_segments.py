"""Training samples of long streams (ropesp/demo/segments.py) against the runtime they train for: the
one-pass forward over a stream's chunks gives the flows of the runtime's KV-cache protocol under each
rolling window, and the earlier teacher-forcing pass on short videos."""

from __future__ import annotations

import pytest
import torch

from ropesp.config import demo
from ropesp.demo.evaluate import eval_pairs
from ropesp.demo.prompts import DemoTextEncoder, parse
from ropesp.demo.segments import segment_flow, stream_layout
from ropesp.demo.train import TrainConfig, Trainer, block_mask, parse_window, teacher_forcing_flow
from ropesp.demo.world import latents_at, seeded_scene
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

CHUNK = 3
STEPS = (1000.0, 937.5, 833.3, 625.0)


def _world(prompt: str, chunks: torch.Tensor) -> torch.Tensor:
    """The world's latents [1, n*3, 16, 24, 24] at stream chunks [1, n]."""
    times = (chunks[:, :, None] * CHUNK + torch.arange(CHUNK)).flatten(1)
    return latents_at(seeded_scene(parse(prompt), 0), times)


@pytest.mark.parametrize("window", ["9/3", "6/0", "12/3"])
def test_segment_flow_is_the_runtime_stream(window):
    """Every chunk of an 8-chunk stream: the runtime's denoising forward against its KV cache (filled by
    the clean-context passes) and the one training pass agree."""
    frames, sink = (int(x) for x in window.split("/"))
    cfg = RunConfig.of(
        preset="demo",
        device="cpu",
        dtype="float32",
        latent_frames=24,
        local_attn_frames=frames,
        sink_frames=sink,
    )
    executor = build_session(cfg).executor
    prompt = "two blue discs bouncing"
    embeds = DemoTextEncoder().encode(prompt)[None]
    executor.set_prompt(embeds)
    executor.reset()
    n = 8
    chunks = torch.arange(n)[None]
    clean = _world(prompt, chunks)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(clean.shape, generator=g)
    t = torch.tensor([STEPS[c % 4] for c in range(n)]).repeat_interleave(CHUNK)[None]
    runtime = []
    with torch.no_grad():
        for c in range(n):
            part = slice(c * CHUNK, (c + 1) * CHUNK)
            runtime.append(executor.forward(noisy[:, part], t[0, part.start], c * CHUNK))
            executor.forward(clean[:, part], torch.tensor(0.0), c * CHUNK)  # the clean-context pass
        context, has_sink = parse_window(window, CHUNK)
        layout = stream_layout(context, has_sink, 0, n, far=False)
        trained = segment_flow(executor.model, clean, noisy, t, embeds, layout, chunks)
    torch.testing.assert_close(trained, torch.cat(runtime, dim=1), atol=1e-4, rtol=1e-4)


def test_far_samples_see_the_stream_chunks_the_runtime_does():
    """A sample far into the stream (the sink, warm chunks, supervised chunks): its supervised chunks
    see the same stream chunks as in a sample of the whole stream from its start."""
    first = torch.tensor([9])
    for context, sink in ((1, True), (1, False), (2, True)):
        far = stream_layout(context, sink, 2, 3, far=True)
        whole = stream_layout(context, sink, 0, 14, far=False)
        far_chunks = far.chunk_numbers(first)[0].tolist()
        whole_chunks = whole.chunk_numbers(torch.tensor([0]))[0].tolist()

        def seen(layout, chunks, slot):
            """(copy, stream chunk) of every slot the slot's queries see."""
            own = chunks[slot - layout.noisy]
            return sorted(
                ("clean", chunks[s]) if s < layout.clean else ("noisy", own) for s in layout.sees[slot]
            )

        for k in range(far.noisy):
            slot = far.clean + k
            chunk = far_chunks[slot - far.noisy]
            assert seen(far, far_chunks, slot) == seen(whole, whole_chunks, whole.clean + chunk), (
                context,
                sink,
                k,
            )


def test_segment_flow_is_teacher_forcing_on_short_videos():
    trainer = Trainer(TrainConfig(batch=2), torch.device("cpu"))
    batch = trainer.video_batch()
    ft = trainer.rows * trainer.cols
    for window in (None, 1):
        layout = stream_layout(window, False, 0, 3, far=False)
        mask = block_mask(9, ft, CHUNK, window, "cpu")
        with torch.no_grad():
            want = teacher_forcing_flow(
                trainer.model, batch.x0, batch.noisy, batch.t, batch.prompts, mask, _tables(trainer)
            )
            got = segment_flow(
                trainer.model, batch.x0, batch.noisy, batch.t, batch.prompts, layout, batch.chunks
            )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _tables(trainer):
    from ropesp.model.rope import RopeTables

    return RopeTables(trainer.model_cfg.head_dim, 9, trainer.rows, trainer.cols)


def test_positions_are_relative_but_the_sink_stays_at_the_start():
    model = Trainer(TrainConfig(batch=1), torch.device("cpu")).model
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the trainer starts from a zero head
    embeds = DemoTextEncoder().encode(eval_pairs()[0][0])[None]
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 9, 16, 24, 24, generator=g)
    t = torch.full((1, 9), 833.3)

    def flow(sink: bool, first: int) -> torch.Tensor:
        layout = stream_layout(1, sink, 2, 3, far=True)
        chunks = layout.chunk_numbers(torch.tensor([first]))
        clean = torch.randn(1, layout.clean * CHUNK, 16, 24, 24, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            return segment_flow(model, clean, noisy, t, embeds, layout, chunks)

    torch.testing.assert_close(flow(False, 5), flow(False, 30), atol=1e-5, rtol=1e-5)
    assert (flow(True, 5) - flow(True, 30)).abs().max() > 1e-3


def test_a_switch_changes_the_chunks_from_the_switch_on():
    trainer = Trainer(TrainConfig(batch=1), torch.device("cpu"))
    torch.nn.init.normal_(trainer.model.head.head.weight, std=0.02)
    enc = DemoTextEncoder()
    old, new = (enc.encode(p)[None] for p in ("a red square moving right", "two blue discs bouncing"))
    layout = stream_layout(1, True, 2, 3, far=True)
    chunks = layout.chunk_numbers(torch.tensor([6]))
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(1, layout.clean * CHUNK, 16, 24, 24, generator=g)
    noisy = torch.randn(1, 9, 16, 24, 24, generator=g)
    t = torch.full((1, 9), 937.5)
    with torch.no_grad():
        plain = segment_flow(trainer.model, clean, noisy, t, old, layout, chunks)
        same = segment_flow(trainer.model, clean, noisy, t, old, layout, chunks, switch=(old, 4))
        switched = segment_flow(trainer.model, clean, noisy, t, old, layout, chunks, switch=(new, 4))
    assert torch.equal(plain, same)
    first_after = (4 - (layout.clean - layout.noisy)) * CHUNK  # supervised chunk of clean slot 4
    torch.testing.assert_close(switched[:, :first_after], plain[:, :first_after], atol=1e-6, rtol=0)
    assert (switched[:, first_after:] - plain[:, first_after:]).abs().amin(dim=(2, 3, 4)).max() > 0


def _adapter_checkpoint(directory, rank: int | None = 4, scale: float = 0.3):
    """The shipped demo model's base weights (its own stream adapter left out) plus a stream adapter of
    random (non-zero) deltas, or none where rank is None, written as a checkpoint directory (safetensors
    + config.json); returns (directory, its ModelConfig)."""
    import dataclasses
    import json

    from safetensors.torch import load_file, save_file

    from ropesp.demo import WEIGHTS_FILE, default_checkpoint
    from ropesp.model.wan import CausalWanDiT

    cfg = demo() if rank is None else dataclasses.replace(demo(), stream_rank=rank, stream_from_frame=9)
    sd = load_file(default_checkpoint() / WEIGHTS_FILE)
    sd = {k: v for k, v in sd.items() if not k.startswith("stream_adapter.")}
    g = torch.Generator().manual_seed(1)
    with torch.device("meta"):
        shapes = CausalWanDiT(cfg).state_dict()
    for key, t in shapes.items():
        if key.startswith("stream_adapter."):
            sd[key] = (scale * torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5).to(torch.float16)
    directory.mkdir()
    save_file(sd, directory / WEIGHTS_FILE)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    return directory, cfg


def test_the_stream_adapter_trained_is_the_stream_adapter_run(tmp_path):
    """Training's gated low-rank deltas (off before stream frame 9, on from it; an adapter of this test's
    own) and the runtime's merged stream blocks (chosen per chunk by its first frame) give the same flows
    over a 9/3 stream; the chunks before frame 9 are the base model's exactly."""
    from ropesp.demo.adapter import StreamGates
    from ropesp.model.checkpoint import load_state_dict
    from ropesp.model.wan import CausalWanDiT

    path, cfg = _adapter_checkpoint(tmp_path / "adapter")
    run = dict(preset="demo", device="cpu", dtype="float32", latent_frames=24, local_attn_frames=9)
    prompt = "a red square moving right"
    embeds = DemoTextEncoder().encode(prompt)[None]
    n = 6
    chunks = torch.arange(n)[None]
    clean = _world(prompt, chunks)
    noisy = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([STEPS[c % 4] for c in range(n)]).repeat_interleave(CHUNK)[None]
    flows = {}
    base, _ = _adapter_checkpoint(tmp_path / "base", rank=None)
    for name, checkpoint in (("base", base), ("adapter", path)):
        executor = build_session(RunConfig.of(checkpoint=str(checkpoint), sink_frames=3, **run)).executor
        executor.set_prompt(embeds)
        executor.reset()
        flows[name] = []
        with torch.no_grad():
            for c in range(n):
                part = slice(c * CHUNK, (c + 1) * CHUNK)
                flows[name].append(executor.forward(noisy[:, part], t[0, part.start], c * CHUNK))
                executor.forward(clean[:, part], torch.tensor(0.0), c * CHUNK)
    assert executor.model.stream_blocks is not None
    for c in range(3):
        assert torch.equal(flows["adapter"][c], flows["base"][c]), c
    for c in range(3, n):
        assert (flows["adapter"][c] - flows["base"][c]).abs().max() > 1e-3, c

    sd, _ = load_state_dict(path)
    model = CausalWanDiT(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    gates = StreamGates.install(model.eval())
    layout = stream_layout(1, True, 0, n, far=False)
    with torch.no_grad():
        trained = segment_flow(model, clean, noisy, t, embeds, layout, chunks, gates=gates)
    torch.testing.assert_close(trained, torch.cat(flows["adapter"], dim=1), atol=1e-4, rtol=1e-4)
