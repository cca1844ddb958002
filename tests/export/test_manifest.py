"""The runtime refuses engine directories that do not fit the run, each with a clear EngineError."""

from __future__ import annotations

import json
import re

import pytest

from ropesp.cli import main
from ropesp.errors import EngineError
from ropesp.manifest import Manifest


@pytest.fixture
def onnx_copy(builds, tmp_path):
    return builds.copy("onnx", 1, tmp_path / "engines")


def _edit(root, **fields) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(raw))


def test_manifest_round_trip_and_checksums(builds):
    root = builds("onnx", 2)
    manifest = Manifest.load(root)
    assert manifest.weights in manifest.files and len(manifest.files) == 9  # weights + 2 ranks x 4 graphs
    assert all(len(d) == 64 for d in manifest.files.values())
    assert manifest.versions["torch"] and manifest.versions["ropesp"] and manifest.versions["onnx"]
    pre = manifest.segment("pre", 3)
    assert [t.name for t in pre.inputs[:4]] == ["x", "e0", "start_frame", "frame_of_token"]
    assert pre.inputs[2].dtype == "int32" and pre.inputs[2].shape == [1]
    assert pre.weight_scope == "blocks.{layer}." and all(not t.dynamic for t in pre.inputs)
    for rank in range(2):
        manifest.validate(world_size=2, rank=rank, device="cpu")


def test_changed_world_size_refused(onnx_copy, tmp_path, capsys):
    with pytest.raises(EngineError, match="built for world size 1, but this run has 2 ranks"):
        Manifest.load(onnx_copy).validate(world_size=2, rank=0, device="cpu")
    # the CLI refuses before it spawns any rank
    assert (
        main(["generate", "--engines", str(onnx_copy), "--world-size", "2", "--output", str(tmp_path / "v")])
        == 2
    )
    err = capsys.readouterr().err
    assert "built for world size 1" in err and "rank 0" not in err


@pytest.mark.parametrize("artifact", ["rank0/pre.onnx", "weights.safetensors"])
def test_flipped_byte_refused(onnx_copy, artifact):
    path = onnx_copy / artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=rf"{artifact} is corrupted or was modified: digest .* rebuild"):
        Manifest.load(onnx_copy).validate(world_size=1, rank=0, device="cpu")


@pytest.mark.parametrize("offset", [10, -1], ids=["header", "last-weight"])
def test_modified_weights_refused_while_they_load(onnx_copy, tmp_path, capsys, offset):
    """The weights' digest is checked while they load (runtime/engine.py): a flipped byte in the header
    (safetensors cannot parse it) or in a tensor (it loads) ends as the digest error, nothing else."""
    path = onnx_copy / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))
    out = tmp_path / "v.mp4"
    assert main(["generate", "--engines", str(onnx_copy), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weights.safetensors is corrupted or was modified" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_file_refused(onnx_copy, tmp_path, capsys):
    (onnx_copy / "rank0" / "post.onnx").unlink()
    with pytest.raises(EngineError, match=r"rank0/post.onnx is missing \(listed in .*manifest.json\)"):
        Manifest.load(onnx_copy).validate(world_size=1, rank=0, device="cpu")
    assert main(["generate", "--engines", str(onnx_copy), "--output", str(tmp_path / "v.mp4")]) == 2
    assert "post.onnx is missing" in capsys.readouterr().err


def test_missing_manifest_refused(tmp_path):
    with pytest.raises(EngineError, match=r"no manifest\.json in it; build engines with `ropesp build"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize(
    ("fields", "device", "message"),
    [
        ({"backend": "aoti", "versions.torch": "2.0.0"}, "cpu", "built with torch 2.0.0, this is torch"),
        ({"backend": "openvino"}, "cpu", "unknown backend 'openvino'"),
        ({"format": 99}, "cpu", "manifest format 99"),
        ({}, "cuda", "artifacts for cpu, but this run is on cuda"),
        ({"device": "cuda", "gpu_arch": "sm_90"}, "cpu", "artifacts for cuda, but this run is on cpu"),
    ],
)
def test_version_arch_backend_mismatch_refused(builds, tmp_path, fields, device, message):
    root = builds.copy("onnx", 1, tmp_path / "engines")
    _edit(root, **fields)
    with pytest.raises(EngineError, match=re.escape(message)):
        Manifest.load(root).validate(world_size=1, rank=0, device=device)


def test_gpu_arch_mismatch_refused(builds, tmp_path, monkeypatch):
    import ropesp.manifest as mf

    root = builds.copy("onnx", 1, tmp_path / "engines")
    _edit(root, device="cuda", gpu_arch="sm_90")
    here = mf.runtime_environment("cpu", "aoti") | {"gpu_arch": "sm_80"}
    monkeypatch.setattr(mf, "runtime_environment", lambda device, backend: here)
    with pytest.raises(EngineError, match="was built for sm_90, this GPU is sm_80: rebuild on this GPU"):
        Manifest.load(root).validate(world_size=1, rank=0, device="cuda:0")


def test_large_files_use_the_parallel_block_digest(tmp_path, monkeypatch):
    """Files of TREE_MIN_SIZE and more get the block tree hash (SHA-256 over 64 MiB blocks' SHA-256, so
    blocks hash on separate cores); a change in any block changes it; plain digests still verify."""
    import hashlib

    from ropesp import manifest as mf

    monkeypatch.setattr(mf, "TREE_BLOCK", 1000)
    monkeypatch.setattr(mf, "TREE_MIN_SIZE", 4000)
    data = bytes(range(256)) * 20  # 5120 bytes: 6 blocks, the last one short
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    blocks = b"".join(hashlib.sha256(data[i : i + 1000]).digest() for i in range(0, len(data), 1000))
    digest = mf.file_digest(path)
    assert digest == mf.TREE_PREFIX + hashlib.sha256(blocks).hexdigest()
    assert mf.file_digest(path, expected=hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:4500] + b"x" + data[4501:])  # one byte of the fifth block
    assert mf.file_digest(path) != digest
    small = tmp_path / "small.pt2"
    small.write_bytes(data[:100])
    assert mf.file_digest(small) == hashlib.sha256(data[:100]).hexdigest()
