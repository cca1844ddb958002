"""The `ropesp` command: each command is a module of this package that declares its own options, takes
the run settings as flags generated from ropesp.settings, calls the engine (or the exporter) and reports.

    ropesp generate   stream a video into an MP4 (and PNG frames, latents)     cli/generate.py
    ropesp build      export engines for a world size (AOTInductor, ONNX, TensorRT)  cli/build.py
    ropesp bench      time the optimized paths against the baselines            cli/bench.py
    ropesp serve-repo write a Triton Inference Server model repository          cli/serve.py
    ropesp serve      run tritonserver on a repository                          cli/serve.py
    ropesp demo       a web page that streams generated frames live             cli/demo.py
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ropesp import __version__, start_gc
from ropesp.errors import RopespError

COMMANDS = ("generate", "build", "bench", "serve", "demo")
"""The modules of this package that add commands (serve adds serve-repo and serve)."""
DESCRIPTION = (
    "Real-time streaming video generation with causal video diffusion transformers (Self-Forcing on "
    "Wan2.1), on one GPU or sequence-parallel over several. Without a model named, the commands run the "
    "embedded demo model, which knows prompts such as 'two blue discs bouncing'."
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run stopped; `code` is the exit status (130 or 143)."""

    def __init__(self, code: int = 130) -> None:
        super().__init__()
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropesp", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ropesp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ropesp.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":  # until its first chunk (the command releases it): ropesp/start_gc.py
        start_gc.hold()
    try:
        args.run(args)
    except RopespError as exc:
        print(f"ropesp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: every rank was stopped on the way out
        print("ropesp: interrupted", file=sys.stderr)
        return getattr(exc, "code", 130)
    finally:
        start_gc.release()
    return 0
