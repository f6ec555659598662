"""Metrics on constructed videos with known answers."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from vidprune import metrics
from vidprune.metrics import (
    ALEXNET_CHECKPOINT,
    fidelity_summary,
    flicker,
    optional_metrics,
    psnr,
    selection_iou,
    ssim,
    static_flicker,
)
from vidprune.selection import adjacent_frame_iou
from vidprune.tokens import TokenGrid

SUMMARY_KEYS = {"psnr", "ssim", "flicker", "reference_flicker", "flicker_ratio", "static_flicker"}


def test_psnr_known_values():
    video = np.full((3, 8, 8, 3), 0.5)
    assert psnr(video, video) == math.inf
    shifted = video + 0.1  # 0.5 -> 0.6 quantised to uint8: 128 vs 153 of 255
    expected = 10 * math.log10(1 / ((153 - 128) / 255) ** 2)
    assert psnr(shifted, video) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        psnr(video, video[:2])


def test_flicker_of_still_and_alternating_videos():
    still = np.full((5, 4, 4, 3), 100, np.uint8)
    assert flicker(still) == 0.0
    alternating = still.copy()
    alternating[1::2] = 151  # every consecutive pair differs by 51 / 255 = 0.2
    assert flicker(alternating) == pytest.approx(0.2)


def test_ssim_of_identical_and_constant_videos_and_wrong_shapes():
    video = np.random.default_rng(0).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-12)
    # Constant frames have no variance, so SSIM reduces to the luminance term (2ab + C1) / (a² + b² + C1).
    a, b, c1 = 100 / 255, 150 / 255, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(np.full((2, 12, 12, 3), 100, np.uint8), np.full((2, 12, 12, 3), 150, np.uint8)) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\(3, 16, 20, 3\) and \(2, 16, 20, 3\)"):
        ssim(video, video[:2])
    with pytest.raises(ValueError, match="too small for SSIM"):
        ssim(video[:, :10], video[:, :10])


def direct_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by its definition: weighted moments of every 11x11 window, one window at a time."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for frame in range(a.shape[0]):
        for channel in range(3):
            for i in range(a.shape[1] - 10):
                for j in range(a.shape[2] - 10):
                    x, y = a[frame, i : i + 11, j : j + 11, channel], b[frame, i : i + 11, j : j + 11, channel]
                    mx, my = (weights * x).sum(), (weights * y).sum()
                    vx, vy = (weights * (x - mx) ** 2).sum(), (weights * (y - my) ** 2).sum()
                    cov = (weights * (x - mx) * (y - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_window_by_window():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (2, 14, 15, 3), dtype=np.uint8)
    noisy = np.clip(reference + rng.normal(0, 40, reference.shape), 0, 255).astype(np.uint8)
    expected = direct_ssim(noisy / 255.0, reference / 255.0)
    assert 0.2 < expected < 0.95  # a case far from both ends
    assert ssim(noisy, reference) == pytest.approx(expected, abs=1e-12)


def static_and_moving_videos() -> tuple[np.ndarray, np.ndarray]:
    """A reference whose left half is still and right half alternates black/white, and a video
    whose left half flickers by 51 / 255 = 0.2 per frame and whose right half is noise."""
    rng = np.random.default_rng(2)
    reference = np.full((6, 12, 12, 3), 100, np.uint8)
    reference[1::2, :, 6:] = 255
    reference[0::2, :, 6:] = 0
    video = rng.integers(0, 256, reference.shape, dtype=np.uint8)
    video[:, :, :6] = 100
    video[1::2, :, :6] = 151
    return video, reference


def test_static_flicker_measures_only_pixels_still_in_the_reference():
    video, reference = static_and_moving_videos()
    assert flicker(video) > 0.25  # the moving half raises plain flicker
    assert static_flicker(video, reference) == pytest.approx(0.2)
    assert static_flicker(reference, reference) == 0.0
    # Pixel (0, 0) swings fully in the video, and one of its channels moves by 3 / 255 in the reference:
    # static at threshold 0.02 (counted: 1 of 72 left-half pixels), not at 0.01 (left out).
    video[:, 0, 0], video[1::2, 0, 0] = 0, 255
    nudged = reference.copy()
    nudged[1, 0, 0, 2] = 103
    assert static_flicker(video, nudged, threshold=0.02) == pytest.approx((71 * 0.2 + 1.0) / 72)
    assert static_flicker(video, nudged, threshold=0.01) == pytest.approx(0.2)
    assert math.isnan(static_flicker(video, reference[:, :, 6:].repeat(2, axis=2)))  # nothing is static
    with pytest.raises(ValueError, match="one shape"):
        static_flicker(video, reference[:3])


def test_selection_iou_of_known_masks():
    steady = np.zeros((4, 6), bool)
    steady[:, [1, 2]] = True
    assert selection_iou(steady) == 1.0
    kept = np.zeros((3, 6), bool)
    kept[0, [0, 1]] = True
    kept[1:, [1, 2]] = True  # {0, 1} -> {1, 2}: IoU 1/3; {1, 2} -> {1, 2}: 1
    assert selection_iou(kept) == pytest.approx(2 / 3)
    assert selection_iou(torch.from_numpy(kept).view(3, 2, 3)) == pytest.approx(2 / 3)
    empty_then_kept = np.zeros((3, 6), bool)
    empty_then_kept[2, 0] = True  # empty -> empty: 1; empty -> {0}: 0
    assert selection_iou(empty_then_kept) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be booleans"):
        selection_iou(kept.astype(np.float32))


def test_selection_iou_agrees_with_the_index_form_used_by_prune_stats():
    grid = TokenGrid(5, 3, 4)
    index = torch.randperm(grid.size, generator=torch.Generator().manual_seed(0))[:25].sort().values.view(1, -1)
    mask = torch.zeros(grid.size, dtype=torch.bool)
    mask[index] = True
    assert selection_iou(mask.view(5, 3, 4)) == pytest.approx(adjacent_frame_iou(index, grid))


@pytest.fixture
def no_learned_weights(monkeypatch):
    """The usual state here: no lpips package and no CLIP folder."""
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    monkeypatch.delenv("VIDPRUNE_CLIP_PATH", raising=False)


def test_fidelity_summary_of_known_videos(no_learned_weights):
    video, reference = static_and_moving_videos()
    with pytest.warns(UserWarning) as warned:
        summary = fidelity_summary(video, reference)
    assert [str(w.message).split(":")[0] for w in warned] == ["lpips", "clip_similarity"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["psnr"] == psnr(video, reference) and summary["ssim"] == ssim(video, reference)
    assert summary["reference_flicker"] == pytest.approx(0.5)  # half the pixels swing by 1
    assert summary["flicker_ratio"] == pytest.approx(flicker(video) / 0.5)
    assert summary["static_flicker"] == pytest.approx(0.2)
    still = np.full((3, 12, 12, 3), 0.5)
    same = fidelity_summary(still, still, learned=False)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["static_flicker"] == 0.0
    assert math.isnan(same["flicker_ratio"])  # the reference never changes: no ratio


def test_optional_metrics_skip_with_reasons_when_weights_are_absent(no_learned_weights, monkeypatch, tmp_path):
    video = np.zeros((2, 12, 12, 3), np.uint8)
    values, skipped = optional_metrics(video, video)
    assert values == {}
    assert skipped[0].startswith("lpips: package 'lpips' not installed (pip install lpips")
    assert skipped[1].startswith("clip_similarity: no local CLIP model (set VIDPRUNE_CLIP_PATH")
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))  # installed, but its AlexNet is not cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("VIDPRUNE_CLIP_PATH", str(tmp_path / "missing"))
    values, skipped = optional_metrics(video, video)
    assert values == {}
    checkpoint = tmp_path / "hub" / "checkpoints" / ALEXNET_CHECKPOINT
    assert skipped == [
        f"lpips: AlexNet weights not found at {checkpoint} (lpips would download them; vidprune does not)",
        f"clip_similarity: CLIP model folder {str(tmp_path / 'missing')!r} does not exist",
    ]


class FakeLpips:
    """Stands in for lpips.LPIPS: the distance is the mean absolute difference of the images."""

    def __init__(self, net: str, verbose: bool):
        assert net == "alex"

    def eval(self) -> FakeLpips:
        return self

    def __call__(self, x: torch.Tensor, y: torch.Tensor, normalize: bool) -> torch.Tensor:
        assert normalize and x.shape[:2] == (1, 3)
        return (x - y).abs().mean().view(1, 1, 1, 1)


class FakeClip(torch.nn.Module):
    """Stands in for CLIPModel: the image embedding is the flattened pixels."""

    def vision_model(self, pixel_values: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(pooler_output=pixel_values.flatten(1))

    def visual_projection(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fake_processor(images: list[np.ndarray], return_tensors: str) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.from_numpy(np.stack(images)).double()}


@pytest.fixture
def fresh_learned_models():
    """The learned models are loaded once per process: let this test's fakes neither see nor
    leave a cached model."""
    metrics._lpips_model.cache_clear()
    metrics._clip_model.cache_clear()
    yield
    metrics._lpips_model.cache_clear()
    metrics._clip_model.cache_clear()


def test_learned_metrics_land_in_the_summary_when_weights_are_present(monkeypatch, tmp_path, fresh_learned_models):
    import transformers

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLpips))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ALEXNET_CHECKPOINT).touch()
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", lambda path, local_files_only: FakeClip())
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", lambda path, local_files_only: fake_processor)
    monkeypatch.setenv("VIDPRUNE_CLIP_PATH", str(tmp_path))
    video, reference = static_and_moving_videos()
    summary = fidelity_summary(video, reference)
    assert set(summary) == SUMMARY_KEYS | {"lpips", "clip_similarity"}
    assert summary["lpips"] == pytest.approx(np.abs(video / 255 - reference / 255).mean(), rel=1e-6)
    flat_video, flat_reference = video.reshape(6, -1).astype(float), reference.reshape(6, -1).astype(float)
    cosines = (flat_video * flat_reference).sum(1) / np.linalg.norm(flat_video, axis=1) / np.linalg.norm(flat_reference, axis=1)
    assert summary["clip_similarity"] == pytest.approx(cosines.mean())
