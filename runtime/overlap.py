"""Ulysses all-to-alls hidden behind computation: a chunk forward in two pipelined token halves.

`--sp-comm overlap`. Each rank splits its tokens [B, L_local, C] into halves A and B that go through
every block separately, so one half's all-to-all runs (on a communication stream) while the other
half computes. Per layer, in issue order on the compute stream:

    pre(B) | wait A,B; cache write; attn(A) | attn(B) | wait A; post(A), pre'(A) | wait B; post(B)
    comm:   q/k/v(A) ->                 o(A) ->      o(B) ->  q/k/v'(A) ->        q/k/v'(B) (next layer)

where ' is the next layer. Only half B's q/k/v exchange stays exposed (attention needs the keys of
the whole chunk); the output exchanges and half A's q/k/v run under attention, post and pre.

The math is the fused Ulysses step of runtime/sp.py (same all-to-all, same head-sharded cache,
the chunk's keys written in token order), so outputs equal `--sp-comm fused`: the halves only
change which rows a GEMM or attention call holds. Costs: GEMMs and attention on half as many rows.
"""

from __future__ import annotations

import torch

from ropesp.errors import ConfigError
from ropesp.model.kv_cache import attention
from ropesp.model.wan import CausalWanDiT
from ropesp.runtime.sp import UlyssesRunner


class _Exchange:
    """One all-to-all issued on the communication stream; `result()` makes the compute stream wait
    for it. Keeps its input alive until then (the allocator may not hand the buffer out again while
    the communication stream still reads it)."""

    def __init__(self, fn, x: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        self._keep, self._event = x, None
        if stream is None:  # CPU (gloo): in order
            self._out = fn(x)
            return
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._out = fn(x)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def result(self) -> torch.Tensor:
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        self._keep = None
        return self._out


def overlapped_forward(
    model: CausalWanDiT,
    x: torch.Tensor,
    t_sinusoid: torch.Tensor,
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
    runner: UlyssesRunner,
    ropes: tuple,
    comm_stream: torch.cuda.Stream | None,
) -> torch.Tensor:
    """`CausalWanDiT.forward` of one Ulysses rank with the halves pipelined.

    x: [B, F, C, H, W]; t_sinusoid: [B, F, freq_dim]; ropes: the local RoPE of half A and of half B
    (first token `runner.first_token` and `runner.first_token + len(A)`); comm_stream: CUDA stream of
    the all-to-alls (None on the CPU). Returns the flow [B, F, C_out, H, W] fp32.
    """
    cfg = model.cfg
    _, frames, _, height, width = x.shape
    rows, cols = height // cfg.patch_size[1], width // cfg.patch_size[2]
    tokens = runner.shard(model.patchify(x))  # [B, L_local, C]
    length = tokens.shape[1]
    frame_of_token = model.frame_index(runner.first_token, length, frames, rows * cols, x.device)
    e, e0 = model.embed_time(t_sinusoid)
    cut = split_point(length)
    halves = [tokens[:, :cut].contiguous(), tokens[:, cut:].contiguous()]  # [B, L_half, C]
    fots = [frame_of_token[:cut], frame_of_token[cut:]]
    sp = runner.sp

    def send_qkv(half: int, layer: int) -> _Exchange:
        q, k, v = model.blocks[layer].pre_attention(halves[half], e0, fots[half], ropes[half])
        return _Exchange(runner._to_heads, torch.stack((q, k, v)), comm_stream)  # [3, B, L_half, H, D]

    pending = send_qkv(0, 0)
    for i, block in enumerate(model.blocks):
        qkv = [pending.result(), None]
        qkv[1] = send_qkv(1, i).result()  # [3, B, U*L_half, H/U, D] each
        (qa, ka, va), (qb, kb, vb) = qkv
        k_win, v_win = runner.cache.update(i, runner.slots, *_chunk_kv(ka, kb, va, vb, sp, runner))
        back = []
        for q in (qa, qb):
            back.append(_Exchange(runner._to_tokens, attention(q, k_win, v_win), comm_stream))
        halves[0] = block.post_attention(halves[0], back[0].result(), e0, fots[0], *cross_kv[i])
        if i + 1 < len(model.blocks):
            pending = send_qkv(0, i + 1)
        halves[1] = block.post_attention(halves[1], back[1].result(), e0, fots[1], *cross_kv[i])
    out = model.head(torch.cat(halves, dim=1), e[:, frame_of_token])  # [B, L_local, patch_out]
    out = runner.gather(out)  # [B, L, patch_out]
    return model.unpatchify(out.float(), frames, rows, cols)


def split_point(length: int) -> int:
    """Rows of half A: the larger half when L_local is odd (pre and post then compile two shapes)."""
    return (length + 1) // 2


def _chunk_kv(ka, kb, va, vb, sp: int, runner: UlyssesRunner) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's keys and values in token order [B, L_real, H/U, D] from the halves' exchanges
    [B, U*L_half, H/U, D] (rank-major: rank r's half A rows, then rank r+1's), padding dropped, so
    the cache holds exactly what `--sp-comm fused` writes."""
    out = []
    for a, b in ((ka, kb), (va, vb)):
        bsz, _, h, d = a.shape
        full = torch.cat(
            (a.view(bsz, sp, -1, h, d), b.view(bsz, sp, -1, h, d)), dim=2
        )  # [B, U, L_local, h, D]
        out.append(full.flatten(1, 2)[:, : runner.shard_info.total])
    return out[0], out[1]


def check_overlap(sp_rope: str, ring: int, backend: str = "eager") -> None:
    """Refuse `--sp-comm overlap` where it cannot pipeline: hybrid layouts, the gather-then-RoPE
    baseline, engine backends (their segments run the fused step)."""
    if backend not in ("eager", "compile"):
        raise ConfigError(
            f"--sp-comm overlap pipelines the model's own forward (eager, compile); the {backend} "
            "engines run the fused exchange: use --sp-comm fused"
        )
    if ring != 1 or sp_rope != "local":
        raise ConfigError(
            "--sp-comm overlap pipelines the all-to-alls of pure Ulysses with the local Causal-RoPE "
            f"SP; got ring degree {ring} and --sp-rope {sp_rope}: use --sp-comm fused for these"
        )


def comm_stream_for(device: torch.device) -> torch.cuda.Stream | None:
    """The stream the halves' all-to-alls run on (None off CUDA)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None
