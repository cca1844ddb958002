"""The primary context made before `import torch` (runtime/cuda_context.py): on the GPU it is the context
torch then runs in; off it, the driver calls and their failures against a compiled stand-in driver."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import pytest
import torch

from ropesp.runtime.cuda_context import PrimaryContext, start_for_local_device

# the four driver entry points PrimaryContext calls, with the CUDA driver's signatures; FAIL_AT names the
# call that returns an error (100: CUDA_ERROR_NO_DEVICE), RETAINED counts the references held
STAND_IN = r"""
static int retained = 0;
int fail_at = 0;
int cuInit(unsigned flags) { return fail_at == 1 ? 100 : (flags == 0 ? 0 : 1); }
int cuDeviceGet(int *device, int ordinal) { if (fail_at == 2) return 101; *device = 40 + ordinal; return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int device) {
  if (fail_at == 3) return 2;
  *ctx = (void *)(long)(0x1000 + device); retained++; return 0;
}
int cuDevicePrimaryCtxRelease(int device) { (void)device; retained--; return 0; }
int retained_count(void) { return retained; }
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in driver")
    d = tmp_path_factory.mktemp("driver")
    (d / "driver.c").write_text(STAND_IN)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libdriver.so"), str(d / "driver.c")], check=True)
    return str(d / "libdriver.so")


def test_makes_and_releases_the_context_of_the_ordinal(stand_in):
    lib = ctypes.CDLL(stand_in)
    ctx = PrimaryContext.start(3, library=stand_in)
    assert ctx is not None and ctx.wait(10)
    assert ctx.error is None and ctx.seconds is not None and ctx.seconds >= 0
    assert ctx.handle.value == 0x1000 + 43  # the device cuDeviceGet returned for ordinal 3
    assert lib.retained_count() == 1
    ctx.release()
    ctx.release()  # a second release gives nothing back twice
    assert lib.retained_count() == 0


@pytest.mark.parametrize(
    ("fail_at", "call"), [(1, "cuInit"), (2, "cuDeviceGet"), (3, "cuDevicePrimaryCtxRetain")]
)
def test_a_failing_driver_call_is_named_and_nothing_is_retained(stand_in, fail_at, call):
    lib = ctypes.CDLL(stand_in)
    ctypes.c_int.in_dll(lib, "fail_at").value = fail_at
    try:
        ctx = PrimaryContext.start(0, library=stand_in)
        assert ctx is not None and not ctx.wait(10)
        assert ctx.error is not None and ctx.error.startswith(f"{call} returned CUDA error")
        ctx.release()
        assert lib.retained_count() == 0
    finally:
        ctypes.c_int.in_dll(lib, "fail_at").value = 0


def test_no_driver_library_means_no_context():
    assert PrimaryContext.start(0, library="libno-such-cuda-driver.so.1") is None


def test_only_a_process_that_runs_on_the_gpu_makes_one(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert start_for_local_device(2) is None  # the parent of spawned ranks
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = start_for_local_device(2)
    if ctx is not None:  # a machine with the CUDA driver: the launcher's rank 1 takes cuda:1
        assert ctx.ordinal == 1
        ctx.wait(30)
        ctx.release()


def test_the_cli_imports_no_torch_before_its_command_runs():
    # the context only overlaps `import torch` if nothing imports torch before cmd_generate starts it
    code = "import sys, ropesp.cli; ropesp.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_runs_in_the_context_made_before_it():
    code = """
import ctypes
from ropesp.runtime.cuda_context import PrimaryContext
ctx = PrimaryContext.start(0)
assert ctx.wait(60), ctx.error
import torch
x = torch.ones(4, device="cuda") * 2
torch.cuda.synchronize()
current = ctypes.c_void_p()
assert ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(current)) == 0
print(current.value == ctx.handle.value, float(x.sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "8.0"]
