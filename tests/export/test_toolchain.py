"""The C++ compiler of AOTInductor builds: packages must link the shared libstdc++ (a static C++ runtime
crashes when the package loads), a compiler that links it statically is passed over, and a machine
with none refuses the build up front."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from ropesp.errors import BuildError
from ropesp.export.toolchain import (
    SHARED_LIBSTDCXX,
    check_package,
    choose_cxx,
    links_shared_libstdcxx,
    needed_libraries,
)
from ropesp.manifest import Manifest

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(
    GXX is None or shutil.which("readelf") is None, reason="needs g++ and readelf"
)


def _static_cxx(folder: Path, name: str = "g++") -> Path:
    """A compiler like the GPU image's wrapper: g++ that can only link libstdc++ statically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\nexec {GXX} -static-libstdc++ "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_built_aoti_packages_need_the_shared_libstdcxx(builds):
    root = builds("aoti", 1)
    manifest = Manifest.load(root)
    assert "C++ compiler:" in (root / "build.log").read_text()
    for rel in manifest.rank_files(0).files.values():
        check_package(root / rel)  # raises unless every .so in it NEEDS the shared runtime


def test_static_runtime_compiler_is_detected(tmp_path):
    ok, why = links_shared_libstdcxx(str(_static_cxx(tmp_path)))
    assert not ok and "statically" in why
    assert links_shared_libstdcxx(GXX) == (True, "")


def test_broken_cxx_env_falls_back_to_a_good_compiler(tmp_path):
    bad = _static_cxx(tmp_path / "bin")
    env = {"CXX": str(bad), "PATH": os.environ["PATH"]}
    chosen = choose_cxx(env)
    assert os.path.realpath(chosen) != str(bad)
    assert links_shared_libstdcxx(chosen)[0]


def test_no_good_compiler_refuses_with_every_candidate(tmp_path, monkeypatch):
    bad = _static_cxx(tmp_path / "bin")
    monkeypatch.setattr("ropesp.export.toolchain.FALLBACK_COMPILERS", ())
    env = {"CXX": str(bad), "PATH": str(tmp_path / "bin")}
    with pytest.raises(BuildError, match="no C\\+\\+ compiler here links the shared") as err:
        choose_cxx(env)
    assert str(bad) in str(err.value) and "statically" in str(err.value)


def test_package_with_static_runtime_is_refused(tmp_path):
    import zipfile

    lib = tmp_path / "model.wrapper.so"
    src = tmp_path / "m.cpp"
    src.write_text("#include <string>\nstd::string f(int n) { return std::to_string(n); }\n")
    assert os.system(f"{_static_cxx(tmp_path / 'bin')} -shared -fPIC -o {lib} {src}") == 0
    assert SHARED_LIBSTDCXX not in needed_libraries(lib)
    package = tmp_path / "seg.pt2"
    with zipfile.ZipFile(package, "w") as zf:
        zf.write(lib, "seg/data/aotinductor/model/model.wrapper.so")
    with pytest.raises(BuildError, match="would crash when loaded"):
        check_package(package)
