"""Fidelity and temporal metrics of decoded videos: (frames, H, W, 3) arrays, uint8 or floats
in [0, 1]."""

from __future__ import annotations

import numpy as np

from .video_io import to_uint8


def _unit(video: np.ndarray) -> np.ndarray:
    return to_uint8(np.asarray(video)).astype(np.float64) / 255.0


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole video (inf when identical)."""
    a, b = _unit(video), _unit(reference)
    if a.shape != b.shape:
        raise ValueError(f"videos of shapes {a.shape} and {b.shape} cannot be compared: they must have one shape")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def flicker(video: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, in [0, 1] units (the quantity behind
    VBench's temporal-flickering score: lower is steadier)."""
    frames = _unit(video)
    if frames.shape[0] < 2:
        return 0.0
    return float(np.mean(np.abs(frames[1:] - frames[:-1])))
