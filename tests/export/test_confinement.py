"""Nothing escapes an engine directory, and a hand-edited manifest gets one clear message.

Every file the runtime opens must be listed in manifest.json with its SHA-256 and resolve (symlinks
followed) inside the directory; serve-repo copies exactly those files, as real files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ropesp.cli import main
from ropesp.errors import EngineError, RopespError
from ropesp.manifest import Manifest, sha256
from ropesp.serving.repository import read_model_config, write_repository
from ropesp.settings import RunConfig


@pytest.fixture
def engines(builds, tmp_path):
    return builds.copy("onnx", 1, tmp_path / "engines")


def _edit(root, edit) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _generate(root, tmp_path, capsys) -> str:
    code = main(
        ["generate", "--engines", str(root), "--latent-frames", "3", "--output", str(tmp_path / "v.mp4")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # the status lines before the work, then one error line, last
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("ropesp: error: "), err
    assert sum(line.startswith("ropesp: error:") for line in lines) == 1, err
    return err


EDITS = {
    "latent_height": (lambda m: m["geometry"].update(latent_height=12), "geometry .* is inconsistent"),
    "latent_grid": (
        lambda m: m["geometry"].update(latent_height=12, rows=6, frame_tokens=42),
        r"segments\[0\] takes latents \[1, 3, 16, 10, 14\], but model and geometry give",
    ),
    "num_layers": (lambda m: m["model"].update(num_layers=3), "does not fit the manifest's model"),
    "num_layers_str": (
        lambda m: m["model"].update(num_layers="2"),
        "model.num_layers '2' must be an integer",
    ),
    "text_dim": (
        lambda m: m["model"].update(text_dim=64),
        "does not fit the manifest's model .*text_embedding",
    ),
    "frame_shapes": (lambda m: m.update(frame_shapes=[3, 1]), r"segments lack \[\('embed', 1\)"),
    "frame_shapes_other": (
        lambda m: m.update(frame_shapes=[2], chunk_frames=2),
        "is not a segment of frame_shapes",
    ),
    "backend": (lambda m: m.update(backend="aoti"), r"rank0/embed.onnx is not a \.pt2 file"),
    "backend_type": (lambda m: m.update(backend=3), "backend 3 must be a string"),
    "world_size": (lambda m: m.update(world_size="1"), "world_size '1' must be an integer >= 1"),
    "files_null": (lambda m: m.update(files=None), "files must map relative paths to SHA-256"),
    "ranks_null": (lambda m: m.update(ranks=None), "ranks must list world_size 1 ranks"),
    "segment_missing": (lambda m: m["segments"].pop(), r"segments lack \[\('head', 3\)\]"),
    "unknown_field": (lambda m: m.update(extra=1), r"unknown fields \['extra'\]"),
    "missing_field": (lambda m: m.pop("geometry"), r"missing fields \['geometry'\]"),
    "shape": (lambda m: m["segments"][0]["inputs"][0].update(shape="big"), r"inputs\[0\].shape 'big'"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_manifest_edit_gets_one_clear_message(engines, tmp_path, capsys, name):
    edit, message = EDITS[name]
    _edit(engines, edit)
    err = _generate(engines, tmp_path, capsys)
    assert re.search(message, err), err
    assert "rebuild with `ropesp build`" in err


OUTSIDE = {
    "absolute_rank_file": lambda m, out: m["ranks"][0]["files"].update(pre=str(out)),
    "absolute_listed": lambda m, out: (
        m["files"].update({str(out): sha256(out)}),
        m["ranks"][0]["files"].update(pre=str(out)),
    ),
    "dotdot_listed": lambda m, out: (
        m["files"].update({"../outside.onnx": sha256(out)}),
        m["ranks"][0]["files"].update(pre="../outside.onnx"),
    ),
    "dotdot_hashed": lambda m, out: m["files"].update({"../../../../../../../../etc/hostname": "0" * 64}),
    "weights": lambda m, out: (
        m.update(weights="../w.safetensors"),
        m["files"].update({"../w.safetensors": "0" * 64}),
    ),
    "unlisted": lambda m, out: m["ranks"][0]["files"].update(pre="rank0/pre_copy.onnx"),
}


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_paths_outside_or_unlisted_are_refused(engines, tmp_path, capsys, name):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(engines / "rank0" / "pre.onnx", outside)  # the same graph: only the place is wrong
    shutil.copyfile(engines / "rank0" / "pre.onnx", engines / "rank0" / "pre_copy.onnx")
    _edit(engines, lambda m: OUTSIDE[name](m, outside))
    err = _generate(engines, tmp_path, capsys)
    assert re.search(r"not listed in files|not a relative path inside the engine directory", err), err
    assert not re.search(r"[0-9a-f]{16}\.\.\.", err)  # no digest of any file is printed
    assert "hostname" not in err or name == "dotdot_hashed"


def test_symlink_out_of_the_directory_is_refused(engines, tmp_path, capsys):
    outside = tmp_path / "outside.onnx"
    pre = engines / "rank0" / "pre.onnx"
    shutil.move(pre, outside)
    pre.symlink_to(outside)  # same bytes, same SHA-256: only the place is wrong
    with pytest.raises(EngineError, match=r"rank0/pre\.onnx resolves outside the engine directory"):
        Manifest.load(engines).validate(world_size=1, rank=0, device="cpu")
    err = _generate(engines, tmp_path, capsys)
    assert "resolves outside the engine directory (a symlink); refused" in err
    # serve-repo refuses to copy it, and writes nothing
    with pytest.raises(RopespError, match="resolves outside the engine directory"):
        write_repository(tmp_path / "repo", RunConfig.of(engines=str(engines), latent_frames=3))
    assert not (tmp_path / "repo" / "ropesp").exists()


def test_manifest_symlinked_out_is_refused(engines, tmp_path):
    outside = tmp_path / "manifest.json"
    shutil.move(engines / "manifest.json", outside)
    (engines / "manifest.json").symlink_to(outside)
    with pytest.raises(EngineError, match=r"resolves outside .* refused"):
        Manifest.load(engines)


def test_serve_repo_copies_only_listed_files_as_real_files(engines, tmp_path):
    (engines / "notes.txt").write_text("not an artifact")
    weights = engines / "weights.safetensors"
    shutil.move(weights, engines / "rank0" / "w.bin")
    weights.symlink_to("rank0/w.bin")  # a symlink inside the directory is fine, and copied as a file
    model_dir = write_repository(tmp_path / "repo", RunConfig.of(engines=str(engines), latent_frames=3))
    served = read_model_config(model_dir / "1")
    copied = Path(served.config.source.engines)
    manifest = Manifest.load(copied)
    files = sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file())
    assert files == sorted([*manifest.files, "manifest.json"])  # notes.txt and rank0/w.bin stay behind
    assert not any(p.is_symlink() for p in copied.rglob("*"))
    manifest.validate(world_size=1, rank=None, device="cpu")
