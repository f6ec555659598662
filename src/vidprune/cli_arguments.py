"""The `vidprune` command's argument checks: argparse `type=` functions and checks of argument
combinations, all before any model loads; and the demo model's trained size."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .config import TapeConfig
from .demo.pipeline import HEIGHT, NUM_FRAMES, WIDTH
from .budget import plan_keeps



# -- argument checks: argparse `type=` functions, so every value is refused while parsing, before
# any model loads; argparse names the flag in front of the message.

T = TypeVar("T")


def _checked(convert: Callable[[str], T], accepted: str, ok: Callable[[T], bool]) -> Callable[[str], T]:
    """A `type=` that converts the text and refuses values that are not `ok`, saying what is accepted."""

    def check(text: str) -> T:
        try:
            value = convert(text)
            good = ok(value)
        except ValueError:  # not a number at all
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"{text} is not accepted: give {accepted}")
        return value

    return check


POSITIVE = _checked(int, "an integer >= 1", lambda v: v >= 1)
# The VAEs compress time 4x (Wan, CogVideoX, HunyuanVideo) or 8x (LTX: 8k+1 frames, which are
# 4k+1 too) after the first frame.
FRAMES = _checked(int, "a frame count of the form 4k+1 (1, 5, 9, 13, 17, ...), as the models take",
                  lambda v: v >= 1 and v % 4 == 1)
MAX_FRAMES = _checked(int, "an integer >= 5 (editing needs two latent frames)", lambda v: v >= 5)
# 8x VAE downsampling and 2x2 transformer patches: a side must be a multiple of 16 pixels.
SIZE = _checked(int, "a positive multiple of 16 (16, 32, ..., 128, ...)", lambda v: v >= 16 and v % 16 == 0)
FRACTION = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
OPEN_FRACTION = _checked(float, "a number in (0, 1)", lambda v: 0 < v < 1)
NON_NEGATIVE = _checked(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
SEED = _checked(int, "an integer in [0, 2**64 - 1]", lambda v: 0 <= v < 2**64)  # torch.Generator's range


def _devices() -> list[str]:
    """The devices this machine has, as --device names them."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def device_name(text: str) -> str:
    """A `type=` for --device: cpu, cuda, cuda:N or mps, if this machine has it."""
    if text in _devices():
        return text
    reason = "no CUDA GPU is available" if text.startswith("cuda") and not torch.cuda.is_available() else (
        f"{text} is not a device of this machine")
    raise argparse.ArgumentTypeError(f"{reason}; accepted here: {', '.join(_devices())}")


def model_name(text: str) -> str:
    """A `type=` for --model: a hub id, or a local folder whose model_index.json names a pipeline class."""
    if not Path(text).exists():
        return text  # a hub id: diffusers looks it up when loading
    index = Path(text) / "model_index.json"
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text} is not a diffusers pipeline folder: could not read {index} "
                                         f"({error})") from error
    if not isinstance(entries, dict) or "_class_name" not in entries:
        raise argparse.ArgumentTypeError(f"{text} is not a diffusers pipeline folder: {index} names no pipeline "
                                         "class (_class_name)")
    return text


def check_edit_steps(steps: int, strength: float) -> None:
    """Editing runs the last int(steps * strength) of the steps: refuse a product below one,
    which diffusers would only fail on after encoding the video."""
    if int(steps * strength) < 1:
        raise ValueError(f"--strength {strength} with {steps} steps runs no denoising step: give --strength >= "
                         f"{1 / steps:.3g} or more --steps")


def check_budget(config: TapeConfig | None, steps: int) -> list[float] | None:
    """The keep of every step, or a refusal before loading of a budget the call's steps cannot
    meet (the budget's own message says what to change)."""
    return None if config is None else plan_keeps(config, [1 - i / steps for i in range(steps)])


# -- the demo model's size ---------------------------------------------------------------------


def warn_untrained_size(frames: int, height: int, width: int) -> None:
    """Warn when the shipped demo model is asked for a size it was not trained at: it runs, but
    the video may be poor, and a large size is slow on a CPU."""
    if (frames, height, width) != (NUM_FRAMES, HEIGHT, WIDTH):
        print(f"vidprune: warning: the demo model was trained on {NUM_FRAMES} frames at {WIDTH}x{HEIGHT}, not "
              f"{frames} frames at {width}x{height}: expect a poorer video", file=sys.stderr)


def demo_edit_size(args: argparse.Namespace) -> None:
    """Fill unset --height, --width and --max-frames with the demo model's trained size, which
    keeps an edit of real footage short (832x480 and 81 frames ran no step in 15 minutes on a CPU)."""
    trained = dict(height=HEIGHT, width=WIDTH, max_frames=NUM_FRAMES)
    unset = {name: value for name, value in trained.items() if getattr(args, name) is None}
    for name, value in unset.items():
        setattr(args, name, value)
    if unset:
        print("demo model: " + " ".join(f"--{name.replace('_', '-')} {value}" for name, value in unset.items())
              + " by default, the size it was trained at (the frames are resized to it)")


