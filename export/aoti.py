"""AOTInductor package of one segment: torch.export -> torch._inductor.aoti_compile_and_package.

On CUDA `ropesp::rope_sp` is a `torch.library.triton_op`, so Inductor compiles its Triton kernel into the
package (no Python at run time); on the CPU the op is the reference kernel, called through AOTInductor's
proxy executor (the runtime imports ropesp.plugins.rope_sp before loading a package).

CPU builds stay fast for CI: no autotuning, and the C++ wrapper (glue that only calls the kernels) is
compiled at -O0 while the kernels keep Inductor's default optimization. Every package is compiled with
the C++ compiler export/toolchain.py chooses and checked to link the shared libstdc++ before it is kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

CPU_CONFIGS = {"max_autotune": False, "aot_inductor.compile_wrapper_opt_level": "O0"}
CUDA_CONFIGS = {"max_autotune": False}


def compile_segment(
    module, example: tuple, path: Path, *, device: torch.device, cxx: str, autotune: bool = False
) -> Path:
    """Export `module(*example)` (static shapes) and compile it to the .pt2 package at path.

    cxx: the C++ compiler (toolchain.choose_cxx(), chosen once per build).
    autotune: Inductor max-autotune of the GEMMs on CUDA (a slower build, faster engines); ignored on CPU.
    Raises BuildError if the package would not load (a statically linked C++ runtime).
    """
    from ropesp.export.toolchain import check_package

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(module, example, strict=False)
        configs = dict(CUDA_CONFIGS, max_autotune=autotune) if device.type == "cuda" else dict(CPU_CONFIGS)
        configs["cpp.cxx"] = (cxx,)
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    check_package(Path(out))
    return Path(out)
