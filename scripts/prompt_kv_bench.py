"""A new stream's prompt K/V (every layer's cross-attention keys and values, computed once per prompt before
its first chunk): the eager text path against its CUDA graph (runtime/graphs.py PromptGraph), one process.

    python scripts/prompt_kv_bench.py --preset wan2.1-1.3b --precision fp8 --backend compile --json kv.json

Per path, the median over --repeat prompts of: host ms (the call's return, what the engine thread spends)
and ms to done (the call plus a device sync). The graph path is `executor.set_prompt` as the engine runs
it (the copy into the slot's buffers included); the eager path is the same text path uncaptured
(`model.cross_kv` plus that copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn, sync) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    sync()
    return host * 1e3, (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    from ropesp.cli.flags import add_flags, config_from_args
    from ropesp.errors import RopespError
    from ropesp.runtime.executor import refresh_cross_kv
    from ropesp.runtime.pipeline import build_executor, resolve_rank
    from ropesp.settings import SECTIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for section in SECTIONS.values():
        add_flags(p, section)
    p.add_argument("--repeat", type=int, default=20, help="prompts timed per path (default: 20)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat} must be >= 1")
    try:
        res, mapping = resolve_rank(config_from_args(args), default_model=False)
        executor = build_executor(res, mapping, slots=1)
    except RopespError as exc:
        print(f"prompt_kv_bench: error: {exc}", file=sys.stderr)
        return 2
    if executor._prompt_graph is None:
        print("prompt_kv_bench: error: the prompt graph needs CUDA graphs on a GPU", file=sys.stderr)
        return 2
    device = executor.device
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    cfg = executor.cfg
    prompts = [torch.randn(1, 8 + i % 24, cfg.text_dim, generator=g) * 0.1 for i in range(args.repeat + 2)]
    executor.set_prompt(prompts[0])  # captures the graph, makes the slot's buffers

    def eager(pe: torch.Tensor) -> None:
        with torch.inference_mode():
            kv = executor.model.cross_kv(pe.to(device))
            refresh_cross_kv(executor.cross_kv, kv)

    rows = {}
    for name, fn in (("eager", eager), ("graph", executor.set_prompt)):
        fn(prompts[1])
        sync()
        times = [_time(lambda pe=pe, fn=fn: fn(pe), sync) for pe in prompts[2:]]
        rows[name] = {
            "host_ms": statistics.median(t[0] for t in times),
            "done_ms": statistics.median(t[1] for t in times),
        }
        print(f"{name}: host {rows[name]['host_ms']:.2f} ms, done {rows[name]['done_ms']:.2f} ms")
    out = {
        "config": res.config.to_dict(),
        "results": rows,
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
