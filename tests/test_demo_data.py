"""The demo's procedural clips and the automatic prompt-following measurement."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vidprune.demo.data import (
    BACKGROUND_COLOURS, COMBINATIONS, DIRECTIONS, HELDOUT, ClipSpec, caption, is_heldout, make_clip, render,
    sample_spec,
)
from vidprune.demo.measure import background_stillness, object_colour, object_direction, parse_caption


def still_single(seed: int, frames: int = 17, size: int = 128) -> ClipSpec:
    spec = sample_spec(seed, frames, size, size)
    return dataclasses.replace(spec, pan=None, pan_speed=0.0, shapes=spec.shapes[:1])


def test_same_seed_same_clip_and_different_seeds_differ():
    video, text, spec = make_clip(7)
    again, text_again, spec_again = make_clip(7)
    assert np.array_equal(video, again) and text == text_again and spec == spec_again
    others = [make_clip(seed) for seed in range(8, 12)]
    assert all(not np.array_equal(video, other[0]) for other in others)
    assert len({text, *(other[1] for other in others)}) == 5


def test_measured_colour_and_direction_follow_the_caption():
    colours = directions = 0
    for seed in range(20):
        spec = still_single(seed)
        video, asked = render(spec, 17, 128, 128), parse_caption(caption(spec))
        assert asked["shape"] == spec.shapes[0].kind and asked["camera"] == "still"
        colours += object_colour(video) == asked["colour"]
        directions += object_direction(video) == asked["direction"]
    assert colours >= 19 and directions >= 19


def test_main_shape_is_measured_among_extra_shapes_and_pans():
    clips = [make_clip(seed, frames=33, height=96, width=160) for seed in range(20)]
    assert sum(len(spec.shapes) > 1 for _, _, spec in clips) >= 5
    asked = [parse_caption(text) for _, text, _ in clips]
    assert sum(object_colour(video) == a["colour"] for (video, _, _), a in zip(clips, asked)) >= 18
    assert sum(object_direction(video) == a["direction"] for (video, _, _), a in zip(clips, asked)) >= 18


def test_heldout_combinations_only_in_the_heldout_split():
    assert 0.05 < len(HELDOUT) / len(COMBINATIONS) < 0.15
    for split, expected in (("train", False), ("heldout", True)):
        for seed in range(200):
            spec = sample_spec(seed, 17, 64, 64, split=split)
            asked = parse_caption(caption(spec))
            combo = (asked["colour"], asked["shape"], asked["direction"], asked["background"])
            main = spec.shapes[0]
            assert combo == (main.colour, main.kind, main.direction, spec.background)
            assert is_heldout(*combo) is expected


def test_background_colours_never_clash_with_shape_colours():
    for seed in range(200):
        spec = sample_spec(seed, 17, 64, 64)
        shape_colours = {shape.colour for shape in spec.shapes}
        assert len(shape_colours) == len(spec.shapes)
        assert all(BACKGROUND_COLOURS[colour][1] not in shape_colours for colour in spec.colours)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_camera_pan_moves_the_background(direction):
    still = dataclasses.replace(still_single(0), background="checker", colours=("grey", "navy"), scale=12.0)
    panned = dataclasses.replace(still, pan=direction, pan_speed=1.0)
    assert caption(panned).endswith(f"the camera pans {direction}")
    stillness = background_stillness(render(still, 17, 128, 128))
    assert stillness < 0.001 and background_stillness(render(panned, 17, 128, 128)) > max(0.01, 10 * stillness)
    # Without shapes, a whole-pixel pan is an exact shift: panning right moves the content left.
    video = render(dataclasses.replace(panned, shapes=()), 17, 128, 128).astype(int)
    dy, dx = DIRECTIONS[direction]
    expected = np.roll(video[:-1], (-dy, -dx), axis=(1, 2))
    assert np.abs(video[1:, 1:-1, 1:-1] - expected[:, 1:-1, 1:-1]).max() <= 1


@pytest.mark.parametrize("frames, height, width", [(17, 128, 128), (33, 64, 96), (1, 32, 48)])
def test_output_shape_and_dtype(frames, height, width):
    video, text, spec = make_clip(3, frames, height, width)
    assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
    assert video.max() > 200 and video.min() < 60
    assert parse_caption(text)["colour"] == spec.shapes[0].colour


@pytest.mark.parametrize("kwargs, name", [
    ({"frames": 16}, "frames=16"), ({"frames": 0}, "frames=0"), ({"height": 100}, "height=100"),
    ({"width": 16}, "width=16"), ({"split": "test"}, "split='test'"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_clip(0, **kwargs)


def test_measure_rejects_bad_inputs():
    with pytest.raises(ValueError, match="video"):
        object_colour(np.zeros((17, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="caption="):
        parse_caption("a cat sleeps")
