"""Writing videos to disk (mp4 through imageio's ffmpeg, gif through Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(frames, H, W, 3) floats in [0, 1] or uint8 -> uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def check_output_path(path: str | Path) -> Path:
    """The path as a Path if it names a format we write, else ValueError (checked before long work)."""
    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"output {str(path)!r} is not accepted: the file name must end in .mp4 or .gif")
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write (frames, H, W, 3) frames to .mp4 or .gif; creates the folder."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(np.asarray(frames))
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    try:
        import imageio.v2 as imageio
    except ImportError as error:
        raise ImportError("writing mp4 needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg") from error
    # macro_block_size=1 keeps odd sizes as they are instead of resizing them.
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """(frames, H, W, 3) uint8 RGB from a video file (mp4, avi, mov, mkv, webm, gif) or a folder
    of frame images (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input video {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no frames: expected {', '.join(FRAME_SUFFIXES)} images")
        from PIL import Image

        files = files[:max_frames]
        frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"frames in {str(path)!r} differ in size: every frame must have the same size")
        return np.stack(frames)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"input {str(path)!r} is not accepted: give a {', '.join(VIDEO_SUFFIXES)} file or a folder of frames")
    import imageio.v3 as iio

    try:
        frames = []
        for frame in iio.imiter(path):
            frames.append(np.asarray(frame)[..., :3] if frame.ndim == 3 else np.repeat(frame[..., None], 3, -1))
            if max_frames is not None and len(frames) == max_frames:
                break
    except Exception as error:  # imageio raises many types for broken files
        raise ValueError(f"could not read video {str(path)!r}: {error}") from error
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    return np.stack(frames).astype(np.uint8)
