"""A PNG strip for the README: for a few held-out prompts, frames 0, 8 and 16 of the demo
model's unpruned video, TAPE as `make demo` runs it (the demo model's calibrated profile nearest
keep 0.5), the cycle rule at keep 0.5 (the default for other models), token steps at keep 0.5
(budget="even") with kept-only and with full context, and the paper preset at 0.5.

    python benchmarks/demo_strip.py --out benchmarks/results/demo_strip.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vidprune
from vidprune.demo.data import make_clip
from vidprune.demo.pipeline import DEFAULT_CALL, demo_profile, load_demo_pipeline
from vidprune.video_io import to_uint8

CONFIGS = {
    "unpruned": None,
    "TAPE, the demo's profile (cost 0.5)": vidprune.TapeConfig(budget=demo_profile(0.5, DEFAULT_CALL["num_inference_steps"])),
    "TAPE cycle, keep 0.5": vidprune.TapeConfig(keep=0.5),
    "TAPE token steps, keep 0.5": vidprune.TapeConfig(keep=0.5, budget="even"),
    "TAPE token steps, keep 0.5, full context": vidprune.TapeConfig(keep=0.5, budget="even", context="full"),
    "TAPE paper preset, keep 0.5": vidprune.TapeConfig.paper(0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_strip.png"))
    args = parser.parse_args()
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i in range(args.prompts):
        prompt = make_clip(1000 + i, split="heldout")[1]
        tiles = []
        for name, config in CONFIGS.items():
            vidprune.remove(pipe)
            if config is not None:
                vidprune.apply(pipe, config)
            video = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **DEFAULT_CALL).frames[0]
            tiles.append(np.concatenate([to_uint8(video[f]) for f in (0, 8, 16)], axis=1))  # frames side by side
            print(prompt, "|", name, flush=True)
        rows.append(np.concatenate(tiles, axis=1))
    vidprune.remove(pipe)
    strip = np.concatenate(rows, axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(args.out)
    print(f"wrote {args.out}: rows = prompts, column groups = {', '.join(CONFIGS)} (frames 0, 8, 16 each)")


if __name__ == "__main__":
    main()
