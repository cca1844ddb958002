"""Nothing half-done on the way out: a full disk, signals, a rank that dies, inputs that pass the type
checks but would poison the output, wrong types, crafted engine files, and the rough edges a newcomer
hits (issue #38's cases, one test each or a case of one)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ropesp
from ropesp.cli import main
from ropesp.errors import ConfigError, EngineError, python_names

TINY = ["--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--device", "cpu"]


def _cli(args: list[str], cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ropesp.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _one_error_line(proc: subprocess.CompletedProcess, code: int, text: str) -> str:
    err = proc.stderr
    assert proc.returncode == code, err
    errors = [line for line in err.splitlines() if line.startswith("ropesp: error")]
    assert len(errors) == 1 and text in errors[0], err
    assert "Traceback" not in err, err
    return errors[0]


# --- 1. a full disk -------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 96 KiB tmpfs with 12 KiB left (root and mount rights: the CPU machines have both)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        (mnt / "filler").write_bytes(b"\0" * (84 << 10))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, tmp_path):
    old = full_disk / "a.mp4"
    old.write_bytes(b"an earlier video")
    before = sorted(p.name for p in full_disk.iterdir())
    cases = [
        (["--output", str(old), "--overwrite"], f"cannot write {old}: No space left on device"),
        (["--output", str(tmp_path / "b.mp4"), "--frames-dir", str(full_disk / "fr")], f"cannot write {full_disk / 'fr'}"),
        (["--output", str(tmp_path / "c.mp4"), "--latents-out", str(full_disk / "l.pt")], f"cannot write {full_disk / 'l.pt'}: no space left"),
    ]  # fmt: skip
    for args, message in cases:
        proc = _cli(["generate", *TINY, "--frames", "81", *args])
        _one_error_line(proc, 1, message)
        assert sorted(p.name for p in full_disk.iterdir()) == before, "nothing partial on the full disk"
        assert old.read_bytes() == b"an earlier video", "an existing output is untouched"
    assert not list(tmp_path.glob("*.mp4*")), "the other outputs of a failed run are removed too"


# --- 2. signals -----------------------------------------------------------------------------------------
def test_sigterm_ends_an_unbounded_stream_with_its_video(tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "ropesp.cli", "generate", *TINY, "--frames", "0", "--local-attn-frames", "6"]
    proc = subprocess.Popen(
        [*cmd, "--sink-frames", "3", "--output", str(out)], stderr=subprocess.PIPE, text=True
    )
    seen = ""
    while not re.search(r"chunks: *[3-9]", seen):  # three chunks streamed: the video has frames
        char = proc.stderr.read(1)
        assert char, seen
        seen += char
    proc.send_signal(signal.SIGTERM)  # as Ctrl-C: stop after this chunk and keep the video so far
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen + rest
    assert "stopping after this chunk" in rest and f"wrote {out}" in rest
    from ropesp.video import read_video_info

    frames, h, w = read_video_info(out)
    assert frames >= 9 + 2 * 12 and (h, w) == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


# --- 3. a rank that dies: the Python caller ---------------------------------------------------------------
USER_BUG = """
import sys, torch, ropesp
pipe = ropesp.Pipeline(preset="tiny", device="cpu", height=64, width=64, world_size=2)
print(pipe.workers[0].pid, flush=True)
for chunk in pipe.stream(torch.randn(4, 4096) * 0.1, frames=21):
    raise ValueError("a bug in the caller's loop")
"""


def test_an_exception_in_a_two_rank_stream_loop_leaves_one_traceback_and_no_rank():
    proc = subprocess.run([sys.executable, "-c", USER_BUG], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback") == 1 and "ValueError: a bug in the caller's loop" in proc.stderr
    assert "gloo" not in proc.stderr and "c10::Error" not in proc.stderr, proc.stderr
    worker = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists(), "rank 1 outlived its leader"


# --- 4. inputs that pass the type checks and would poison the output --------------------------------------
def test_values_that_would_poison_the_video_are_refused_up_front(tmp_path):
    _one_error_line(_cli(["generate", *TINY, "--shift", "nan", "--output", str(tmp_path / "a.mp4")]), 2,
                    "--shift nan must be a finite number")  # fmt: skip
    torch.save(torch.full((4, 4096), 1e30), tmp_path / "huge.pt")
    args = [
        "generate",
        *TINY,
        "--prompt-embeds",
        str(tmp_path / "huge.pt"),
        "--output",
        str(tmp_path / "b.mp4"),
    ]
    _one_error_line(_cli(args), 2, "prompt embeddings reach 1e+30 in magnitude")
    assert not list(tmp_path.glob("*.mp4*"))


def test_latents_that_diverge_are_never_written(tmp_path):
    from ropesp.config import tiny
    from ropesp.model.checkpoint import save_checkpoint
    from ropesp.model.wan import CausalWanDiT, init_weights

    model = CausalWanDiT(tiny())
    init_weights(model, 0)
    with torch.no_grad():
        model.head.head.weight.fill_(3e38)  # the head's output overflows float32
    ckpt = save_checkpoint(model, tmp_path / "bad", "wan-sharded")
    out = tmp_path / "v.mp4"
    proc = _cli(["generate", "--checkpoint", str(ckpt), "--latent-height", "8", "--latent-width", "8",
                 "--device", "cpu", "--output", str(out)])  # fmt: skip
    _one_error_line(proc, 2, "chunk 0's latents hold NaN or Inf values")
    assert not list(tmp_path.glob("v.mp4*"))


def test_one_rule_for_seeds_in_python():
    with ropesp.Pipeline(preset="tiny", device="cpu", height=64, width=64, max_streams=1) as pipe:
        prompt = torch.randn(4, 4096) * 0.1
        pipe.stream(prompt, seed=np.int64(3), frames=9)  # numpy integers are integers
        for seed, message in [(2**64, "seed=18446744073709551616 must be in 0..2^63-1"), (-1, "seed=-1 must be in"),
                              (1.5, "seed=1.5 must be an integer")]:  # fmt: skip
            with pytest.raises(ConfigError, match=message.replace("^", r"\^").replace(".", r"\.")):
                pipe.stream(prompt, seed=seed, frames=9)


# --- 5. wrong types reach no deep code ---------------------------------------------------------------------
def test_wrong_types_get_a_ropesp_error_naming_the_argument():
    with pytest.raises(ConfigError, match=r"^shift='x' must be a number"):
        ropesp.Pipeline(preset="tiny", device="cpu", shift="x")
    with ropesp.Pipeline(preset="tiny", device="cpu", height=64, width=64, max_streams=1) as pipe:
        prompt = torch.randn(4, 4096) * 0.1
        with pytest.raises(ConfigError, match=r"^frames='33' must be an integer"):
            pipe.stream(prompt, frames="33")
        with pytest.raises(ConfigError, match=r"^prompt is on the meta device"):
            pipe.stream(torch.empty(4, 4096, device="meta"))
        with pytest.raises(ConfigError, match=r"^prompt must be text or an embeddings tensor"):
            pipe.stream([1, 2, 3])


# --- 6. crafted engine files with their digests recomputed --------------------------------------------------
def _rehash(directory: Path, rel: str) -> None:
    from ropesp.manifest import MANIFEST, file_digest

    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][rel] = file_digest(directory / rel)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_crafted_engine_files_are_named_at_load(tmp_path):
    from ropesp.runtime.pipeline import build_session, resolve
    from ropesp.settings import RunConfig

    pytest.importorskip("onnxruntime")
    src = tmp_path / "src"
    args = ["build", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--max-frames", "3"]
    assert main([*args, "--backend", "onnx", "--dtype", "float32", "--out", str(src)]) == 0
    config = RunConfig.of(engines=str(src), device="cpu")
    resolve(config)

    import shutil

    swapped = Path(shutil.copytree(src, tmp_path / "swapped"))
    (swapped / "rank0" / "pre.onnx").write_bytes((swapped / "rank0" / "embed.onnx").read_bytes())
    _rehash(swapped, "rank0/pre.onnx")
    with pytest.raises(EngineError, match=r"rank0/pre\.onnx is not the manifest's pre segment"):
        build_session(config.replace(engines=str(swapped)))

    crafted = Path(shutil.copytree(src, tmp_path / "crafted"))
    weights = crafted / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    _rehash(crafted, "weights.safetensors")
    with pytest.raises(
        EngineError,
        match=r"weights\.safetensors is not a valid safetensors file: its header claims 1000000000000 bytes",
    ):
        build_session(config.replace(engines=str(crafted)))

    manifest = json.loads((src / "manifest.json").read_text())
    manifest["dtype"] = "int8"  # nobody passed --dtype: the message says where int8 came from
    (src / "manifest.json").write_text(json.dumps(manifest))
    proc = _cli(["generate", "--engines", str(src), "--output", str(tmp_path / "x.mp4")])
    assert proc.returncode == 2 and "--dtype int8" not in proc.stderr and "Traceback" not in proc.stderr


# --- 7, 8, 11. smaller edges ---------------------------------------------------------------------------
def test_paths_in_python_messages_are_written_as_given(tmp_path):
    with python_names(), pytest.raises(Exception) as err:
        ropesp.Pipeline(engines=tmp_path / "nope")
    assert "PosixPath" not in str(err.value) and str(tmp_path / "nope") in str(err.value)


def test_a_default_output_name_never_replaces_an_earlier_run(tmp_path):
    for expected in ("ropesp-0.mp4", "ropesp-0-1.mp4"):
        proc = _cli(["generate", *TINY, "--frames", "9"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {expected}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ropesp-0-1.mp4", "ropesp-0.mp4"]


def test_version_and_a_video_that_saves_itself(tmp_path):
    assert _cli(["--version"]).stdout.strip() == f"ropesp {ropesp.__version__}"
    with ropesp.Pipeline(preset="tiny", device="cpu", height=64, width=64, max_streams=1) as pipe:
        video = pipe.generate(torch.randn(4, 4096) * 0.1, frames=9)
        stream = pipe.stream(torch.randn(4, 4096) * 0.1, frames=9)
        list(stream)
        assert stream.set_prompt(torch.randn(4, 4096) * 0.1) is False  # ended: nothing queued, and it says so
    from ropesp.video import read_video_info

    assert video.save(tmp_path / "v.mp4") == tmp_path / "v.mp4"
    assert read_video_info(tmp_path / "v.mp4") == (9, 64, 64)
    with pytest.raises(ConfigError, match=r"^output='.*v\.mp4' exists; pass overwrite to replace it"):
        video.save(tmp_path / "v.mp4")
    video.save(tmp_path / "v.mp4", overwrite=True)


def test_a_model_too_large_for_the_cpu_is_warned_about_with_its_time():
    from ropesp.run_status import slow_model_warning
    from ropesp.runtime.pipeline import resolve
    from ropesp.settings import RunConfig

    (line,) = slow_model_warning(resolve(RunConfig.of(preset="wan2.1-1.3b", device="cpu")))
    assert line.startswith("warning: this model on the CPU needs about ") and "first chunk" in line
    assert slow_model_warning(resolve(RunConfig.of(preset="tiny", device="cpu"))) == []


def test_a_prompt_change_after_the_last_chunk_is_refused_by_the_engine():
    from ropesp.runtime.engine_core import EngineCore
    from ropesp.runtime.pipeline import resolve
    from ropesp.settings import RunConfig

    with EngineCore(
        resolve(RunConfig.of(preset="tiny", device="cpu", latent_height=8, latent_width=8))
    ).start() as core:
        stream = core.open(core.request(torch.randn(1, 4, 4096) * 0.1, 0, latent_frames=3))
        list(stream)
        assert stream.set_prompt(torch.randn(1, 4, 4096) * 0.1) is False


def test_engines_error_names_the_engine_dir_without_its_class(tmp_path):
    with pytest.raises(EngineError) as err:
        from ropesp.runtime.pipeline import resolve
        from ropesp.settings import RunConfig

        resolve(RunConfig.of(engines=str(tmp_path)))
    assert "PosixPath" not in str(err.value) and os.fspath(tmp_path) in str(err.value)
