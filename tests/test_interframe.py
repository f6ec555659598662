"""LIP detection on constructed latents whose right answer is known."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vidprune.interframe import (
    LipDetection,
    causal_gaussian3d,
    clean_mask,
    dilate,
    fit_tau,
    keep_mask,
    median_filter3d,
    pair_distance,
    patchify,
    prune_report,
    reference_index,
    token_distance,
)

PATCH = (1, 2, 2)
RAW = LipDetection(median=False, smooth=False, cleanup=False, dilate=False, tau2=None)


def static_video(frames: int = 8, tokens: int = 16, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """A random still image repeated over `frames` latent frames: (1, C, F, 2*tokens, 2*tokens)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, channels, 1, 2 * tokens, 2 * tokens, generator=g)
    return image.repeat(1, 1, frames, 1, 1)


def test_patchify_groups_channels_and_patch_pixels_per_token():
    latents = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).view(1, 2, 2, 4, 6)
    tokens = patchify(latents, PATCH)
    assert tokens.shape == (1, 2, 2, 3, 8)
    # token (f=1, h=1, w=2): latent rows 2..3, columns 4..5 of frame 1, both channels
    expected = latents[0, :, 1, 2:4, 4:6].reshape(-1)
    assert torch.equal(tokens[0, 1, 1, 2], expected)


def test_metrics_on_pairs_with_known_answers():
    a = torch.zeros(10)
    b = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1, 100, 100])
    # trim 0.2 of 10 values drops the two smallest (0, 0) and the two largest (100, 100)
    assert pair_distance(a, b, "trimmed_l1", 0.2).item() == pytest.approx(1.0)
    assert pair_distance(a, b, "trimmed_l1", 0.0).item() == pytest.approx(20.6)
    assert pair_distance(a, -b, "l1").item() == pytest.approx(20.6)
    assert pair_distance(torch.zeros(2), torch.tensor([3.0, 4.0]), "l2").item() == pytest.approx(math.sqrt(12.5))
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert pair_distance(x, y, "cosine").item() == pytest.approx(1.0)
    assert pair_distance(x, -x, "cosine").item() == pytest.approx(2.0)
    assert pair_distance(x, 3 * x, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_token_distance_is_per_patch_and_per_frame_pair():
    latents = static_video(frames=3, tokens=4)
    latents[0, :, 2, 3, 5] += 6.4  # one latent pixel of token (h=1, w=2) in frame 2, all channels
    distance = token_distance(latents, PATCH, metric="l1")
    assert distance.shape == (1, 2, 4, 4)
    expected = torch.zeros(1, 2, 4, 4)
    expected[0, 1, 1, 2] = 6.4 * 16 / 64  # 16 of the token's 64 values changed by 6.4
    torch.testing.assert_close(distance, expected, atol=1e-5, rtol=0)
    # trimmed L1 drops the 12 largest of the 64 values: 4 changed values remain among the 40 kept
    expected[0, 1, 1, 2] = 6.4 * 4 / 40
    torch.testing.assert_close(token_distance(latents, PATCH), expected, atol=1e-5, rtol=0)


def test_median_filter_removes_a_spike_and_keeps_a_constant():
    volume = torch.full((1, 3, 4, 4), 0.5)
    volume[0, 1, 2, 2] = 9.0
    torch.testing.assert_close(median_filter3d(volume), torch.full((1, 3, 4, 4), 0.5))


def test_causal_gaussian_ignores_the_future_and_preserves_a_constant():
    volume = torch.zeros(1, 5, 5, 5)
    volume[0, 3, 2, 2] = 1.0  # a spike in frame 3
    smoothed = causal_gaussian3d(volume)
    assert smoothed[0, :3].abs().max().item() == 0.0  # frames before the spike do not see it
    assert smoothed[0, 3, 2, 2].item() > 0 and smoothed[0, 4, 2, 2].item() > 0
    assert smoothed[0, 4, 2, 2].item() < smoothed[0, 3, 2, 2].item()
    constant = torch.full((2, 4, 3, 3), 0.7)
    torch.testing.assert_close(causal_gaussian3d(constant), constant)


def test_clean_mask_drops_specks_and_fills_holes_and_dilate_grows_a_box():
    speck = torch.zeros(1, 3, 9, 9, dtype=torch.bool)
    speck[0, :, 4, 4] = True
    assert not clean_mask(speck).any()
    holed = torch.zeros(1, 3, 9, 9, dtype=torch.bool)
    holed[0, :, 2:7, 2:7] = True
    holed[0, :, 4, 4] = False
    solid = holed.clone()
    solid[0, :, 4, 4] = True
    cleaned = clean_mask(holed)
    assert torch.equal(cleaned, clean_mask(solid)) and cleaned[0, :, 3:6, 3:6].all()
    one = torch.zeros(1, 5, 9, 9, dtype=torch.bool)
    one[0, 2, 4, 4] = True
    box = torch.zeros_like(one)
    box[0, 1:4, 2:7, 2:7] = True
    assert torch.equal(dilate(one), box)


def moving_square(frames: int = 6, tokens: int = 16, side: int = 3, step: int = 2):
    """A random background with a textured square of `side` tokens moving `step` tokens right per
    frame. Returns the latents and the tokens whose content changed from the previous frame."""
    latents = static_video(frames, tokens)
    g = torch.Generator().manual_seed(1)
    texture = torch.randn(1, latents.shape[1], 2 * side, 2 * side, generator=g) + 2.0
    changed = torch.zeros(1, frames, tokens, tokens, dtype=torch.bool)
    top = 6
    for f in range(frames):
        left = 1 + step * f
        latents[:, :, f, 2 * top : 2 * (top + side), 2 * left : 2 * (left + side)] = texture
        if f > 0:  # the square's old and new tokens both change
            changed[0, f, top : top + side, left - step : left + side] = True
    return latents, changed


def test_moving_square_is_kept_and_the_static_background_pruned():
    latents, changed = moving_square()
    raw = keep_mask(latents, PATCH, RAW)
    assert torch.equal(raw[:, 1:], changed[:, 1:]) and raw[:, 0].all()

    mask = keep_mask(latents, PATCH)
    assert mask[:, 0].all()
    assert (mask[:, 1:] | ~changed[:, 1:]).all()  # every changed token is computed
    # Kept tokens lie within the dilation (1 frame, 2 tokens) plus the 3x3x3 filters' reach
    # (1 frame, 1 token) of a change; everything farther away is pruned.
    reach = dilate(changed[:, 1:], (5, 7, 7))
    assert not (mask[:, 1:] & ~reach).any()
    assert (mask[:, 1:] & ~dilate(changed[:, 1:], (1, 3, 3))).any()  # the dilation did something
    report = prune_report(mask)
    assert 0.5 < report.overall.item() < 0.9


def test_slow_drift_is_rekept_by_the_drift_bound():
    delta, tau2, frames = 0.07, 0.3, 16
    latents = static_video(frames)
    for f in range(frames):
        latents[:, :, f, 8:16, 8:16] += f * delta  # tokens 4..7: each frame moves delta < tau
    # Kept again once the distance to the last computed copy, k * delta, exceeds tau2.
    every = math.floor(tau2 / delta) + 1
    expected = torch.zeros(1, frames, 16, 16, dtype=torch.bool)
    expected[:, 0] = True
    expected[:, every::every, 4:8, 4:8] = True

    assert torch.equal(keep_mask(latents, PATCH, LipDetection(tau2=tau2)), expected)
    no_bound = keep_mask(latents, PATCH, LipDetection(tau2=None))
    assert no_bound[:, 1:].sum().item() == 0


def test_drift_bound_holds_on_the_final_mask():
    g = torch.Generator().manual_seed(3)
    steps = torch.randn(1, 16, 12, 24, 24, generator=g) * torch.rand(1, 1, 1, 24, 24, generator=g) * 0.25
    latents = steps.cumsum(dim=2)
    detection = LipDetection(tau=0.12, tau2=0.3)
    mask = keep_mask(latents, PATCH, detection)
    tokens = patchify(latents, PATCH).flatten(1, 3)
    reference = torch.gather(tokens, 1, reference_index(mask)[..., None].expand_as(tokens))
    distance = pair_distance(tokens, reference).view(mask.shape)
    assert 0.1 < prune_report(mask).overall.item() < 0.9
    assert distance[~mask].max().item() <= 0.3


def graded_video(frames: int = 6, tokens: int = 12) -> torch.Tensor:
    """Every token position changes by its own amount per frame: many distinct distances."""
    g = torch.Generator().manual_seed(2)
    scale = torch.rand(1, 1, 1, 2 * tokens, 2 * tokens, generator=g) * 0.3
    steps = torch.randn(1, 16, frames, 2 * tokens, 2 * tokens, generator=g) * scale
    return steps.cumsum(dim=2)


@pytest.mark.parametrize("target", [0.2, 0.45, 0.7])
def test_target_prune_hits_the_ratio_within_one_token_per_frame(target):
    latents = graded_video()
    per_frame = 12 * 12
    tau, mask = fit_tau(latents, PATCH, replace(RAW, target_prune=target))
    assert abs(prune_report(mask).overall.item() - target) <= 1 / per_frame
    assert mask[:, 0].all()
    # the fitted tau reproduces the mask in the fixed-tau mode
    assert torch.equal(keep_mask(latents, PATCH, replace(RAW, tau=tau.item())), mask)


def test_target_prune_on_the_full_pipeline_and_out_of_reach():
    latents = graded_video()
    mask = keep_mask(latents, PATCH, LipDetection(target_prune=0.4))
    assert abs(prune_report(mask).overall.item() - 0.4) < 0.05
    # at most every frame but the first can be pruned: the closest mask is the most pruned one
    most = keep_mask(latents, PATCH, LipDetection(target_prune=0.99))
    assert most[:, 0].all()
    assert prune_report(most).overall.item() <= 5 / 6


def test_forced_tokens_count_as_motion_from_the_dilation_on():
    """A forced token of a still video is kept, also as an isolated speck the clean-up would drop,
    and the dilation grows it like motion, frame 0's into frame 1; a fitted tau keeps them too."""
    latents = static_video(frames=6, tokens=12)
    forced = torch.zeros(1, 6, 12, 12, dtype=torch.bool)
    forced[0, 3, 6, 6] = forced[0, 0, 1, 1] = True
    expected = dilate(forced)
    expected[:, 0] = True
    assert torch.equal(keep_mask(latents, PATCH, LipDetection(), forced), expected)
    undilated = forced.clone()
    undilated[:, 0] = True
    assert torch.equal(keep_mask(latents, PATCH, replace(RAW, cleanup=True), forced), undilated)
    fitted = keep_mask(graded_video(), PATCH, replace(RAW, target_prune=0.45), forced)
    assert not (forced & ~fitted).any() and abs(prune_report(fitted).overall.item() - 0.45) <= 1 / 144
    with pytest.raises(ValueError, match=r"forced=.*bool tensor \(1, 6, 12, 12\)"):
        keep_mask(latents, PATCH, forced=forced[:, :5])


def test_prune_report_counts_per_frame():
    mask = torch.ones(1, 3, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 0] = False
    mask[0, 2] = False
    report = prune_report(mask)
    torch.testing.assert_close(report.per_frame, torch.tensor([[0.0, 0.25, 1.0]]))
    torch.testing.assert_close(report.overall, torch.tensor([1.25 / 3]))


def test_reference_index_points_to_the_last_kept_occurrence():
    # 4 frames of 1 x 2 tokens: position 0 kept in frames 0 and 2, position 1 only in frame 0
    mask = torch.tensor([[[[True, True]], [[False, False]], [[True, False]], [[False, False]]]])
    assert reference_index(mask).tolist() == [[0, 1, 0, 1, 4, 1, 4, 1]]
    with pytest.raises(ValueError, match="mask"):
        reference_index(torch.zeros(1, 2, 1, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "field, value",
    [
        ("metric", "l3"),
        ("trim", 0.5),
        ("tau", -0.1),
        ("tau2", 0.0),
        ("median", "yes"),
        ("dilate", 1),
        ("sigma", 0),
        ("target_prune", 1.0),
    ],
)
def test_invalid_detection_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        LipDetection(**{field: value})


def test_invalid_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="metric='hamming'.*'trimmed_l1', 'l1', 'l2', 'cosine'"):
        token_distance(static_video(2, 4), PATCH, metric="hamming")
    with pytest.raises(ValueError, match="patch_size"):
        keep_mask(torch.zeros(1, 16, 4, 5, 8), PATCH)
    with pytest.raises(ValueError, match="latents"):
        keep_mask(torch.zeros(16, 4, 8, 8), PATCH)
    with pytest.raises(ValueError, match="latents"):
        keep_mask(torch.zeros(1, 16, 1, 8, 8), PATCH)
    with pytest.raises(ValueError, match="target_prune"):
        fit_tau(static_video(2, 4), PATCH, LipDetection())


REAL_LATENTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wan21_latents" / "test_latents_wan.pth"


@pytest.mark.skipif(not REAL_LATENTS.exists(), reason="the real Wan2.1 latents live in ../shared (present in CI)")
def test_real_wan_latents_are_mostly_static():
    """methods.md: on these real Wan2.1 latents of a low-motion clip, the raw trimmed-L1
    distance to the previous frame is below 0.149 for about 89% of tokens."""
    latents = torch.load(REAL_LATENTS, map_location="cpu").float()
    distance = token_distance(latents, (1, 2, 2))
    assert (distance < 0.149).float().mean().item() == pytest.approx(0.886, abs=0.01)
    assert prune_report(keep_mask(latents, (1, 2, 2))).overall.item() == pytest.approx(0.728, abs=0.01)
