"""The procedural world, its latent encoding and the prompt grammar."""

from __future__ import annotations

import pytest
import torch

from ropesp.decode.preview import PreviewDecoder
from ropesp.demo.latents import encode_video
from ropesp.demo.prompts import VOCABULARY, DemoTextEncoder, PromptError, describe, parse
from ropesp.demo.world import (
    COLOURS,
    all_specs,
    canonical_scene,
    render,
    render_video,
    scene_latents,
    seeded_scene,
    trajectories,
)


def test_seeded_scenes_are_deterministic_and_seeds_differ():
    spec = parse("two blue discs bouncing")
    a = render(seeded_scene(spec, 3), 9)
    assert torch.equal(a, render(seeded_scene(spec, 3), 9))
    assert not torch.equal(a, render(seeded_scene(spec, 4), 9))


def test_objects_bounce_and_cross_borders_as_their_motion_says():
    moving = trajectories(seeded_scene(parse("a red square moving right"), 0), 40)[0, 0]  # [F, 2]
    assert moving[:9, 0].diff().min() > 1.0  # constant velocity to the right first
    assert moving[:, 0].max() <= 24 - 2.5 + 1e-5 and moving[:, 0].diff().min() < 0  # reflected at the wall
    leaving = trajectories(seeded_scene(parse("a red square leaving to the right"), 0), 12)[0, 0]
    assert leaving[-1, 0] > 24 + 2.5  # flew out
    entering = render(seeded_scene(parse("a green disc entering from the top"), 0), 9)[0]
    assert (entering[0] == entering[0, 0, 0]).all() and not (entering[-1] == entering[-1, 0, 0]).all()


def test_canonical_objects_never_overlap():
    scene = canonical_scene(all_specs())
    centres = trajectories(scene, 9)  # [B, K, F, 2]
    for i in range(3):
        for j in range(i):
            both = scene.active[:, i] & scene.active[:, j]
            gap = (centres[:, i] - centres[:, j]).abs().amax(dim=-1)  # Chebyshev distance [B, F]
            reach = (scene.size[:, i] + scene.size[:, j])[:, None] / 2
            assert ((gap - reach)[both] > 1.5).all()


@pytest.mark.parametrize("prompt", ["a red square moving right", "three white squares entering from the top"])
def test_decode_of_encode_is_the_world_video(prompt):
    scene = seeded_scene(parse(prompt), 7)
    video = render_video(scene, 9)[0]  # [33, 192, 192, 3]
    latents = encode_video(video)
    assert torch.equal(latents, scene_latents(scene, 9))
    assert torch.equal(PreviewDecoder().decode(latents)[0], video)


def test_encode_video_refuses_other_shapes():
    with pytest.raises(ValueError, match="4\\*k \\+ 1"):
        encode_video(torch.zeros(6, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_video(torch.zeros(5, 12, 16, 3, dtype=torch.uint8))


def test_grammar_round_trips_every_scene():
    specs = all_specs()
    assert len(specs) == 3 * len(COLOURS) * 2 * 13  # counts x colours x shapes x motions
    assert all(parse(describe(s)) == s for s in specs)
    assert parse("Two BLUE discs, bouncing!") == parse("two blue discs bouncing")
    assert parse("a green disc entering from the left").direction == "right"
    assert parse("a green disc leaving to the left").direction == "left"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a purple square moving right", "unknown word 'purple'; the demo model knows: a, an, one"),
        ("a red squares moving right", "expected a singular shape"),
        ("two red square bouncing", "expected a plural shape"),
        ("a red square moving", "the motion must read 'moving left | right | up | down'"),
        ("a red square entering from top", "'entering from the left | right | top | bottom'"),
        ("red", "too short"),
    ],
)
def test_bad_prompts_name_the_problem(prompt, message):
    with pytest.raises(PromptError, match=message.replace("|", "\\|")):
        parse(prompt)
    with pytest.raises(PromptError):
        DemoTextEncoder().encode(prompt)


def test_unknown_word_lists_the_whole_vocabulary():
    with pytest.raises(PromptError) as err:
        parse("a red triangle moving right")
    assert all(w in str(err.value) for w in VOCABULARY)


def test_encoder_is_deterministic_and_zero_padded():
    enc = DemoTextEncoder()
    e = enc.encode("a red square moving right")
    assert e.shape == (16, 64) and e.dtype == torch.float32
    assert torch.equal(e, DemoTextEncoder().encode("A red square moving right."))
    assert e[:5].abs().sum(dim=1).min() > 0 and not e[5:].any()
    assert torch.equal(enc.encode("one red square moving right"), e)  # 'one' and 'a' mean the same
    assert not torch.equal(enc.encode("a red square moving left"), e)
