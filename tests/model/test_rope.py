import pytest
import torch

from ropesp.model.rope import RopeTables, rope_apply, rope_apply_ref, token_positions


@pytest.mark.parametrize("start_frame", [0, 3, 17, 1000])
@pytest.mark.parametrize("grid", [(3, 8, 8), (1, 5, 7), (3, 30, 52)])
def test_rope_tables_match_float64_reference(start_frame, grid):
    frames, rows, cols = grid
    g = torch.Generator().manual_seed(start_frame)
    x = torch.randn(1, frames * rows * cols + 5, 3, 16, generator=g)  # 5 SP padding tokens
    tables = RopeTables(16, max_frames=start_frame + frames, max_rows=rows, max_cols=cols)
    ours = rope_apply(x, start_frame, tables, frames, rows, cols)
    ref = rope_apply_ref(x, start_frame, frames, rows, cols)
    # fp32 rotation of O(1) values: a few ulps of fp32 (1.2e-7) per product
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    assert torch.equal(ours[:, -5:], x[:, -5:]), "padding tokens must pass through unchanged"


def test_rope_rank_slices_match_full_chunk():
    frames, rows, cols, sp = 3, 5, 7, 4  # 105 tokens: not divisible by 4
    total = frames * rows * cols
    local = -(-total // sp)
    x = torch.randn(1, local * sp, 2, 16)
    tables = RopeTables(16, 40, rows, cols)
    full = rope_apply(x, 30, tables, frames, rows, cols)
    for r in range(sp):
        part = rope_apply(
            x[:, r * local : (r + 1) * local], 30, tables, frames, rows, cols, first_token=r * local
        )
        assert torch.equal(part, full[:, r * local : (r + 1) * local])


def test_token_positions_follow_the_global_time_index():
    time, row, col, valid = token_positions(torch.tensor([6], dtype=torch.int32), 10, 8, 2, 2, 3)
    # tokens 10..17 of a 2x(2x3) grid: 10, 11 are in frame 1; 12.. are padding
    assert time.tolist()[:2] == [7, 7]
    assert row.tolist()[:2] == [1, 1] and col.tolist()[:2] == [1, 2]
    assert valid.tolist() == [True, True] + [False] * 6


def test_rope_split_matches_wan():
    tables = RopeTables(128, 4, 4, 4)
    assert tables.split == (44, 42, 42)
    assert RopeTables(16, 4, 4, 4).split == (8, 4, 4)
