"""The cached chunk-by-chunk forward equals a full-sequence forward under the block-causal mask."""

import pytest
import torch

from ropesp.config import CacheConfig
from ropesp.model.kv_cache import KVCache
from ropesp.model.rope import RopeGrid, rope_apply_ref
from ropesp.model.wan import timestep_sinusoid
from ropesp.plugins.rope_sp import rope_for_rank
from ropesp.runtime.runners import SingleDeviceRunner


class BlockCausalRunner:
    """All frames at once; token q sees token k iff k's chunk is not after q's chunk."""

    first_token = 0

    def __init__(self, frames, rows, cols, chunk):
        self.grid = (frames, rows, cols)
        f = torch.arange(frames).repeat_interleave(rows * cols) // chunk
        self.mask = f[None, :] <= f[:, None]  # [Lq, Lk]

    def shard(self, t):
        return t

    def gather(self, t):
        return t

    def rope(self, x):
        return rope_apply_ref(x, 0, *self.grid)

    def attention(self, layer, q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask
        )
        return out.transpose(1, 2)


def _sin(cfg, t_frames):
    return timestep_sinusoid(torch.tensor(t_frames, dtype=torch.float32), cfg.freq_dim)[None]


@pytest.mark.parametrize("chunk", [3, 1])
def test_cached_chunks_equal_block_causal_full_forward(tiny_model, tiny_cfg, prompt, chunk):
    frames, h, w = 6, 8, 10
    rows, cols = h // 2, w // 2
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, frames, 16, h, w, generator=g)
    noisy = torch.randn(1, chunk, 16, h, w, generator=g)
    cross = tiny_model.cross_kv(prompt)
    t_noisy = 937.5

    # cached path: clean context chunks at t=0, then the noisy last chunk
    ft = rows * cols
    cache = KVCache(tiny_cfg.num_layers, 1, ft, CacheConfig(frames + chunk), 12, 16, torch.float32, "cpu")

    def cached_forward(x, t, start):
        slots = cache.begin(start * ft, x.shape[1] * ft)
        rope = rope_for_rank(RopeGrid(x.shape[1], rows, cols), start, op=False)
        out = tiny_model(x, _sin(tiny_cfg, [t] * x.shape[1]), cross, SingleDeviceRunner(cache, slots, rope))
        cache.commit(slots)
        return out

    with torch.no_grad():
        for start in range(0, frames, chunk):
            cached_forward(clean[:, start : start + chunk], 0.0, start)
        out_cached = cached_forward(noisy, t_noisy, frames)

        full_x = torch.cat([clean, noisy], dim=1)
        t_frames = [0.0] * frames + [t_noisy] * chunk
        runner = BlockCausalRunner(frames + chunk, rows, cols, chunk)
        out_full = tiny_model(full_x, _sin(tiny_cfg, t_frames), cross, runner)
    # fp32 with different reduction orders (SDPA over a window vs a masked full sequence)
    torch.testing.assert_close(out_cached, out_full[:, frames:], rtol=1e-4, atol=1e-5)


def test_per_layer_cache_holds_clean_context_keys(tiny_model, tiny_cfg, prompt):
    """After the clean pass, every layer's cached keys equal the full masked forward's keys."""
    frames, h, w, chunk = 6, 8, 8, 3
    rows, cols = 4, 4
    ft = rows * cols
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(1, frames, 16, h, w, generator=g)
    cross = tiny_model.cross_kv(prompt)
    cache = KVCache(tiny_cfg.num_layers, 1, ft, CacheConfig(frames), 12, 16, torch.float32, "cpu")
    with torch.no_grad():
        for start in range(0, frames, chunk):
            # a noisy pass first, then the clean pass must overwrite its slots
            for x, t in (
                (torch.randn(1, chunk, 16, h, w, generator=g), 625.0),
                (clean[:, start : start + chunk], 0.0),
            ):
                slots = cache.begin(start * ft, chunk * ft)
                rope = rope_for_rank(RopeGrid(chunk, rows, cols), start, op=False)
                tiny_model(x, _sin(tiny_cfg, [t] * chunk), cross, SingleDeviceRunner(cache, slots, rope))
                cache.commit(slots)

        keys = {}

        class Capture(BlockCausalRunner):
            def attention(self, layer, q, k, v):
                keys[layer] = k
                return super().attention(layer, q, k, v)

        tiny_model(clean, _sin(tiny_cfg, [0.0] * frames), cross, Capture(frames, rows, cols, chunk))
    for layer in range(tiny_cfg.num_layers):
        torch.testing.assert_close(cache.k[layer], keys[layer], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the GELU epilogue is cuBLASLt's)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_gelu_epilogue_matches_tanh_gelu_on_cuda(dtype):
    """The fused bias + GELU(tanh) GEMM epilogue equals Linear -> GELU(tanh) -> Linear: fp32 to TF32-free
    rounding, bf16 to one bf16 rounding of the [L, ffn_dim] activation (2^-8 relative)."""
    from ropesp.model.wan import FeedForward

    torch.backends.cuda.matmul.allow_tf32 = False
    ffn = FeedForward(64, 256).to("cuda", dtype)
    x = torch.randn(1, 300, 64, device="cuda", dtype=dtype)
    up, act, down = ffn
    ref = down(act(up(x).float()).to(dtype))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ffn(x), ref, **tol)


def test_modulation_is_wans_draw_and_meta_models_skip_it():
    from ropesp.model.wan import modulation

    torch.manual_seed(0)
    got = modulation(6, 64)
    torch.manual_seed(0)
    assert torch.equal(got, torch.randn(1, 6, 64) / 64**0.5)  # the random-weight presets keep their values
    with torch.device("meta"):
        assert modulation(2, 8).is_meta
