"""The patch embedding as one GEMM (CausalWanDiT.patchify) against the strided Conv3d whose weights it uses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ropesp.config import preset
from ropesp.model.wan import CausalWanDiT


@pytest.mark.parametrize(("patch", "size"), [((1, 2, 2), (6, 16, 20)), ((1, 2, 2), (5, 17, 21))])
def test_patchify_equals_the_strided_conv(patch, size):
    cfg = dataclasses.replace(preset("tiny")[0], patch_size=patch)
    torch.manual_seed(0)
    model = CausalWanDiT(cfg)
    f, h, w = size
    x = torch.randn(2, f, cfg.in_dim, h, w)  # [B, F, C, H, W]; odd sizes: the conv drops the remainder
    with torch.no_grad():
        y = model.patch_embedding(x.transpose(1, 2))  # [B, dim, F', rows, cols]
        want = y.flatten(2).transpose(1, 2)
        got = model.patchify(x)
    assert got.shape == want.shape == (2, (f // patch[0]) * (h // 2) * (w // 2), cfg.dim)
    # fp32 sums of 64-256 products in another order: a few ulps of the outputs' magnitude
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
