"""The `vidprune` command."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch

from .config import TapeConfig
from .patch import apply, stats
from .video_io import check_output_path, write_video

METHODS = ("none", "tape", "naive", "random")


def tape_config(method: str, keep: float) -> TapeConfig | None:
    """The configuration behind a --method name (None: unpruned)."""
    if method == "none":
        return None
    if method == "tape":
        return TapeConfig(keep=keep)
    if method == "naive":
        return TapeConfig.naive(keep)
    return TapeConfig.random(keep)


def load_pipeline(model: str | None, device: str, dtype: torch.dtype):
    """A supported diffusers pipeline from a local folder or hub id, or the demo pipeline."""
    if model is None:
        from .demo.random_pipeline import build_random_wan_pipeline

        print("model: the random-weight demo Wan pipeline built in code (no trained weights are shipped yet, "
              "so the video is noise-like; speed and pruning are real)")
        pipe = build_random_wan_pipeline("t2v", size="small")
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            raise SystemExit(f"vidprune: could not load a diffusers pipeline from {model!r}: {error}") from error
        print(f"model: {model} ({type(pipe).__name__})")
    return pipe.to(device=device, dtype=dtype)


def generate(args: argparse.Namespace) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = tape_config(args.method, args.keep)  # validate the arguments before the model loads
    check_output_path(args.output)
    pipe = load_pipeline(args.model, device, dtype)
    if config is not None:
        apply(pipe, config)
    print(f"method: {args.method}" + (f" (mean keep {args.keep})" if config is not None else ""))
    started = time.perf_counter()
    frames = pipe(
        prompt=args.prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device).manual_seed(args.seed),
        output_type="np",
    ).frames[0]
    elapsed = time.perf_counter() - started
    path = write_video(frames, args.output, fps=args.fps)
    if config is not None:
        print(stats(pipe))
    print(f"generated {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} in {elapsed:.2f} s "
          f"on {device} -> {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidprune", description="Faster diffusers video transformers by token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text-to-video with token pruning")
    gen.add_argument("prompt")
    gen.add_argument("--method", choices=METHODS, default="tape",
                     help="tape (default), naive per-frame pruning, random pruning, or none")
    gen.add_argument("--keep", type=float, default=0.5, help="mean fraction of video tokens kept (0, 1]")
    gen.add_argument("--model", help="local folder or hub id of a diffusers Wan pipeline (default: demo pipeline)")
    gen.add_argument("--frames", type=int, default=17, help="video frames (4k+1 for Wan)")
    gen.add_argument("--height", type=int, default=256)
    gen.add_argument("--width", type=int, default=256)
    gen.add_argument("--steps", type=int, default=20, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=int, default=16)
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("-o", "--output", default="out.mp4", help=".mp4 or .gif file to write")
    gen.set_defaults(run=generate)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError) as error:
        print(f"vidprune: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
