"""What a fresh `ropesp generate` process imports on the way through: the compiler stack it should not.

sympy, Dynamo and Inductor cost seconds of start-up when they are first imported (more where the
installed torch has no bytecode cache), so the eager path and the engines' path must not pull them in;
the compile backend does so on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COMPILER_STACK = ("sympy", "torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")


def compiler_modules_imported(generate_args: list[str], video: Path) -> list[str]:
    """Run `ropesp generate ARGS --output video` in a fresh interpreter (it must succeed and write the
    video) and return the COMPILER_STACK modules it imported."""
    code = (
        "import json, sys\n"
        "from ropesp.cli import main\n"
        f"rc = main([*{['generate', *generate_args]!r}, '--output', {str(video)!r}])\n"
        f"print(json.dumps([rc, [m for m in {COMPILER_STACK!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rc, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert rc == 0 and video.stat().st_size > 0
    return imported
