"""Does the demo model move its shape the way the caption says? A probe of the direction word alone.

For the first few still-camera, single-shape clips of a split, it generates the clip's caption
with the direction word replaced by each of left/right/up/down (same seed, so only the word
changes) and measures the direction the main object moves (measure.py). A model that follows
the word gets the diagonal of the table; one that ignores it gets the same answer in a row.

    python benchmarks/demo_direction_probe.py --split heldout --prompts 4
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from vidprune.demo.data import DIRECTIONS, make_clip
from vidprune.demo.measure import object_direction
from vidprune.demo.pipeline import DEFAULT_CALL, load_demo_pipeline


def probe_captions(split: str, count: int, frames: int, size: int) -> list[str]:
    """Captions of the first `count` clips of `split` (by seed) with a still camera and one shape."""
    captions, seed = [], 0
    while len(captions) < count:
        _, caption, spec = make_clip(seed, frames, size, size, split=split)
        if spec.pan is None and len(spec.shapes) == 1:
            captions.append(caption)
        seed += 1
    return captions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the shipped demo model)")
    parser.add_argument("--split", choices=("train", "heldout"), default="heldout")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL["num_inference_steps"])
    parser.add_argument("--frames", type=int, default=DEFAULT_CALL["num_frames"])
    parser.add_argument("--size", type=int, default=DEFAULT_CALL["height"], help="height and width")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    call = {**DEFAULT_CALL, "num_inference_steps": args.steps, "num_frames": args.frames,
            "height": args.size, "width": args.size}
    torch.manual_seed(0)
    pipe = load_demo_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)

    rows = []
    for caption in probe_captions(args.split, args.prompts, args.frames, args.size):
        moved = {}
        for asked in DIRECTIONS:
            prompt = re.sub(r"moves \w+", f"moves {asked}", caption, count=1)
            video = pipe(prompt=prompt, **call, output_type="np",
                         generator=torch.Generator(args.device).manual_seed(args.seed)).frames[0]
            moved[asked] = object_direction(video)
        rows.append({"caption": caption, "moved": moved})
        print(caption, moved, flush=True)
    right = sum(row["moved"][asked] == asked for row in rows for asked in DIRECTIONS)
    command = "python benchmarks/demo_direction_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "split": args.split, "seed": args.seed,
              "device": args.device, "rows": rows, "right": right, "videos": len(rows) * len(DIRECTIONS)}

    name = f"demo_direction_probe_{args.split}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Direction probe of the demo model ({args.split} captions)", "",
        f"Each caption generated with its direction word replaced by each of the four, seed {args.seed}, "
        f"{args.frames}x{args.size}x{args.size}, {args.steps} steps, CFG {call['guidance_scale']}, {args.device}; cells: "
        f"the direction the main object moved (measure.py). Made by `{result['command']}`.", "",
        "| caption (as generated with its own direction) | " + " | ".join(f"asked {d}" for d in DIRECTIONS) + " |",
        "|---|" + "---|" * len(DIRECTIONS),
    ]
    lines += [f"| {row['caption']} | " + " | ".join(row["moved"][d] for d in DIRECTIONS) + " |" for row in rows]
    lines += ["", f"Moved as asked: {right} of {result['videos']} videos."]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
