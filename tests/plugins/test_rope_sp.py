"""ropesp::rope_sp against the float64 reference (full chunk, then sliced per rank) and the fp32 tables."""

from __future__ import annotations

import pytest
import torch

from ropesp.model.rope import RopeGrid, RopeTables, rope_apply, rope_apply_ref
from ropesp.plugins.rope_sp import rope_for_rank, rope_sp, rope_sp_ref

THETA = 10000.0
# (frames, rows, cols, world size, heads, head_dim): L divisible or not by P, odd heads, Wan's head_dim
CASES = [
    (3, 4, 5, 2, 3, 24),
    (3, 5, 7, 4, 5, 16),
    (2, 3, 3, 5, 1, 128),
    (1, 6, 4, 3, 2, 64),
]
# fp32: cos/sin are rounded to fp32 (2^-24 relative) and the rotation takes ~3 fp32 roundings, so the
# error against float64 is a few 1e-7 * |x|; bf16: both sides round once to bf16, so at most one ulp (2^-7).
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-5, rtol=2**-7)}


def sf(value: int, device="cpu") -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32, device=device)


def shards(frames, rows, cols, world, heads, head_dim, dtype, seed):
    """Full padded chunk [1, P*Lr, H, D] and its per-rank slices (first_token, x_rank)."""
    g = torch.Generator().manual_seed(seed)
    seq = frames * rows * cols
    per_rank = -(-seq // world)
    full = torch.randn(1, per_rank * world, heads, head_dim, generator=g).to(dtype)
    return full, [(r * per_rank, full[:, r * per_rank : (r + 1) * per_rank]) for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_rope_sp_matches_float64_reference_per_rank(case, dtype):
    frames, rows, cols = case[:3]
    seq = frames * rows * cols
    for seed in range(3):
        start = int(torch.randint(0, 1024 - frames, (1,), generator=torch.Generator().manual_seed(seed)))
        full, ranks = shards(*case, dtype, seed)
        ref = rope_apply_ref(full, start, frames, rows, cols, THETA)  # float64 math on the FULL chunk
        for first, x in ranks:
            out = torch.ops.ropesp.rope_sp(x, sf(start), frames, rows, cols, first, THETA)
            assert out.dtype == dtype and out.shape == x.shape
            torch.testing.assert_close(out, ref[:, first : first + x.shape[1]], **TOL[dtype])
            pad = max(seq - first, 0)
            assert torch.equal(out[:, pad:], x[:, pad:]), "SP padding tokens must pass through unchanged"


@pytest.mark.parametrize("start", [0, 7, 1000, 50_000])
def test_rope_sp_equals_tables_exactly_fp32(start):
    frames, rows, cols, world, heads, head_dim = 3, 5, 7, 4, 3, 128
    tables = RopeTables(head_dim, start + frames, rows, cols, THETA)
    _, ranks = shards(frames, rows, cols, world, heads, head_dim, torch.float32, start)
    for first, x in ranks:
        out = rope_sp(x, sf(start), frames, rows, cols, first, THETA)
        expected = rope_apply(x, sf(start), tables, frames, rows, cols, first)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_sp_opcheck(dtype):
    x = torch.randn(2, 13, 3, 24).to(dtype)
    torch.library.opcheck(torch.ops.ropesp.rope_sp.default, (x, sf(4), 2, 2, 3, 5, THETA))


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, start_frame: torch.Tensor) -> torch.Tensor:
        return torch.ops.ropesp.rope_sp(q * 2.0, start_frame, 2, 3, 4, 6, THETA) + 1.0


def test_rope_sp_exports_as_one_node_with_start_frame_input():
    q = torch.randn(1, 12, 3, 24)
    ep = torch.export.export(_Attention(), (q, sf(3)))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.ropesp.rope_sp.default]
    assert len(nodes) == 1
    user_inputs = ep.graph_signature.user_inputs
    assert len(user_inputs) == 2
    assert nodes[0].args[1].name == user_inputs[1], "start_frame must be a runtime input of the graph"
    assert nodes[0].args[2:] == (2, 3, 4, 6, THETA)
    torch.testing.assert_close(ep.module()(q, sf(9)), _Attention()(q, sf(9)), atol=0, rtol=0)


@pytest.mark.parametrize("op", [True, False])
def test_rope_for_rank_binds_the_grid(op):
    """The op and the reference form give the reference's values exactly, for an int or a tensor start."""
    x = torch.randn(1, 10, 2, 24)
    expected = rope_sp_ref(x, sf(5), 2, 3, 4, 6, THETA)
    grid = RopeGrid(2, 3, 4, first_token=6, theta=THETA)
    for start in (5, sf(5)):
        rope = rope_for_rank(grid, start, op=op)
        for _ in range(2):  # the reference form reuses its cos/sin for the second call
            torch.testing.assert_close(rope(x), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="int32"):
        rope_for_rank(grid, torch.tensor([5]), op=op)


@pytest.mark.parametrize(
    "x, start, match",
    [
        (torch.randn(10, 2, 24), sf(0), "B, L, H, D"),
        (torch.randn(1, 10, 2, 24).double(), sf(0), "dtype"),
        (torch.randn(1, 10, 2, 7), sf(0), "head_dim 7"),
        (torch.randn(1, 10, 2, 24), torch.tensor([0]), "int32"),
        (torch.randn(1, 10, 2, 24), sf(0).repeat(2), "shape \\[1\\]"),
    ],
)
def test_rope_sp_rejects_bad_input(x, start, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.ropesp.rope_sp(x, start, 2, 3, 4, 0, THETA)


def test_rope_sp_rejects_bad_attributes():
    x = torch.randn(1, 10, 2, 24)
    with pytest.raises(ValueError, match="first_token -1"):
        rope_sp(x, sf(0), 2, 3, 4, -1, THETA)
    with pytest.raises(ValueError, match="grid"):
        rope_sp(x, sf(0), 0, 3, 4, 0, THETA)


# ---- the Triton kernel (CUDA) ----
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")
# Kernel vs fp32 tables: in-kernel fp32 sin/cos of a float64-reduced angle differ from the tables by a
# few fp32 ulp, and the rotation is fused into FMAs.
GPU_TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.bfloat16: dict(atol=1e-5, rtol=2**-7),
    torch.float16: dict(atol=1e-5, rtol=2**-10),
}
# (B, L, H, D, frames, rows, cols, first_token, start_frame)
GPU_SHAPES = [
    (1, 2340, 12, 128, 3, 30, 52, 2340, 9),  # Wan-1.3B 480p, rank 1 of 2
    (1, 2340, 12, 128, 3, 30, 52, 0, 20_000),  # rank 0, far into an unbounded stream
    (2, 37, 5, 64, 2, 3, 7, 11, 3),  # odd heads, L not a multiple of BLOCK_L, padding tokens, B=2
    (1, 1, 1, 24, 1, 1, 1, 0, 0),
    (1, 100, 3, 96, 4, 5, 6, 60, 500),  # head_dim not a power of two
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_rope_sp_kernel_matches_reference(shape, dtype):
    b, length, heads, head_dim, frames, rows, cols, first, start = shape
    x = torch.randn(b, length, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = torch.ops.ropesp.rope_sp(x.cuda(), sf(start, "cuda"), frames, rows, cols, first, THETA)
    ref = rope_sp_ref(x, sf(start), frames, rows, cols, first, THETA)
    torch.testing.assert_close(out.cpu(), ref, **GPU_TOL[dtype])
    seq = frames * rows * cols
    pad = min(max(seq - first, 0), length)
    assert torch.equal(out[:, pad:].cpu(), x[:, pad:])


@pytest.mark.gpu
@needs_cuda
def test_rope_sp_kernel_under_torch_compile():
    x = torch.randn(1, 300, 6, 128, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(_Attention(), fullgraph=True)
    torch.testing.assert_close(fn(x, sf(4, "cuda")), _Attention()(x, sf(4, "cuda")), atol=0, rtol=0)
