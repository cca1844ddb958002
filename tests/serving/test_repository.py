"""The model repository writer: layout, relocatable artifacts, recorded environment, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from importlib import resources

import pytest
from helpers_triton import CONFIG, require_triton

from ropesp.cli import main
from ropesp.errors import ConfigError, RopespError
from ropesp.model.checkpoint import save_checkpoint
from ropesp.model.wan import CausalWanDiT, init_weights
from ropesp.runtime.pipeline import resolve
from ropesp.serving.repository import CONFIG_FILE, read_model_config, recorded_python, write_repository


def test_repository_layout_and_config(tmp_path):
    model_dir = write_repository(tmp_path / "repo", CONFIG, world_size=2)
    assert model_dir == tmp_path / "repo" / "ropesp"
    pbtxt = (model_dir / "config.pbtxt").read_text()
    for line in (
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        "instance_group [ { kind: KIND_MODEL count: 1 } ]",
        '{ name: "prompt_embeds" data_type: TYPE_FP32 dims: [ -1, 4096 ] }',
        # optional: a control request (stream_id + control) carries only the new prompt
        '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }',
        '{ name: "latent_frames" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
        '{ name: "height" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
        '{ name: "stream_id" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        '{ name: "control" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        '{ name: "frames" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] }',
        '{ name: "latents" data_type: TYPE_FP32 dims: [ -1, -1, -1, -1 ] }',
        '{ name: "chunk_index" data_type: TYPE_INT32 dims: [ 1 ] }',
        '{ name: "timing_ms" data_type: TYPE_FP32 dims: [ 1 ] }',
        '{ name: "prompt_version" data_type: TYPE_INT32 dims: [ 1 ] }',
    ):
        assert line in pbtxt
    template = resources.files("ropesp.serving").joinpath("model.py.tmpl").read_text()
    assert (model_dir / "1" / "model.py").read_text() == template
    compile(template, "model.py", "exec")
    served = read_model_config(model_dir / "1")
    assert served.pipeline == dataclasses.replace(CONFIG, world_size=2)
    assert served.decoder == "preview"
    assert served.python.executable == sys.executable
    assert served.python.version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert recorded_python(tmp_path / "repo") == served.python


def test_repository_records_the_wan_vae_options(tmp_path):
    """--vae-compile and --decode-device travel in the repository; the served decoder lands on that device
    (a compiled one would build its graphs there, at load: too slow for the CPU suite, GPU-tested apart)."""
    pytest.importorskip("diffusers")
    import helpers_media

    vae_dir = helpers_media.save_wan_vae_diffusers(helpers_media.make_tiny_wan_vae(), tmp_path / "vae")
    for compiled in (True, False):
        model_dir = write_repository(tmp_path / f"r{compiled}", CONFIG, decoder="vae", vae=str(vae_dir),
                                     vae_compile=compiled, decode_device="cpu")  # fmt: skip
        served = read_model_config(model_dir / "1")
        assert (served.decoder, served.vae_compile, served.decode_device) == ("vae", compiled, "cpu")
    decoder = served.make_decoder(resolve(served.pipeline), device="meta")  # decode_device wins
    assert next(decoder.vae.parameters()).device.type == "cpu" and not decoder.compiled


def test_repository_checkpoint_is_copied_and_relocatable(tmp_path):
    model = CausalWanDiT(resolve(CONFIG).model)
    init_weights(model, 0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", "wan-sharded")
    index = next(ckpt.glob("*.index.json"))
    config = dataclasses.replace(CONFIG, preset=None, checkpoint=str(index))
    write_repository(tmp_path / "a", config)
    spec = json.loads((tmp_path / "a" / "ropesp" / "1" / CONFIG_FILE).read_text())
    assert spec["pipeline"]["checkpoint"] == f"artifacts/checkpoint/ckpt/{index.name}"
    shutil.move(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(ckpt)  # the repository must not need the original
    served = read_model_config(tmp_path / "b" / "ropesp" / "1")
    assert served.pipeline.checkpoint == str(tmp_path / "b" / "ropesp" / "1" / spec["pipeline"]["checkpoint"])
    res = resolve(served.pipeline)  # reads the copied shards' header and config.json
    assert not res.random_weights and res.model == resolve(CONFIG).model


def test_repository_link_symlinks_artifacts(tmp_path):
    model = CausalWanDiT(resolve(CONFIG).model)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", "wan-sharded")
    write_repository(
        tmp_path / "r", dataclasses.replace(CONFIG, preset=None, checkpoint=str(ckpt)), link=True
    )
    linked = tmp_path / "r" / "ropesp" / "1" / "artifacts" / "checkpoint" / "ckpt"
    assert linked.is_symlink() and linked.resolve() == ckpt.resolve()


def test_repository_refusals(tmp_path):
    write_repository(tmp_path / "r", CONFIG)
    with pytest.raises(ConfigError, match="exists; remove it or pass --force"):
        write_repository(tmp_path / "r", CONFIG)
    write_repository(tmp_path / "r", CONFIG, world_size=3, overwrite=True)
    assert read_model_config(tmp_path / "r" / "ropesp" / "1").pipeline.world_size == 3
    with pytest.raises(ConfigError, match="positive does not tile into chunks of --chunk-frames 3"):
        write_repository(tmp_path / "bad", dataclasses.replace(CONFIG, latent_frames=4))
    with pytest.raises(ConfigError, match="needs a Wan VAE path"):
        write_repository(tmp_path / "bad", CONFIG, decoder="vae")
    with pytest.raises(ConfigError, match="the Wan VAE decoder: use --decoder vae"):
        write_repository(tmp_path / "bad", CONFIG, vae_compile=True)
    with pytest.raises(RopespError, match=r"nope\.pt"):
        write_repository(tmp_path / "bad", dataclasses.replace(CONFIG, preset=None, checkpoint="nope.pt"))
    assert not (tmp_path / "bad").exists()


def test_serve_repo_cli_refuses_before_writing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["serve-repo", "--out", str(out), "--preset", "tiny", "--latent-frames", "4"]) == 2
    assert "positive does not tile into chunks of --chunk-frames 3" in capsys.readouterr().err
    assert not out.exists()


def test_server_missing_repository_is_named(tmp_path):
    require_triton()
    from ropesp.serving.server import ServerError, TritonServer

    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "nope").start()


@pytest.mark.slow
def test_server_that_cannot_load_reports_its_log(tmp_path):
    require_triton()
    from ropesp.serving.server import ServerError, TritonServer

    model_dir = write_repository(tmp_path / "repo", CONFIG)
    (model_dir / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    server = TritonServer(tmp_path / "repo")
    with pytest.raises(ServerError, match="broken on purpose"):
        server.start()
    assert server.proc is None
