"""Interleaved streams on a GPU with the compile backend: every stream slot replays CUDA graphs of its own
(captured once per slot and cache plan), and a stream's latents do not depend on its neighbours."""

from __future__ import annotations

import pytest
import torch

from ropesp.runtime.engine_core import EngineCore
from ropesp.runtime.pipeline import resolve
from ropesp.settings import RunConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_interleaved_streams_replay_per_slot_graphs_and_equal_each_alone():
    config = RunConfig.of(preset="demo", backend="compile", local_attn_frames=6, sink_frames=3, max_streams=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 16, 64, generator=g) * 0.1 for _ in range(2)]
    with EngineCore(resolve(config)).start() as core:

        def run(index: int, seed: int, chunks: int = 5) -> torch.Tensor:
            stream = core.open(core.request(prompts[index], seed, latent_frames=None))
            out = [next(stream).latents for _ in range(chunks)]
            stream.cancel()
            return torch.cat(out, dim=1)

        alone = [run(0, 1), run(1, 2)]
        a = core.open(core.request(prompts[0], 1, latent_frames=None))
        b = core.open(core.request(prompts[1], 2, latent_frames=None))
        together = [[], []]
        for _ in range(5):  # alternating consumers: the engine steps the two slots in turn
            together[0].append(next(a).latents)
            together[1].append(next(b).latents)
        a.cancel(), b.cancel()
        graphs = core.rank_engine.executor.graphs.graphs
        slots = {key[0] for key in graphs}
    assert slots == {0, 1}, "each slot replays graphs of its own"
    for want, got in zip(alone, together, strict=True):
        diff = (torch.cat(got, dim=1) - want).abs().max().item()
        assert diff == 0.0, f"max |d| {diff}: a stream's latents changed beside another"


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_prompt_graph_gives_the_eager_text_path_and_each_slot_its_own_copy(precision):
    """With CUDA graphs the text path replays one graph (runtime/graphs.py PromptGraph) for prompts of
    any length: its K/V equal the eager ones bit for bit, and each slot keeps a copy of its own."""
    from ropesp.plugins import fp8
    from ropesp.runtime.pipeline import build_executor, resolve_rank

    if precision == "fp8" and (why := fp8.fp8_unsupported_reason("cuda")):
        pytest.skip(why)
    config = RunConfig.of(preset="demo", backend="compile", precision=precision, max_streams=2)
    res, mapping = resolve_rank(config, default_model=False)
    executor = build_executor(res, mapping)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randn(1, n, 64, generator=g) * 0.1 for n in (16, 9)]
    with torch.inference_mode():
        eager = [executor.model.cross_kv(p.to(executor.device)) for p in prompts]
    for slot, p in enumerate(prompts):
        executor.use_slot(slot)
        executor.set_prompt(p)
    assert executor._prompt_graph.graph is not None  # one capture served both lengths
    for slot in range(2):
        executor.use_slot(slot)
        for (k, v), (k_ref, v_ref) in zip(executor.cross_kv, eager[slot], strict=True):
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
