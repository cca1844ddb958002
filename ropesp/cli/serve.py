"""`ropesp serve-repo` (write a Triton model repository for the engine) and `ropesp serve` (run
tritonserver on one, on 127.0.0.1)."""

from __future__ import annotations

import sys

from ropesp.cli.flags import add_flags, config_from_args
from ropesp.settings import SECTIONS, SERVED_DEFAULTS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve-repo",
        help="write a Triton Inference Server model repository (streaming, several streams per engine)",
        description="Write a Triton model repository whose model is the ropesp engine: decoupled, one "
        "response per chunk, several streams at once with per-stream control.",
    )
    for section in SECTIONS.values():
        add_flags(p, section, defaults=SERVED_DEFAULTS)
    g = p.add_argument_group("repository")
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="repository directory (the model goes to OUT/<model-name>)",
    )
    g.add_argument(
        "--model-name", default="ropesp", help="the model's name in the repository (default: ropesp)"
    )
    g.add_argument(
        "--instances",
        type=int,
        default=1,
        help="engines served as Triton model instances, each on its own GPU (or set of --world-size GPUs); "
        "each stream stays on the instance that holds its KV cache (default: 1)",
    )
    g.add_argument(
        "--link", action="store_true", help="symlink artifacts instead of copying them (not relocatable)"
    )
    g.add_argument("--force", action="store_true", help="replace a model that serve-repo wrote before")
    p.set_defaults(run=run_repo)

    p = sub.add_parser("serve", help="run tritonserver (from nvidia-pytriton) on a repository, on 127.0.0.1")
    p.add_argument("--repo", required=True, metavar="DIR", help="model repository from `ropesp serve-repo`")
    p.add_argument("--http-port", type=int, help="default: a free port")
    p.add_argument("--grpc-port", type=int, help="default: a free port")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the server to be ready (default: 600)",
    )
    p.set_defaults(run=run_serve)


def run_repo(args) -> None:
    from ropesp.serving.repository import write_repository

    model_dir = write_repository(
        args.out,
        config_from_args(args),
        model_name=args.model_name,
        instances=args.instances,
        link=args.link,
        overwrite=args.force,
    )
    print(f"wrote {model_dir}; serve it with: ropesp serve --repo {args.out}", file=sys.stderr)


def run_serve(args) -> None:
    from ropesp.serving.server import TritonServer

    server = TritonServer(
        args.repo, http_port=args.http_port, grpc_port=args.grpc_port, ready_timeout_s=args.timeout
    )
    try:
        with server:  # stopped on the way out: SIGINT and SIGTERM raise KeyboardInterrupt in here
            print(
                f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log {server.log_path}); "
                "Ctrl-C stops it",
                file=sys.stderr,
            )
            server.wait()
    except KeyboardInterrupt:
        print("tritonserver stopped", file=sys.stderr)
