"""`ropesp build`: export the DiT's segments per rank into an engine directory (export/build.py)."""

from __future__ import annotations

import sys

from ropesp.cli.flags import add_flags, given
from ropesp.settings import BUILD_BACKENDS, BUILD_SECTIONS, SECTIONS, ModelSource


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="export engines (AOTInductor, ONNX, TensorRT) for one world size and video size",
        description="Export the DiT per rank into an engine directory that `ropesp generate --engines DIR`, "
        "`ropesp.Pipeline(engines=DIR)` and the Triton model load in seconds.",
    )
    for part, names in BUILD_SECTIONS.items():
        add_flags(p, SECTIONS[part], only=names, help=_HELP)
    g = p.add_argument_group("build")
    g.add_argument(
        "--backend",
        required=True,
        choices=BUILD_BACKENDS,
        help="aoti: AOTInductor packages (run here); "
        "onnx: graphs for ONNX Runtime (CPU verification); tensorrt: TensorRT engines where installed",
    )
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="engine directory to write (manifest.json + rank*/): new or empty",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous ropesp build in --out (only the files its manifest lists)",
    )
    g.add_argument("--autotune", action="store_true", help="AOTInductor max-autotune on CUDA (slower build)")
    p.set_defaults(run=run)


_HELP = {
    "frames": "the default video length, 4k+1 video frames: sizes the KV cache (instead of --max-frames)",
    "device": "where the engines run (default: cuda for tensorrt, else cpu)",
    "world_size": "sequence-parallel ranks the engines are for (default: 1)",
}


def run(args) -> None:
    from ropesp.export.build import BuildConfig, build
    from ropesp.extras import require

    if args.backend in ("onnx", "tensorrt"):  # TensorRT engines are built from the ONNX graphs
        require("onnx", f"--backend {args.backend}")
    if args.backend == "tensorrt":
        from ropesp.export import tensorrt as trt_build

        trt_build.require()  # TensorRT's own message: how to get it, and --backend aoti meanwhile
    settings = {}
    for cls in SECTIONS.values():
        settings.update(given(args, cls))
    cfg = BuildConfig.of(args.out, args.backend, autotune=args.autotune, overwrite=args.overwrite, **settings)
    if not any(settings.get(n) for n in ModelSource.names()):  # BuildConfig chose the shipped weights
        print(
            f"ropesp: no --checkpoint given: building the embedded demo model ({cfg.source.checkpoint})",
            file=sys.stderr,
        )
    build(cfg)
