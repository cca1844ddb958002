"""Who first imports a heavy module on the way through a `ropesp` command: the import's call stack.

    python scripts/first_importers.py --json who.json -- generate --engines engines/ --output v.mp4

Runs the CLI in this process with a meta-path hook that, the first time any of `--modules` is imported,
records the stack (ropesp's and torch's frames) and the seconds since the start; the JSON lists them in
import order with the command's exit code. `python -X importtime` says how long each import took; this
says which call asked for it, which is what decides whether a lazy import can move off the start-up path.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import sys
import time
import traceback

HEAVY = (
    "torch._dynamo",
    "torch._inductor",
    "sympy",
    "torch.fx.experimental.symbolic_shapes",
    "torch._higher_order_ops.triton_kernel_wrap",
    "triton",
    "av",
)


class FirstImports(importlib.abc.MetaPathFinder):
    """Records, and never changes, the first import of each watched module."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.watched, self.t0, self.seen = set(modules), time.perf_counter(), []

    def find_spec(self, name, path=None, target=None):
        if name in self.watched:
            self.watched.discard(name)
            frames = [
                f"{f.filename}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[:-1]
                if "/ropesp/" in f.filename or "/runtime/" in f.filename or "torch" in f.filename
            ]
            self.seen.append({"module": name, "at_s": time.perf_counter() - self.t0, "stack": frames[-12:]})
        return None  # the normal finders import it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where the first imports go")
    parser.add_argument("--modules", default=",".join(HEAVY), help="comma-separated module names")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the ropesp command and its options")
    args = parser.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    hook = FirstImports(tuple(args.modules.split(",")))
    sys.meta_path.insert(0, hook)
    from ropesp.cli import main as ropesp_main

    code = ropesp_main(cli)
    with open(args.json, "w") as f:
        json.dump({"command": cli, "exit_code": code, "first_imports": hook.seen}, f, indent=1)
    for row in hook.seen:
        print(f"{row['at_s']:7.2f} s  {row['module']}  <- {row['stack'][-1] if row['stack'] else '?'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
