"""What a fresh process imports on the way to its first chunk: not torch's compiler stack.

sympy, Dynamo and Inductor cost seconds of start-up when they are first imported (more where the
installed torch has no bytecode cache), so the eager path of `ropesp generate`, the README's first
command, must not pull them in; the compile backend and CPU AOTInductor packages do so on purpose."""

from __future__ import annotations

import json
import subprocess
import sys

COMPILER_STACK = ("sympy", "torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")


def test_generate_on_the_demo_model_imports_no_compiler_stack(tmp_path):
    code = (
        "import json, sys\n"
        "from ropesp.cli import main\n"
        f"rc = main(['generate', '--output', {str(tmp_path / 'v.mp4')!r}])\n"
        f"print(json.dumps([rc, [m for m in {COMPILER_STACK!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, []]
    assert (tmp_path / "v.mp4").stat().st_size > 0
