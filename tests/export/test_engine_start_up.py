"""A `ropesp generate --engines` process on the CPU imports no compiler stack (tests/start_up.py): the
AOTInductor packages call the RopeSP op through a plain CPU kernel (plugins/rope_sp.py), and ONNX Runtime
runs its Python op, so neither loads Dynamo, Inductor or sympy."""

from __future__ import annotations

import pytest
from start_up import compiler_modules_imported


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_engines_import_no_compiler_stack(builds, tmp_path, backend):
    assert compiler_modules_imported(["--engines", str(builds(backend, 1))], tmp_path / "v.mp4") == []
