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
