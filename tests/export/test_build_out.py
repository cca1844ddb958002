"""`ropesp build --out` never deletes what no build wrote, and a failed build leaves nothing behind."""

from __future__ import annotations

import pytest
from engine_builds import GRID

from ropesp.cli import main
from ropesp.export import build as build_mod
from ropesp.manifest import Manifest

BUILD = ["build", "--preset", "tiny", *GRID, "--max-frames", "6", "--backend", "onnx", "--dtype", "float32"]


def _tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_foreign_directory_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.c").write_text("x")
    (out / "NOTES.md").write_text("x")
    (out / "build.log").write_text("x")  # a file name a build writes is not a build
    before = _tree(out)
    for extra in ([], ["--overwrite"]):
        assert main([*BUILD, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is not empty and holds no valid ropesp build" in err
        assert "Traceback" not in err and err.count("\n") == 1
        assert _tree(out) == before


def test_previous_build_needs_overwrite(builds, tmp_path, capsys):
    out = builds.copy("onnx", 1, tmp_path / "engines")
    before = _tree(out)
    assert main([*BUILD, "--out", str(out)]) == 2
    assert "holds a previous ropesp build; pass --overwrite to replace it" in capsys.readouterr().err
    assert _tree(out) == before


def test_overwrite_keeps_files_no_build_wrote(builds, tmp_path, capsys):
    out = builds.copy("onnx", 1, tmp_path / "engines")
    (out / "NOTES.md").write_text("mine")
    (out / "rank0" / "keep.txt").write_text("mine")
    before = _tree(out)
    assert main([*BUILD, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds files that no ropesp build wrote (NOTES.md, rank0/keep.txt)" in err
    assert _tree(out) == before


def test_overwrite_replaces_a_previous_build(builds, tmp_path):
    out = builds.copy("onnx", 1, tmp_path / "engines")
    old = Manifest.load(out)
    assert main([*BUILD, "--out", str(out), "--overwrite", "--world-size", "2"]) == 0
    new = Manifest.load(out)
    assert new.world_size == 2 and old.world_size == 1
    assert set(_tree(out)) == {*new.files, "manifest.json", "build.log"}  # nothing of the old build left
    new.validate(world_size=2, rank=None, device="cpu")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_build_leaves_nothing(tmp_path, monkeypatch, capsys, existing):
    out = tmp_path / "engines"
    if existing:
        out.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the first segment's export

    monkeypatch.setattr(build_mod, "_build_one", interrupted)
    assert main([*BUILD, "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith("ropesp: interrupted\n")
    assert out.is_dir() == existing
    if existing:
        assert not any(out.iterdir())


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "f"
    out.write_text("x")
    assert main([*BUILD, "--out", str(out)]) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "x"


def test_out_under_a_file_is_named(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    out = blocker / "engines"
    assert main([*BUILD, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: {blocker} is a file, not a directory" in err and "Traceback" not in err
    assert blocker.read_text() == "x"
