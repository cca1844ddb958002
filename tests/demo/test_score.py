"""The quality metric: the world's own videos score ~1, noise and wrong content ~0."""

from __future__ import annotations

import json

import pytest
import torch

from ropesp.demo.evaluate import eval_pairs
from ropesp.demo.latents import encode_video
from ropesp.demo.prompts import parse
from ropesp.demo.score import score_latents
from ropesp.demo.world import render_video, scene_latents, seeded_scene


def test_world_videos_score_high_on_the_eval_pairs():
    scores = []
    for prompt, seed in eval_pairs():
        spec = parse(prompt)
        video = render_video(seeded_scene(spec, seed), 9)[0]
        scores.append(score_latents(encode_video(video), spec).score)
    assert sum(scores) / len(scores) >= 0.95
    assert min(scores) >= 0.75


def test_noise_scores_zero():
    g = torch.Generator().manual_seed(0)
    scores = [
        score_latents(torch.randn(1, 9, 16, 24, 24, generator=g), parse(p)).score for p, _ in eval_pairs(8)
    ]
    assert max(scores) == 0.0


def test_wrong_colour_count_shape_or_direction_is_penalised():
    latents = scene_latents(seeded_scene(parse("two red squares moving right"), 0), 9)
    assert score_latents(latents, parse("two red squares moving right")).score == 1.0
    for wrong in (
        "two blue squares moving right",
        "three red squares moving right",
        "two red discs moving right",
        "two red squares moving left",
    ):
        assert score_latents(latents, parse(wrong)).score == 0.0, wrong


def test_flicker_between_chunks_is_penalised():
    spec = parse("a white disc moving down")
    latents = scene_latents(seeded_scene(spec, 0), 9)
    for change in (0.55, 0.8):  # the middle chunk (latent frames 3-5) darker as a whole
        flicker = latents.clone()
        flicker[:, 3:6] *= change
        s = score_latents(flicker, spec)
        assert s.steadiness <= 0.75 and s.score <= 0.75, (change, s)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--local-attn-frames", "-3"], "--local-attn-frames -3 must be -1 (global) or >= 1"),
        (["--dtype", "float7"], "--dtype float7: choose one of"),
        (
            ["--json", "{tmp}/a-file/scores.json"],
            "--json {tmp}/a-file/scores.json: {tmp}/a-file is a file, not a directory",
        ),
        (["--json", "{tmp}"], "--json {tmp}: is a directory"),
    ],
)
def test_evaluate_names_a_bad_flag_before_any_pair_runs(tmp_path, capsys, args, message):
    from ropesp.demo.evaluate import main

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    from ropesp.output_paths import write_report

    path = tmp_path / "scores.json"
    write_report(str(path), {"mean": 0.5})
    assert json.loads(path.read_text()) == {"mean": 0.5}
    with pytest.raises(TypeError):
        write_report(str(path), {"mean": object()})  # fails half way through the JSON
    assert json.loads(path.read_text()) == {"mean": 0.5}  # the report before, whole
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


@pytest.mark.parametrize("pairs", ["0", "-3"])
def test_evaluate_refuses_no_pairs_by_flag(capsys, pairs):
    from ropesp.demo.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--pairs", pairs])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--pairs {pairs}: at least 1" in err
