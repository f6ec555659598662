"""Automatic prompt-following measurement on a (frames, height, width, 3) video: which colour
moves, which way, and how still the background is, to compare with what the caption asks for.

It leans on the demo data's palette: moving shapes are bright and saturated (or white), the
backgrounds are dark, so the object is the moving pixels of a shape colour.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from .data import BACKGROUNDS, SHAPE_COLOURS

_NAMES = tuple(SHAPE_COLOURS)
_CAPTION = re.compile(r"^an? (\w+) (\w+) moves (\w+) over an? [\w ]+? (\w+) background")
_CAMERA = re.compile(r"the camera (?:is still|pans (\w+))$")


def to_float(video: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: uint8 videos are scaled, float videos are taken as already in [0, 1]."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"video of shape {video.shape} is not accepted: video must be (frames, height, width, 3)"
        )
    return video.astype(np.float32) / 255 if video.dtype == np.uint8 else video.astype(np.float32)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hue in degrees, saturation, value) of float RGB in [0, 1] along the last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    safe = np.maximum(spread, 1e-6)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    return (hue * 60) % 360, spread / np.maximum(value, 1e-6), value


_PALETTE_HUE = rgb_to_hsv(np.array([SHAPE_COLOURS[n] for n in _NAMES], dtype=np.float32) / 255)[0]
_CHROMATIC = np.array([n != "white" for n in _NAMES])


def colour_classes(rgb: np.ndarray) -> np.ndarray:
    """Index into the shape palette of each pixel, -1 for background-like (dark or grey) pixels.
    White is low saturation and bright; other colours are the nearest hue among bright pixels."""
    hue, saturation, value = rgb_to_hsv(rgb)
    distance = np.abs((hue[..., None] - _PALETTE_HUE + 180) % 360 - 180)
    distance[..., ~_CHROMATIC] = np.inf
    classes = distance.argmin(axis=-1)
    classes = np.where((saturation >= 0.45) & (value >= 0.55), classes, -1)
    return np.where((saturation < 0.2) & (value > 0.75), _NAMES.index("white"), classes)


MOVING_THRESHOLD = 0.1  # in [0, 1] pixel units


def moving_pixels(video: torch.Tensor, threshold: float, time_dim: int, channel_dim: int) -> torch.Tensor:
    """True where a video differs from its temporal median by more than `threshold` in some
    channel (the channel dimension kept, size 1): with a still camera, the median is the
    background. Shared by this measurement and the demo training's shape-weighted losses."""
    median = video.median(dim=time_dim, keepdim=True).values
    return ((video - median).abs() > threshold).any(dim=channel_dim, keepdim=True)


def moving_mask(video: np.ndarray, threshold: float = MOVING_THRESHOLD) -> np.ndarray:
    """(frames, height, width) pixels of a (frames, height, width, 3) video that differ from
    the clip's temporal median by more than threshold in some channel."""
    frames = torch.from_numpy(to_float(video))
    return moving_pixels(frames, threshold, time_dim=0, channel_dim=-1)[..., 0].numpy()


def _moving_classes(video: np.ndarray) -> np.ndarray:
    """(frames, height, width) palette class of each moving pixel, -1 where nothing moves."""
    video = to_float(video)
    mask = moving_mask(video)
    classes = np.full(mask.shape, -1, dtype=np.int64)
    classes[mask] = colour_classes(video[mask])
    return classes


def _main_class(classes: np.ndarray) -> int:
    """The class most moving pixels have, -1 if none. The main shape is the largest and drawn on
    top, so it wins over extra shapes."""
    counts = np.bincount(classes[classes >= 0], minlength=len(_NAMES))
    return int(counts.argmax()) if counts.any() else -1


def object_colour(video: np.ndarray) -> str:
    """The palette colour of the main moving object ("none" if nothing colourful moves)."""
    main = _main_class(_moving_classes(video))
    return _NAMES[main] if main >= 0 else "none"


def object_direction(video: np.ndarray) -> str:
    """left/right/up/down from the centroid of the main object's moving pixels in the first
    third of the frames to that in the last third ("none" if it cannot be seen to move)."""
    classes = _moving_classes(video)
    main = _main_class(classes)
    if main < 0:
        return "none"
    mask = classes == main
    third = max(1, mask.shape[0] // 3)
    early, late = np.argwhere(mask[:third])[:, 1:], np.argwhere(mask[-third:])[:, 1:]
    if len(early) == 0 or len(late) == 0:
        return "none"
    dy, dx = late.mean(axis=0) - early.mean(axis=0)
    if max(abs(dy), abs(dx)) < 1:
        return "none"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def background_stillness(video: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames (in [0, 1] units) outside the moving
    objects (moving shape-coloured pixels, grown by 2 pixels): near 0 for a still camera."""
    objects = torch.from_numpy((_moving_classes(video) >= 0).astype(np.float32))[:, None]
    objects = F.max_pool2d(objects, kernel_size=5, stride=1, padding=2)[:, 0].numpy() > 0
    video = to_float(video)
    background = ~(objects[1:] | objects[:-1])
    difference = np.abs(video[1:] - video[:-1]).mean(axis=-1)
    return float(difference[background].mean()) if background.any() else 0.0


def parse_caption(caption: str) -> dict[str, str]:
    """colour, shape, direction, background (a BACKGROUNDS key) of the main shape and the camera
    ("still" or the pan direction) from a caption of data.caption's grammar."""
    main, camera = _CAPTION.match(caption), _CAMERA.search(caption)
    if main is None or camera is None:
        raise ValueError(f"caption={caption!r} is not accepted: it does not follow the demo caption grammar")
    kinds = {word: kind for kind, word in BACKGROUNDS.items()}
    colour, shape, direction, background = main.groups()
    return {"colour": colour, "shape": shape, "direction": direction,
            "background": kinds.get(background, background), "camera": camera.group(1) or "still"}
