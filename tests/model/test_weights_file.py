"""read_safetensors (ropesp/model/weights_file.py): every tensor of a real safetensors file, bit-exact
against safetensors' own loader, whatever the block size and thread count; short files refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ropesp.model.weights_file import read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.w": torch.randn(33, 7, generator=g).bfloat16(),  # odd sizes: blocks end mid-tensor
        "blocks.0.b": torch.randn(5, generator=g),
        "pos": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "half": torch.randn(2, 3, 4, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


@pytest.mark.parametrize(("threads", "block_bytes"), [(1, 1 << 20), (3, 64), (4, 7)])
def test_every_tensor_equals_safetensors_own_load(tmp_path, threads, block_bytes):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    got = read_safetensors(path, "cpu", threads=threads, block_bytes=block_bytes)
    want = load_file(path)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_a_misaligned_tensor_is_copied_to_an_aligned_one(tmp_path):
    """A writer that does not order tensors by alignment: an fp32 tensor at an odd offset still reads."""
    import json
    import struct

    data = (
        torch.tensor([1], dtype=torch.uint8).numpy().tobytes() + torch.tensor([1.5, -2.0]).numpy().tobytes()
    )
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    got = read_safetensors(path, "cpu")
    assert got["b"].tolist() == [1.5, -2.0] and got["a"].tolist() == [1]


def test_a_file_shorter_than_its_header_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="the file ends 5 bytes before its header says"):
        read_safetensors(path, "cpu", block_bytes=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reads_equal_the_cpu_reads(tmp_path):
    """The staged path (pinned blocks, a stream per thread); blocks small enough that every thread
    reuses both of its staging blocks."""
    path = tmp_path / "w.safetensors"
    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(40)} | _tensors()
    save_file(tensors, path)
    got = read_safetensors(path, "cuda", block_bytes=4096)
    for name, t in load_file(path).items():
        assert got[name].is_cuda and torch.equal(
            got[name].cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), name
