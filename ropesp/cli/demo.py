"""`ropesp demo`: a web page that streams generated frames live, several tabs at once (ropesp/webdemo)."""

from __future__ import annotations

from ropesp.cli.flags import add_flags, config_from_args
from ropesp.settings import SECTIONS, SERVED_DEFAULTS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a web page that streams generated frames live (needs the [demo] extra: pip install -e '.[demo]')",
        description="Serve a web page that streams a video as it is generated, with a prompt box that "
        "steers it mid-stream; every tab its own stream, as many as the engine holds in real time.",
    )
    for section in SECTIONS.values():
        add_flags(p, section, defaults=SERVED_DEFAULTS)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8188, help="TCP port, 0 for a free one (default: 8188)")
    g.add_argument(
        "--jpeg-quality", type=int, default=85, help="frames travel as JPEG, quality 1..95 (default: 85)"
    )
    p.set_defaults(run=run)


def run(args) -> None:
    from ropesp.webdemo import check_demo_dependencies

    check_demo_dependencies()  # before the model is built
    from ropesp.webdemo.command import run as serve

    serve(config_from_args(args), host=args.host, port=args.port, jpeg_quality=args.jpeg_quality)
