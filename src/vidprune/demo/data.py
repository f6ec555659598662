"""Procedural training clips for the demo model: moving coloured shapes over textured, dark
backgrounds, an optional slow camera pan, and a caption from a small grammar.

Shape colours are bright and saturated, background colours dark, so the moving object can be
told apart by colour alone (measure.py relies on that). Everything is deterministic from a seed.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPE_COLOURS = {
    "red": (235, 35, 35), "orange": (255, 130, 0), "yellow": (245, 235, 30), "green": (40, 210, 60),
    "cyan": (30, 215, 230), "blue": (40, 90, 245), "purple": (170, 60, 235), "white": (245, 245, 245),
}
# name -> (rgb, the shape colour it would be confused with, if any); all at most 43% brightness.
BACKGROUND_COLOURS = {
    "black": ((40, 40, 44), None), "grey": ((105, 105, 110), "white"), "maroon": ((105, 20, 30), "red"),
    "brown": ((105, 65, 30), "orange"), "olive": ((95, 95, 25), "yellow"), "forest": ((25, 80, 35), "green"),
    "teal": ((15, 85, 90), "cyan"), "navy": ((25, 30, 100), "blue"),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
BACKGROUNDS = {"gradient": "gradient", "checker": "checkered", "noise": "mottled", "stripes": "striped"}
SPLITS = ("train", "heldout")
# Shapes are scaled to the area of a circle of radius `size`.
_AREA_SCALE = {"circle": 1.0, "square": np.sqrt(np.pi) / 2, "triangle": 1.555, "diamond": np.sqrt(np.pi / 2)}


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    size: float  # radius in pixels of the circle of equal area
    start: tuple[float, float]  # (y, x) centre at frame 0, pixels
    direction: str
    speed: float  # pixels per frame


@dataclass(frozen=True)
class ClipSpec:
    background: str  # a key of BACKGROUNDS
    colours: tuple[str, ...]  # one or two BACKGROUND_COLOURS; one colour is paired with a darker shade
    orientation: str  # "horizontal", "vertical" or "diagonal" (gradients and stripes)
    scale: float  # checker cell, stripe period or noise feature size, pixels
    texture_seed: int  # noise texture
    pan: str | None  # camera pan direction (a key of DIRECTIONS) or None for a still camera
    pan_speed: float  # pixels per frame
    shapes: tuple[ShapeSpec, ...]  # the first is the main shape: captioned first, drawn on top


def is_heldout(colour: str, shape: str, direction: str, background: str) -> bool:
    """About 10% of main-shape combinations, fixed by a hash, are kept out of the train split."""
    digest = hashlib.sha256(f"{colour}|{shape}|{direction}|{background}".encode()).digest()
    return digest[0] % 10 == 0


COMBINATIONS = tuple(itertools.product(SHAPE_COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS))
HELDOUT = tuple(combo for combo in COMBINATIONS if is_heldout(*combo))
_TRAIN = tuple(combo for combo in COMBINATIONS if not is_heldout(*combo))


def check_size(frames: int, height: int, width: int) -> None:
    """Wan's VAE takes 4k+1 frames and the patchified latent needs sides divisible by 16."""
    if not isinstance(frames, (int, np.integer)) or frames < 1 or frames % 4 != 1:
        raise ValueError(f"frames={frames!r} is not accepted: frames must be of the form 4k+1 (e.g. 17, 33)")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < 32 or value % 16:
            raise ValueError(f"{name}={value!r} is not accepted: {name} must be a multiple of 16, at least 32")


def _pick(rng: np.random.Generator, options) -> str:
    return str(list(options)[rng.integers(len(options))])


def _sample_shape(rng: np.random.Generator, kind: str, colour: str, direction: str, radius: float,
                  frames: int, height: int, width: int) -> ShapeSpec:
    """Straight-line motion over 50-75% of the frame that keeps the shape in frame. The path is
    about twice the shape's width or more, so most pixels' temporal median is the background."""
    dy, dx = DIRECTIONS[direction]
    along, across = (width, height) if dx else (height, width)
    travel = min(rng.uniform(0.5, 0.75) * along, along - 2 * radius)
    first = rng.uniform(radius, along - radius - travel) + (travel if dx < 0 or dy < 0 else 0.0)
    side = float(rng.uniform(radius, across - radius))
    start = (side, float(first)) if dx else (float(first), side)
    return ShapeSpec(kind, colour, radius, start, direction, travel / max(frames - 1, 1))


def sample_spec(rng: np.random.Generator | int, frames: int, height: int, width: int,
                split: str = "train") -> ClipSpec:
    """A random clip; the main shape's (colour, kind, direction, background) is never a HELDOUT
    combination in the "train" split and always one in the "heldout" split."""
    check_size(frames, height, width)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not accepted: split must be one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(rng)
    pool = HELDOUT if split == "heldout" else _TRAIN
    colour, kind, direction, background = pool[rng.integers(len(pool))]
    size = min(height, width)
    radius = rng.uniform(0.06, 0.11) * size
    shapes = [_sample_shape(rng, kind, colour, direction, radius, frames, height, width)]
    others = rng.permutation([c for c in SHAPE_COLOURS if c != colour])
    for extra in others[: rng.choice(3, p=(0.5, 0.3, 0.2))]:
        radius = rng.uniform(0.035, 0.06) * size
        shapes.append(_sample_shape(rng, _pick(rng, SHAPES), str(extra), _pick(rng, DIRECTIONS), radius,
                                    frames, height, width))
    used = {shape.colour for shape in shapes}
    allowed = [name for name, (_, clash) in BACKGROUND_COLOURS.items() if clash not in used]
    colours = tuple(str(c) for c in rng.choice(allowed, size=rng.integers(1, 3), replace=False))
    pan = _pick(rng, DIRECTIONS) if rng.random() < 0.5 else None
    return ClipSpec(
        background=background, colours=colours, orientation=_pick(rng, ("horizontal", "vertical", "diagonal")),
        scale=float(rng.uniform(0.06, 0.2) * size), texture_seed=int(rng.integers(2**31)), pan=pan,
        pan_speed=float(rng.uniform(0.25, 1.0)) if pan else 0.0, shapes=tuple(shapes),
    )


def _texture(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    """(height, width) pattern in [0, 1] that mixes the two background tones."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    along = {"horizontal": x + 0 * y, "vertical": y + 0 * x, "diagonal": (x + y) / np.sqrt(2)}[spec.orientation]
    if spec.background == "gradient":
        return along / along.max()
    if spec.background == "stripes":
        return ((along / spec.scale) % 1.0 < 0.5).astype(np.float32)
    if spec.background == "checker":
        return ((y // spec.scale + x // spec.scale) % 2).astype(np.float32)
    cells = torch.Generator().manual_seed(spec.texture_seed)
    coarse = torch.rand(1, 1, int(height / spec.scale) + 2, int(width / spec.scale) + 2, generator=cells)
    noise = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0, 0].numpy()
    return (noise - noise.min()) / max(noise.max() - noise.min(), 1e-6)


def _background(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float background; a single colour is paired with a darker shade of it."""
    first = np.array(BACKGROUND_COLOURS[spec.colours[0]][0], dtype=np.float32) / 255
    second = np.array(BACKGROUND_COLOURS[spec.colours[-1]][0], dtype=np.float32) / 255
    if len(spec.colours) == 1:
        second = first * 0.55
    mix = _texture(spec, height, width)[..., None]
    return first + mix * (second - first)


def _pan(big: np.ndarray, direction: str | None, speed: float, frames: int, height: int,
         width: int) -> np.ndarray:
    """(frames, height, width, 3) crops of a larger still background, shifted by speed pixels per
    frame with linear interpolation; a camera panning right sees the content move left."""
    if direction is None:
        return np.broadcast_to(big[:height, :width], (frames, height, width, 3))
    vertical = direction in ("up", "down")
    if vertical:
        big, height, width = big.transpose(1, 0, 2), width, height
    offset = speed * np.arange(frames, dtype=np.float32)
    if direction in ("left", "up"):
        offset = offset[::-1]
    whole = np.floor(offset).astype(np.int64)
    frac = (offset - whole)[:, None, None, None]
    columns = whole[:, None] + np.arange(width)  # (frames, width)
    left = big[:height, columns].transpose(1, 0, 2, 3)  # (frames, height, width, 3)
    right = big[:height, columns + 1].transpose(1, 0, 2, 3)
    video = left + frac * (right - left)
    return video.transpose(0, 2, 1, 3) if vertical else video


def _coverage(shape: ShapeSpec, frames: int, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage in [0, 1] from a signed distance: (rows, columns) of the box the
    shape's path sweeps, and the (frames, rows, columns) coverage inside it (zero outside)."""
    dy, dx = DIRECTIONS[shape.direction]
    t = np.arange(frames, dtype=np.float32)
    cy, cx = shape.start[0] + dy * shape.speed * t, shape.start[1] + dx * shape.speed * t
    r = shape.size * _AREA_SCALE[shape.kind]
    rows = slice(max(0, int(cy.min() - r) - 1), max(0, min(height, int(cy.max() + r) + 2)))
    columns = slice(max(0, int(cx.min() - r) - 1), max(0, min(width, int(cx.max() + r) + 2)))
    py = np.arange(rows.start, rows.stop, dtype=np.float32)[None, :, None] - cy[:, None, None]
    px = np.arange(columns.start, columns.stop, dtype=np.float32)[None, None, :] - cx[:, None, None]
    if shape.kind == "circle":
        inside = r - np.sqrt(px**2 + py**2)
    elif shape.kind == "square":
        inside = r - np.maximum(np.abs(px), np.abs(py))
    elif shape.kind == "diamond":
        inside = (r - np.abs(px) - np.abs(py)) / np.sqrt(2)
    else:  # triangle pointing up, r = circumradius: distance to the nearest of its three edges
        edges = (r / 2 - py, r / 2 + 0.866 * px + 0.5 * py, r / 2 - 0.866 * px + 0.5 * py)
        inside = np.minimum(np.minimum(edges[0], edges[1]), edges[2])
    return (rows, columns), np.clip(inside + 0.5, 0.0, 1.0)


def render(spec: ClipSpec, frames: int, height: int, width: int) -> np.ndarray:
    """The clip as uint8 (frames, height, width, 3) RGB. Render at the size the spec was sampled
    for: shape positions and speeds are in pixels."""
    check_size(frames, height, width)
    pad = int(np.ceil(spec.pan_speed * (frames - 1))) + 1
    big = _background(spec, height + pad, width + pad)
    video = np.array(_pan(big, spec.pan, spec.pan_speed, frames, height, width), dtype=np.float32)
    for shape in reversed(spec.shapes):
        (rows, columns), alpha = _coverage(shape, frames, height, width)
        region = video[:, rows, columns]
        region += alpha[..., None] * (np.array(SHAPE_COLOURS[shape.colour], dtype=np.float32) / 255 - region)
    return (video * 255 + 0.5).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ClipSpec) -> str:
    """E.g. "a red circle moves left over a navy and grey checkered background, and a small
    green square moves up, the camera pans right"."""
    main = spec.shapes[0]
    colours = " and ".join(spec.colours)
    text = (f"{_article(main.colour)} {main.colour} {main.kind} moves {main.direction} over "
            f"{_article(colours)} {colours} {BACKGROUNDS[spec.background]} background")
    for shape in spec.shapes[1:]:
        text += f", and a small {shape.colour} {shape.kind} moves {shape.direction}"
    return text + (f", the camera pans {spec.pan}" if spec.pan else ", the camera is still")


def make_clip(seed: int, frames: int = 17, height: int = 128, width: int = 128,
              split: str = "train") -> tuple[np.ndarray, str, ClipSpec]:
    """(uint8 video (frames, height, width, 3), caption, spec) for one seed."""
    spec = sample_spec(seed, frames, height, width, split=split)
    return render(spec, frames, height, width), caption(spec), spec
