"""The C++ compiler AOTInductor packages are built with, and the check that a package links the shared
libstdc++.

A package's `*.wrapper.so` is dlopen()ed into a process that already holds libtorch and the shared
libstdc++.so.6. Linked against a static libstdc++ instead (a compiler that finds only `libstdc++.a`),
the package carries a second copy of the C++ runtime whose locale facets are never initialised, and
`std::regex` in the package's constructor crashes at load time (seen with the GPU image's `$CXX`
wrapper, bench/RESULTS.md). So the build picks a compiler that links the shared library, and checks
every package it writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from ropesp.errors import BuildError

SHARED_LIBSTDCXX = "libstdc++.so.6"
FALLBACK_COMPILERS = ("g++", "c++", "clang++", "/usr/bin/g++", "/usr/bin/c++")
"""Tried after $CXX, in order: PATH names first, then the distribution's own compilers (a PATH can put
a toolchain wrapper without the shared runtime ahead of them)."""

_TEST_SOURCE = "#include <string>\nstd::string ropesp_probe(int n) { return std::to_string(n); }\n"


def needed_libraries(shared_object: Path) -> list[str]:
    """DT_NEEDED entries of an ELF shared object, read with binutils' readelf (it ships with every
    toolchain that can link one)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        raise BuildError("readelf (binutils) is not on PATH: cannot check how packages are linked")
    out = subprocess.run(
        [readelf, "-d", "-W", str(shared_object)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise BuildError(f"readelf could not read {shared_object}: {out.stderr.strip()}")
    needed = []
    for line in out.stdout.splitlines():
        if "(NEEDED)" in line and "[" in line:
            needed.append(line[line.index("[") + 1 : line.rindex("]")])
    return needed


def links_shared_libstdcxx(cxx: str) -> tuple[bool, str]:
    """(True, "") if `cxx` builds a C++ shared object that NEEDS libstdc++.so.6; else (False, why)."""
    with tempfile.TemporaryDirectory(prefix="ropesp-cxx-") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_TEST_SOURCE)
        try:
            out = subprocess.run(
                [cxx, "-shared", "-fPIC", "-o", str(lib), str(src)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"could not run: {exc}"
        if out.returncode != 0:
            return False, f"could not build a shared library: {out.stderr.strip()[:200]}"
        needed = needed_libraries(lib)
        if SHARED_LIBSTDCXX not in needed:
            return False, f"links the C++ runtime statically (NEEDED: {', '.join(needed) or 'none'})"
    return True, ""


def choose_cxx(environ: dict | None = None) -> str:
    """The C++ compiler for AOTInductor packages: $CXX if it links the shared libstdc++, else the first
    fallback that does. Raises BuildError naming every candidate and why it was refused."""
    env = os.environ if environ is None else environ
    candidates = ([env["CXX"]] if env.get("CXX") else []) + list(FALLBACK_COMPILERS)
    refused, seen = [], set()
    for name in candidates:
        path = shutil.which(name, path=env.get("PATH"))
        if path is None:
            refused.append(f"{name}: not found")
            continue
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        ok, why = links_shared_libstdcxx(path)
        if ok:
            return path
        refused.append(f"{path}: {why}")
    raise BuildError(
        "no C++ compiler here links the shared libstdc++.so.6 that AOTInductor packages need "
        "(a statically linked C++ runtime crashes when the package loads). Tried: " + "; ".join(refused)
    )


def check_package(package: Path) -> None:
    """Raise BuildError unless every shared object in the .pt2 package NEEDS libstdc++.so.6."""
    with zipfile.ZipFile(package) as zf, tempfile.TemporaryDirectory(prefix="ropesp-pt2-") as tmp:
        libs = [n for n in zf.namelist() if n.endswith(".so")]
        if not libs:
            raise BuildError(f"{package} holds no compiled library")
        for name in libs:
            path = Path(zf.extract(name, tmp))
            needed = needed_libraries(path)
            if SHARED_LIBSTDCXX not in needed:
                raise BuildError(
                    f"{package}: {name} does not link {SHARED_LIBSTDCXX} (NEEDED: {', '.join(needed)}); "
                    "it would crash when loaded"
                )
