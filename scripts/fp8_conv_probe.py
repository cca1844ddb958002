"""FP8 (e4m3) convolutions through cuDNN's graph API at the Wan VAE decoder's heaviest shapes, against the
bf16 cuDNN convolution the decoder runs today: time per call and error against fp32.

    python scripts/fp8_conv_probe.py --json out.json

Needs a Hopper GPU and the `nvidia-cudnn-frontend` wheel (module `cudnn`, using the libcudnn that torch
loads). Every input is a decoder convolution's steady input as the fast decoder holds it (already padded,
channels-last), filled with SiLU(N(0, 1)) as the fused norm + SiLU pass writes it; weights N(0, 1/fan_in),
bias N(0, 0.1). FP8: the input scaled per tensor and the weights per output channel to e4m3's range, the
product's scale taken out and the bias added in the convolution's epilogue, bf16 out. Times: CUDA events,
median of 20 calls (milliseconds); for the graph variants, the fastest of cuDNN's plans for the shape.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from cuda_timing import median_ms

E4M3_MAX = 448.0

# name, input [B, C, (T,) H, W] as the decoder holds it (padded), output channels, kernel
SHAPES = [
    ("3x3x3 384<-384 h/4", (1, 384, 4, 122, 210), 384, (3, 3, 3)),
    ("3x3x3 384<-192 h/4", (1, 192, 4, 122, 210), 384, (3, 3, 3)),
    ("3x3x3 192<-192 h/2", (1, 192, 6, 242, 418), 192, (3, 3, 3)),
    ("3x3x3 96<-96 full", (1, 96, 6, 482, 834), 96, (3, 3, 3)),
    ("up 3x3 192<-384 h/2", (4, 384, 242, 418), 192, (3, 3)),
    ("up 3x3 96<-192 full", (4, 192, 482, 834), 96, (3, 3)),
    ("3x3x3 96<-192 full", (1, 192, 6, 482, 834), 96, (3, 3, 3)),
    ("conv_out 3x3x3 3<-96", (1, 96, 6, 482, 834), 3, (3, 3, 3)),
    # conv_out with zero output channels added (a wider GEMM tile, the first 3 channels kept): 1.2 ms
    # a later latent frame for 3 channels, 8x its input's read at 3 TB/s
    ("conv_out padded 8<-96", (1, 96, 6, 482, 834), 8, (3, 3, 3)),
    ("conv_out padded 16<-96", (1, 96, 6, 482, 834), 16, (3, 3, 3)),
    ("3x3x3 384<-384 h/8", (1, 384, 3, 62, 106), 384, (3, 3, 3)),
    ("time 3x1x1 768<-384 h/4", (1, 384, 4, 120, 208), 768, (3, 1, 1)),
    ("up 3x3 192<-384 h/4", (2, 384, 122, 210), 192, (3, 3)),
]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, w, b)


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def graph_conv(cudnn, handle, x, w, bias, descale, out):
    """A cuDNN graph: conv(x, w) * descale + bias -> out (bf16); x, w bf16 or e4m3; descale [1, K, 1..]
    fp32 or None. Returns (run, plans) with run(i) executing plan i."""
    g = cudnn.pygraph(
        io_data_type=cudnn.data_type.BFLOAT16,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    fp8 = x.dtype == torch.float8_e4m3fn
    kind = cudnn.data_type.FP8_E4M3 if fp8 else cudnn.data_type.BFLOAT16
    X = g.tensor(name="x", dim=list(x.shape), stride=list(x.stride()), data_type=kind)
    W = g.tensor(name="w", dim=list(w.shape), stride=list(w.stride()), data_type=kind)
    B = g.tensor(
        name="b", dim=list(bias.shape), stride=list(bias.stride()), data_type=cudnn.data_type.BFLOAT16
    )
    spatial = x.dim() - 2
    y = g.conv_fprop(image=X, weight=W, padding=[0] * spatial, stride=[1] * spatial, dilation=[1] * spatial)
    pack = {X: x, W: w, B: bias}
    if descale is not None:
        S = g.tensor(
            name="descale",
            dim=list(descale.shape),
            stride=list(descale.stride()),
            data_type=cudnn.data_type.FLOAT,
        )
        y = g.mul(a=y, b=S)
        pack[S] = descale
    y = g.bias(name="bias", input=y, bias=B)
    y.set_output(True).set_data_type(cudnn.data_type.BFLOAT16).set_dim(list(out.shape)).set_stride(
        list(out.stride())
    )
    pack[y] = out
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    plans = g.get_execution_plan_count()
    size = max(g.get_workspace_size_plan_at_index(i) for i in range(plans))
    workspace = torch.empty(max(size, 1), device="cuda", dtype=torch.uint8)

    def run(i: int) -> None:
        g.execute_plan_at_index(pack, workspace, i, handle=handle)

    return run, plans


def fastest(run, plans: int) -> tuple[float, int]:
    """(median ms, plan index) of the fastest plan; plans that fail to run are skipped."""
    best = (float("inf"), -1)
    for i in range(plans):
        try:
            ms = median_ms(lambda i=i: run(i), reps=10, warmup=2)
        except Exception:  # a plan cuDNN built but cannot run at this shape
            continue
        best = min(best, (ms, i))
    if best[1] >= 0:
        best = (median_ms(lambda: run(best[1])), best[1])
    return best


def probe(cudnn, handle, name, shape, out_ch, kernel) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    in_ch = shape[1]
    x = channels_last(F.silu(torch.randn(shape, device="cuda", generator=gen)))
    fan_in = in_ch * int(torch.tensor(kernel).prod())
    w = channels_last(torch.randn((out_ch, in_ch, *kernel), device="cuda", generator=gen) / fan_in**0.5)
    b = torch.randn(out_ch, device="cuda", generator=gen) * 0.1
    torch.backends.cudnn.allow_tf32 = False
    ref = conv(x, w, b)  # fp32
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    row: dict = {"name": name, "input": list(shape), "out_channels": out_ch, "kernel": list(kernel)}
    flops = 2 * ref.numel() * fan_in
    row["gflop"] = flops / 1e9

    y = conv(xb, wb, bb)
    row["torch_bf16"] = {"ms": median_ms(lambda: conv(xb, wb, bb)), "rel_l2": rel_l2(y, ref)}
    del y

    bias = bb.view(1, out_ch, *[1] * (x.dim() - 2))
    out = channels_last(torch.empty(ref.shape, device="cuda", dtype=torch.bfloat16))
    try:
        run, plans = graph_conv(cudnn, handle, xb, wb, bias, None, out)
        ms, plan = fastest(run, plans)
        run(plan)
        row["graph_bf16"] = {"ms": ms, "plans": plans, "rel_l2": rel_l2(out, ref)}
    except Exception as exc:  # report what cuDNN refuses, go on with the next variant
        row["graph_bf16"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}

    sx = float(x.abs().amax()) / E4M3_MAX
    sw = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / E4M3_MAX  # [K, 1, ...]
    x8 = channels_last((x / sx).to(torch.float8_e4m3fn))
    w8 = channels_last((w / sw).to(torch.float8_e4m3fn))
    descale = (sw.view(1, out_ch, *[1] * (x.dim() - 2)) * sx).float().contiguous()
    try:
        run, plans = graph_conv(cudnn, handle, x8, w8, bias, descale, out)
        ms, plan = fastest(run, plans)
        out.zero_()
        run(plan)
        row["graph_fp8"] = {"ms": ms, "plans": plans, "rel_l2": rel_l2(out, ref)}
    except Exception as exc:
        row["graph_fp8"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    for key in ("torch_bf16", "graph_bf16", "graph_fp8"):
        if "ms" in row[key]:
            row[key]["tflops"] = flops / row[key]["ms"] / 1e9
    if "ms" in row["graph_fp8"]:
        row["fp8_speedup"] = row["torch_bf16"]["ms"] / row["graph_fp8"]["ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where the rows go")
    ap.add_argument("--from", dest="first", type=int, default=0, help="skip the first N shapes")
    args = ap.parse_args()
    import cudnn

    torch.backends.cudnn.benchmark = True
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    rows = []
    head = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_frontend": getattr(cudnn, "__version__", "?"),
        "cudnn_backend": cudnn.backend_version(),
    }
    print(json.dumps(head), flush=True)
    for shape in SHAPES[args.first :]:
        row = probe(cudnn, handle, *shape)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        with open(args.json, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
