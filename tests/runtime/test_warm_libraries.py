"""warm_device_libraries (runtime/executor.py): the first use of cuBLAS and cuDNN attention that
build_executor runs on another thread while the weights load."""

from __future__ import annotations

import threading

import pytest
import torch

from ropesp.runtime.executor import warm_device_libraries


def test_off_cuda_it_does_nothing():
    warm_device_libraries(torch.device("cpu"), torch.bfloat16, 12, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_another_thread_it_leaves_the_sdpa_settings_alone():
    flags = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    errors = []

    def warm():
        try:
            warm_device_libraries(torch.device("cuda"), torch.bfloat16, 12, 128)
        except Exception as exc:  # the thread's failure is the test's
            errors.append(exc)

    t = threading.Thread(target=warm)
    t.start()
    t.join()
    assert errors == []
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == flags
