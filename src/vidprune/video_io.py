"""Reading videos, and writing them to disk (mp4 through imageio's ffmpeg, gif through Pillow)."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

from .extras import require


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(frames, H, W, 3) floats in [0, 1] or uint8 -> uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def check_folder(folder: str | Path, what: str | None = None) -> Path:
    """The folder as a Path if files can be written in it, existing or to be created, else
    ValueError naming it as `what` (default: the folder's path); checked before long work.
    Writability is tried, not inferred from permission bits, which root, read-only mounts and
    special file systems (/proc) do not follow: a nameless file is created there and dropped."""
    folder = Path(folder)
    what = what or f"folder {str(folder)!r}"
    existing = folder
    while not existing.exists():  # the nearest existing ancestor: mkdir creates the rest
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} is not accepted: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{what} is not accepted: could not write in folder {str(existing)!r} "
                         f"({error.strerror or error}); give a path in a writable folder") from error
    return folder


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """The path as a Path if a video can be written there, else ValueError, or FileExistsError
    for an existing file when not `overwrite` (checked before long work)."""
    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"output {str(path)!r} is not accepted: the file name must end in .mp4 or .gif")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is not accepted: it is a folder; give a file name ending in .mp4 "
                         "or .gif")
    if path.suffix.lower() == ".mp4":
        require("io", f"writing {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} already exists: give --overwrite (overwrite=True) to replace it, "
                              "or another file name")
    check_folder(path.parent, f"output {str(path)!r}")
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16, overwrite: bool = False) -> Path:
    """Write (frames, H, W, 3) frames to .mp4 or .gif, creating the folder; an existing file is
    replaced only if `overwrite`. The video is written to a temporary file beside `path` and
    renamed into place once complete, so a failed write leaves neither a partial file nor a
    damaged old one."""
    path = check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(np.asarray(frames))
    # Named here rather than made by tempfile, which would create it readable by its owner only.
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        try:
            _encode(frames, temporary, fps)
        except (OSError, RuntimeError) as error:  # imageio's ffmpeg appends its command line: keep the first line
            raise OSError(f"could not write {str(path)!r}: the video encoder failed "
                          f"({(str(error).strip().splitlines() or [type(error).__name__])[0]})") from error
        # imageio's ffmpeg writer reports some failures (a path it cannot open) only in ffmpeg's output.
        if not temporary.is_file() or temporary.stat().st_size == 0:
            raise OSError(f"could not write {str(path)!r}: the encoder wrote no file")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _encode(frames: np.ndarray, path: Path, fps: int) -> None:
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    require("io", f"writing {str(path)!r}")
    import imageio.v2 as imageio

    # macro_block_size=1 keeps odd sizes as they are instead of resizing them; ffmpeg itself prints
    # nothing (a failure is write_video's one-line error).
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="quiet") as writer:
        for frame in frames:
            writer.append_data(frame)


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
        frames = [_read_frame(file) for file in files[:max_frames]]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"frames in {str(path)!r} differ in size: every frame must have the same size")
        return np.stack(frames)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"input {str(path)!r} is not accepted: give a {', '.join(VIDEO_SUFFIXES)} file or a folder of frames")
    require("io", f"reading {str(path)!r}")
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


def _read_frame(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:  # Pillow's errors for a file that is not a readable image
        raise ValueError(f"could not read frame {str(path)!r}: {error}") from error
