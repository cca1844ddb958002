"""The eager path of `ropesp generate`, the README's first command, imports no compiler stack
(tests/start_up.py says why); tests/export/test_engine_start_up.py holds the engines' path to the same."""

from __future__ import annotations

from start_up import compiler_modules_imported


def test_generate_on_the_demo_model_imports_no_compiler_stack(tmp_path):
    assert compiler_modules_imported([], tmp_path / "v.mp4") == []
