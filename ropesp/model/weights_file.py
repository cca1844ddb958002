"""Read a safetensors file's tensors into one buffer on the device, in parallel.

    read_safetensors(path, device) -> {name: tensor}   views of one [data bytes] uint8 buffer

safetensors' own `load_file(device="cuda")` copies tensor by tensor from its memory map: ~4 GB/s for
the engines' 2.8 GB of Wan-1.3B weights on an H200 host (0.7 s of a 3.9 s cold start,
bench/RESULTS.md). Here the file's data section is read with `os.preadv` (no GIL held) by a few
threads, each through two pinned staging blocks and a CUDA stream of its own, so reading the page
cache, the host-to-device copies and the other threads overlap; on the CPU the threads read straight
into the buffer (an eager read: safetensors' memory map, which reads nothing until it is used, starts
faster there, so the engines use it on the CPU). The tensors are views of that buffer (one allocation), each at its offset in the file
(safetensors writers order tensors by alignment, so every view is aligned; one that is not is copied).
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors' dtype names."""
THREADS = 4
BLOCK_BYTES = 32 << 20
"""Per read and copy: large enough that a copy runs near the link's rate, small enough that four
threads x two pinned blocks stay at 256 MiB."""


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section in bytes, {name: {dtype, shape, data_offsets}}), metadata dropped.
    ValueError saying what is wrong for a file that is not safetensors (its header length beyond the file,
    a header that is not a JSON table, tensors whose data lie beyond the file)."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"it is {file_size} bytes, shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > file_size - 8:
            raise ValueError(f"its header claims {size} bytes in a file of {file_size}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a table of tensors")
    header.pop("__metadata__", None)
    end = max((e.get("data_offsets", [0, 0])[1] for e in header.values() if isinstance(e, dict)), default=0)
    if any(not isinstance(e, dict) or "data_offsets" not in e for e in header.values()):
        raise ValueError("its header lists an entry without data_offsets")
    if 8 + size + end > file_size:
        raise ValueError(
            f"the file ends {8 + size + end - file_size} bytes before its header says (its tensors' data run "
            f"to byte {8 + size + end} of a file of {file_size})"
        )
    return 8 + size, header


def read_safetensors(
    path: str | Path, device: torch.device | str, *, threads: int = THREADS, block_bytes: int = BLOCK_BYTES
) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at path, on device, as views of one buffer."""
    device = torch.device(device)
    start, header = read_header(Path(path))
    total = max((e["data_offsets"][1] for e in header.values()), default=0)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    blocks = [(off, min(block_bytes, total - off)) for off in range(0, total, block_bytes)]
    reader = _cuda_reader if device.type == "cuda" else _host_reader
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = [blocks[i::threads] for i in range(threads) if blocks[i::threads]]
            for done in [pool.submit(reader, fd, start, buf, part, block_bytes) for part in parts]:
                done.result()  # a reader's error (a short file) reaches the caller
    finally:
        os.close(fd)
    return {name: _view(buf, e) for name, e in header.items()}


def _read_into(fd: int, into: memoryview, offset: int) -> None:
    """Fill `into` from the file at offset (preadv may return short counts)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise OSError(f"the file ends {len(into) - done} bytes before its header says")
        done += n


def _host_reader(fd: int, start: int, buf: torch.Tensor, blocks, block_bytes: int) -> None:
    view = memoryview(buf.numpy())
    for off, n in blocks:
        _read_into(fd, view[off : off + n], start + off)


def _cuda_reader(fd: int, start: int, buf: torch.Tensor, blocks, block_bytes: int) -> None:
    stream = torch.cuda.Stream(buf.device)
    staging = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]  # the event after each staging block's last copy
    for i, (off, n) in enumerate(blocks):
        slot = i % 2
        if done[slot] is not None:
            done[slot].synchronize()  # its previous copy has left the block
        _read_into(fd, memoryview(staging[slot].numpy())[:n], start + off)
        with torch.cuda.stream(stream):
            buf[off : off + n].copy_(staging[slot][:n], non_blocking=True)
            done[slot] = torch.cuda.Event()
            done[slot].record(stream)
    stream.synchronize()


def _view(buf: torch.Tensor, entry: dict) -> torch.Tensor:
    dtype = DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    raw = buf[begin:end]
    if begin % dtype.itemsize:
        raw = raw.clone()  # a fresh allocation is aligned for every dtype
    return raw.view(dtype).view(entry["shape"])
