"""Micro-benchmark of one attention layer's SP stages at Wan-1.3B 480p shapes (run on P GPUs).

    torchrun --nproc-per-node 2 scripts/sp_stage_bench.py --json out.json

RoPE stage: the paper's baseline (all-gather q and k to the full chunk, reference float64 RoPE
per call, keep this rank's slice) vs Causal-RoPE SP (the rope_sp kernel on local tokens).
Communication: q, k, v in one fused all-to-all vs three, plus the all-to-all back. CUDA events,
median of many iterations after warm-up; every rank runs the same loop.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from cuda_timing import median_ms

from ropesp.model.rope import rope_apply_ref
from ropesp.parallel import TokenShard
from ropesp.runtime.runners import UlyssesRunner
from ropesp.runtime.sp import Collectives


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--cols", type=int, default=52)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        import ropesp.plugins.rope_sp  # noqa: F401  registers torch.ops.ropesp.rope_sp

        total = args.frames * args.rows * args.cols
        shard = TokenShard.split(total, world, rank)
        g = torch.Generator(device).manual_seed(rank)
        shape = (1, shard.length, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
        sf = torch.tensor([6], dtype=torch.int32, device=device)
        comm = Collectives(None, world)
        grid = (args.frames, args.rows, args.cols)

        def baseline_rope():
            for x in (q, k):
                full = comm.all_gather(x).transpose(0, 1).flatten(1, 2)  # [B, L_pad, H, D]
                rope_apply_ref(full, 6, *grid)[:, shard.first : shard.first + shard.length]

        def local_rope():
            for x in (q, k):
                torch.ops.ropesp.rope_sp(x, sf, *grid, shard.first, 10000.0)

        # numerics: both paths give the same rotation of this rank's tokens
        ref = rope_apply_ref(comm.all_gather(q).transpose(0, 1).flatten(1, 2), 6, *grid)
        ours = torch.ops.ropesp.rope_sp(q, sf, *grid, shard.first, 10000.0)
        diff = (ours.float() - ref[:, shard.first : shard.first + shard.length].float()).abs().max().item()

        runner = {
            mode: UlyssesRunner(shard, comm, None, None, None, sp_comm=mode) for mode in ("fused", "unfused")
        }

        def comm_fused():
            out = runner["fused"]._to_heads(torch.stack((q, k, v)))
            runner["fused"]._to_tokens(out[0])

        def comm_unfused():
            r = runner["unfused"]
            qh, _, _ = r._to_heads(q), r._to_heads(k), r._to_heads(v)
            r._to_tokens(qh)

        res = {
            "world_size": world,
            "card": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "tokens_per_rank": shard.length,
            "rope_max_abs_diff_vs_reference_bf16": diff,
            "rope_allgather_ms": median_ms(baseline_rope, args.iters, warmup=10, before=dist.barrier),
            "rope_local_ms": median_ms(local_rope, args.iters, warmup=10, before=dist.barrier),
            "comm_fused_ms": median_ms(comm_fused, args.iters, warmup=10, before=dist.barrier),
            "comm_unfused_ms": median_ms(comm_unfused, args.iters, warmup=10, before=dist.barrier),
        }
        res["rope_speedup"] = res["rope_allgather_ms"] / res["rope_local_ms"]
        res["comm_speedup"] = res["comm_unfused_ms"] / res["comm_fused_ms"]
        if rank == 0:
            print(json.dumps(res, indent=2))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
