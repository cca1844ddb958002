"""What generate says before its long work (settings, slow-path warnings, long-work notes), and optional
dependencies refused before any work with the extra named."""

from __future__ import annotations

import os
import time

import pytest

from ropesp.cli import main
from ropesp.errors import ConfigError
from ropesp.extras import EXTRAS, require, require_backend
from ropesp.run_status import COMPILE_NOTE, long_work_lines, settings_line, slow_path_warnings
from ropesp.runtime.pipeline import resolve
from ropesp.settings import RunConfig


def test_settings_line_names_backend_precision_window_world_and_threads():
    line = settings_line(resolve(RunConfig.of(device="cpu")))
    assert line.startswith("ropesp: eager backend · float32 on cpu · world size 1 · global attention over 9")
    assert "CPU thread" in line and "ONNX Runtime" not in line
    res = resolve(RunConfig.of(device="cpu", world_size=2, local_attn_frames=6, sink_frames=1))
    line = settings_line(res)
    assert "world size 2 (Ulysses 2 x ring 1)" in line
    assert "rolling window 6 latent frames (1 sink)" in line
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"{threads} CPU thread{'s' if threads != 1 else ''} per rank" in line


def test_cpu_warnings_for_compile_and_float16():
    res = resolve(RunConfig.of(device="cpu", backend="compile", dtype="float16"))
    warnings = slow_path_warnings(res)
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: --backend compile on the CPU spends minutes compiling")
    assert warnings[1].startswith("warning: --dtype float16 on the CPU is slow")
    assert long_work_lines(res) == [COMPILE_NOTE]
    assert slow_path_warnings(resolve(RunConfig.of(device="cpu"))) == []


def test_generate_prints_the_settings_before_the_first_chunk(tmp_path, capsys):
    argv = ["generate", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--frames", "9"]
    assert main([*argv, "--dtype", "float16", "--output", str(tmp_path / "v.mp4")]) == 0
    err = capsys.readouterr().err
    settings = err.index("ropesp: eager backend · float16 on cpu · world size 1")
    assert (
        settings < err.index("warning: --dtype float16 on the CPU is slow") < err.index("time to first chunk")
    )


def test_missing_extras_are_named_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(EXTRAS, "bench", ("ropesp_no_such_module",))
    with pytest.raises(
        ConfigError, match=r"--plot needs the \[bench\] extra \(missing: ropesp_no_such_module\)"
    ):
        require("bench", "--plot")
    t0 = time.perf_counter()
    assert (
        main(["bench", "--latent-height", "8", "--latent-width", "8", "--plot", str(tmp_path / "p.png")]) == 2
    )
    err = capsys.readouterr().err
    assert "ropesp: error: --plot needs the [bench] extra" in err and "pip install -e '.[bench]'" in err
    assert time.perf_counter() - t0 < 3, "refused before the first configuration ran"
    monkeypatch.setitem(EXTRAS, "onnx", ("onnx", "ropesp_no_such_module"))
    with pytest.raises(ConfigError, match=r"--backend ort needs the \[onnx\] extra"):
        require_backend("ort")
    assert main(["build", "--backend", "onnx", "--out", str(tmp_path / "e")]) == 2
    assert "--backend onnx needs the [onnx] extra" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    require_backend("eager")  # needs nothing
