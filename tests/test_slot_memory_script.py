"""scripts/slot_memory.py's input checks and its refusal off CUDA: one line, a non-zero exit, no traceback.
Its measurement needs a GPU (the CPU allocator keeps no statistics): bench/RESULTS.md holds its runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "scripts" / "slot_memory.py")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "flag"),
    [(("--slots", "0"), "--slots"), (("--slots", "1,x"), "--slots"), (("--chunks", "0"), "--chunks")],
)
def test_bad_input_is_one_line_naming_the_flag(args, flag):
    proc = run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"scripts/slot_memory.py: error: {flag} "), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_without_cuda_it_says_so_and_exits():
    proc = run("--slots", "1,2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "slot_memory: needs a CUDA device (the CPU allocator keeps no statistics)"
