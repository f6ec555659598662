"""Metrics on constructed videos with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vidprune.metrics import flicker, psnr


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
