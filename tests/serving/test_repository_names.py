"""serve-repo keeps the model inside --out, and --force replaces only a model it wrote."""

from __future__ import annotations

import json

import pytest
from helpers_triton import CONFIG

from ropesp.cli import main
from ropesp.errors import ConfigError
from ropesp.serving.repository import CONFIG_FILE, read_model_config, write_repository

SERVE_REPO = ["serve-repo", "--preset", "tiny", "--latent-frames", "3"]


@pytest.mark.parametrize("name", ["/abs/victim", "../x", "a/b", ".hidden", "", "..", "a\\b", "sp ace"])
def test_model_name_must_be_plain(tmp_path, capsys, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    out = tmp_path / "repo"
    bad = str(victim) if name == "/abs/victim" else name
    assert main([*SERVE_REPO, "--out", str(out), "--model-name", bad, "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--model-name {bad!r}: a model name is letters" in err and err.count("\n") == 1
    assert (victim / "data.txt").read_text() == "keep"
    assert not out.exists()
    with pytest.raises(ConfigError, match="a model name is letters"):
        write_repository(out, CONFIG, model_name=bad, overwrite=True)


def test_force_replaces_only_a_ropesp_model(tmp_path, capsys):
    out = tmp_path / "repo"
    (out / "other").mkdir(parents=True)
    (out / "other" / "data.txt").write_text("keep")
    assert main([*SERVE_REPO, "--out", str(out), "--model-name", "other", "--force"]) == 2
    assert "is not a ropesp model written by `ropesp serve-repo`" in capsys.readouterr().err
    assert (out / "other" / "data.txt").read_text() == "keep"

    assert main([*SERVE_REPO, "--out", str(out), "--model-name", "m-1.a"]) == 0
    assert f"wrote {out / 'm-1.a'}; serve it with: ropesp serve --repo {out}" in capsys.readouterr().err
    (out / "m-1.a" / "1" / "notes.txt").write_text("mine")  # a file serve-repo did not write
    assert main([*SERVE_REPO, "--out", str(out), "--model-name", "m-1.a", "--force"]) == 2
    assert (out / "m-1.a" / "1" / "notes.txt").read_text() == "mine"
    (out / "m-1.a" / "1" / "notes.txt").unlink()
    assert (
        main([*SERVE_REPO, "--out", str(out), "--model-name", "m-1.a", "--force", "--world-size", "3"]) == 0
    )
    assert read_model_config(out / "m-1.a" / "1").config.parallel.world_size == 3


@pytest.mark.parametrize("path", ["/etc", "../../../../etc", "artifacts/../../x", "elsewhere/x"])
def test_config_artifact_paths_stay_inside_the_model(tmp_path, path):
    model_dir = write_repository(tmp_path / "repo", CONFIG)
    spec_path = model_dir / "1" / CONFIG_FILE
    spec = json.loads(spec_path.read_text())
    spec["config"]["source"]["engines"] = path
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"engines .* is outside artifacts/ of the model"):
        read_model_config(model_dir / "1")


def test_config_artifact_symlinked_out_is_refused(tmp_path):
    model_dir = write_repository(tmp_path / "repo", CONFIG)
    outside = tmp_path / "outside"
    outside.mkdir()
    (model_dir / "1" / "artifacts").mkdir()
    (model_dir / "1" / "artifacts" / "engines").symlink_to(outside, target_is_directory=True)
    spec_path = model_dir / "1" / CONFIG_FILE
    spec = json.loads(spec_path.read_text())
    spec["config"]["source"]["engines"] = "artifacts/engines"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="resolves outside the model directory"):
        read_model_config(model_dir / "1")
