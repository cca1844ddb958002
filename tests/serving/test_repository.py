"""The model repository writer: layout, relocatable artifacts, recorded environment, refusals."""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources

import pytest
import torch
from helpers_triton import CONFIG, require_triton

from ropesp.cli import main
from ropesp.errors import ConfigError, RopespError
from ropesp.model.checkpoint import save_checkpoint
from ropesp.model.wan import CausalWanDiT, init_weights
from ropesp.runtime.pipeline import resolve
from ropesp.serving.repository import CONFIG_FILE, read_model_config, recorded_python, write_repository


def test_repository_layout_and_config(tmp_path):
    model_dir = write_repository(tmp_path / "repo", CONFIG.replace(world_size=2))
    assert model_dir == tmp_path / "repo" / "ropesp"
    pbtxt = (model_dir / "config.pbtxt").read_text()
    for line in (
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        "instance_group [ { kind: KIND_MODEL count: 1 } ]",
        # optional: a stream's prompt comes as embeddings or as text; a cancel carries none
        '{ name: "prompt_embeds" data_type: TYPE_FP32 dims: [ -1, 4096 ] optional: true }',
        '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
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
    assert served.config == CONFIG.replace(world_size=2) and served.instances == 1
    assert served.python.executable == sys.executable
    assert served.python.version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert recorded_python(tmp_path / "repo") == served.python


def test_repository_records_the_wan_vae_options(tmp_path):
    """The decode settings travel in the repository, the VAE copied under artifacts/; the served engine's
    decoder is the settings' (a compiled one would build its graphs at load: GPU-tested apart)."""
    pytest.importorskip("diffusers")
    import helpers_media

    from ropesp.runtime.pipeline import stream_decoder

    vae_dir = helpers_media.save_wan_vae_diffusers(helpers_media.make_tiny_wan_vae(), tmp_path / "vae")
    for compiled in (True, False):
        config = CONFIG.replace(decoder="vae", vae=str(vae_dir), vae_compile=compiled, decode_device="cpu")
        model_dir = write_repository(tmp_path / f"r{compiled}", config)
        served = read_model_config(model_dir / "1")
        decode = served.config.decode
        assert (decode.decoder, decode.vae_compile, decode.decode_device) == ("vae", compiled, "cpu")
        assert decode.vae.startswith(str(model_dir / "1" / "artifacts" / "vae"))
    decoder = stream_decoder(resolve(served.config), device="meta")  # decode_device wins
    assert next(decoder.vae.parameters()).device.type == "cpu" and not decoder.compiled


def test_repository_records_the_tiny_decoder(tmp_path):
    """--taehv travels like --vae: a file copied under artifacts/ and found there by the served engine's
    decoder; 'random' names no file and stays as it is."""
    from ropesp.decode.taehv import TinyWanDecoder, random_taehv
    from ropesp.runtime.pipeline import stream_decoder

    weights = tmp_path / "taew2_1.pth"
    torch.save(random_taehv(seed=0).state_dict(), weights)
    model_dir = write_repository(tmp_path / "file", CONFIG.replace(taehv=str(weights)))
    served = read_model_config(model_dir / "1").config
    assert served.decode.taehv == str(model_dir / "1" / "artifacts" / "taehv" / "taew2_1.pth")
    assert isinstance(stream_decoder(resolve(served), torch.device("cpu")), TinyWanDecoder)
    model_dir = write_repository(tmp_path / "random", CONFIG.replace(taehv="random"))
    assert read_model_config(model_dir / "1").config.decode.taehv == "random"
    assert not (model_dir / "1" / "artifacts").exists()


def test_repository_checkpoint_is_copied_and_relocatable(tmp_path):
    model = CausalWanDiT(resolve(CONFIG).model)
    init_weights(model, 0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", "wan-sharded")
    index = next(ckpt.glob("*.index.json"))
    config = CONFIG.replace(preset=None, checkpoint=str(index))
    write_repository(tmp_path / "a", config)
    spec = json.loads((tmp_path / "a" / "ropesp" / "1" / CONFIG_FILE).read_text())
    assert spec["config"]["source"]["checkpoint"] == f"artifacts/checkpoint/ckpt/{index.name}"
    shutil.move(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(ckpt)  # the repository must not need the original
    served = read_model_config(tmp_path / "b" / "ropesp" / "1")
    rel = spec["config"]["source"]["checkpoint"]
    assert served.config.source.checkpoint == str(tmp_path / "b" / "ropesp" / "1" / rel)
    res = resolve(served.config)  # reads the copied shards' header and config.json
    assert not res.random_weights and res.model == resolve(CONFIG).model


def test_repository_link_symlinks_artifacts(tmp_path):
    model = CausalWanDiT(resolve(CONFIG).model)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", "wan-sharded")
    write_repository(tmp_path / "r", CONFIG.replace(preset=None, checkpoint=str(ckpt)), link=True)
    linked = tmp_path / "r" / "ropesp" / "1" / "artifacts" / "checkpoint" / "ckpt"
    assert linked.is_symlink() and linked.resolve() == ckpt.resolve()


def test_repository_refusals(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"a-file/repo: .*a-file is a file, not a directory"):
        write_repository(tmp_path / "a-file" / "repo", CONFIG)
    write_repository(tmp_path / "r", CONFIG)
    with pytest.raises(ConfigError, match="exists; remove it or pass --force"):
        write_repository(tmp_path / "r", CONFIG)
    write_repository(tmp_path / "r", CONFIG.replace(world_size=3), overwrite=True)
    assert read_model_config(tmp_path / "r" / "ropesp" / "1").config.parallel.world_size == 3
    with pytest.raises(ConfigError, match="does not tile into chunks of --chunk-frames 3"):
        write_repository(tmp_path / "bad", CONFIG.replace(latent_frames=4))
    with pytest.raises(ConfigError, match="--decoder vae needs a Wan VAE"):
        write_repository(tmp_path / "bad", CONFIG.replace(decoder="vae"))
    with pytest.raises(ConfigError, match="--vae-compile acts on the Wan VAE decoder"):
        write_repository(tmp_path / "bad", CONFIG.replace(vae_compile=True))
    with pytest.raises(ConfigError, match="--instances 0 must be an integer >= 1"):
        write_repository(tmp_path / "bad", CONFIG, instances=0)
    with pytest.raises(RopespError, match=r"nope\.pt"):
        write_repository(tmp_path / "bad", CONFIG.replace(preset=None, checkpoint="nope.pt"))
    assert not (tmp_path / "bad").exists()


def test_serve_repo_cli_refuses_before_writing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["serve-repo", "--out", str(out), "--preset", "tiny", "--latent-frames", "4"]) == 2
    assert "does not tile into chunks of --chunk-frames 3" in capsys.readouterr().err
    assert not out.exists()


def test_server_missing_repository_is_named(tmp_path):
    require_triton()
    from ropesp.serving.server import ServerError, TritonServer

    with pytest.raises(ServerError, match=r"^--repo \S+/nope: the model repository does not exist$"):
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
