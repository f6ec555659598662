"""The `vidprune` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .bench import RANDOM_MODELS, Options, accepted_names, build_random_pipeline, default_methods, parse_methods, run_bench
from .bench_report import markdown, pyplot, write_report
from .config import LipConfig, TapeConfig
from .interframe import LipDetection
from .patch import apply, remove, stats
from .video_io import check_output_path, read_video, write_video

METHODS = ("none", "tape", "paper", "naive", "random")
EDIT_METHODS = ("none", "lip", "lip-noar", "lip-tape")


def tape_config(method: str, keep: float) -> TapeConfig | None:
    """The configuration behind a --method name (None: unpruned)."""
    if method == "none":
        return None
    if method == "tape":
        return TapeConfig(keep=keep)
    if method == "paper":
        return TapeConfig.paper(keep)
    if method == "naive":
        return TapeConfig.naive(keep)
    return TapeConfig.random(keep)


def load_pipeline(model: str | None, device: str, dtype: torch.dtype, video_to_video: bool = False):
    """A supported diffusers pipeline from a local folder or hub id, or the demo pipeline; as
    its video-to-video variant when `video_to_video`."""
    if model is None:
        from .demo.pipeline import MODEL_DIR, load_demo_pipeline

        print(f"model: vidprune's demo Wan pipeline ({MODEL_DIR}), a small model trained on procedural clips: "
              "a test bed, not a product model")
        pipe = load_demo_pipeline()
    elif _is_demo_folder(model):  # a demo model retrained with vidprune.demo.train: no text encoder inside
        from .demo.pipeline import load_demo_pipeline

        pipe = load_demo_pipeline(model)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError) as error:
            raise SystemExit(f"vidprune: could not load a diffusers pipeline from {model!r}: {error}") from error
    if model is not None:
        print(f"model: {model} ({type(pipe).__name__})")
    if video_to_video and type(pipe).__name__ != "WanVideoToVideoPipeline":
        from diffusers import WanVideoToVideoPipeline

        pipe = WanVideoToVideoPipeline.from_pipe(pipe)
    pipe = pipe.to(device)
    return pipe if dtype == pipe.transformer.dtype else pipe.to(dtype=dtype)


def _is_demo_folder(model: str) -> bool:
    """A local pipeline folder saved without its text encoder, as vidprune's demo model is."""
    index = Path(model) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("text_encoder", [None])[0] is None


def _device(requested: str | None) -> tuple[str, torch.dtype]:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def call_settings(args: argparse.Namespace) -> dict:
    """Steps, guidance and text length: the demo model's own when it is used, else the
    command's defaults."""
    settings = dict(num_inference_steps=args.steps or 25, guidance_scale=args.guidance)
    if args.model is None or _is_demo_folder(args.model):
        from .demo.pipeline import DEFAULT_CALL

        settings.update(max_sequence_length=DEFAULT_CALL["max_sequence_length"],
                        num_inference_steps=args.steps or DEFAULT_CALL["num_inference_steps"])
    return settings


def generate(args: argparse.Namespace) -> None:
    device, dtype = _device(args.device)
    config = tape_config(args.method, args.keep)  # validate the arguments before the model loads
    check_output_path(args.output)
    pipe = load_pipeline(args.model, device, dtype)
    if config is not None:
        apply(pipe, config)
    print(f"method: {args.method}" + (f" (mean keep {args.keep})" if config is not None else ""))

    def run() -> tuple[object, float]:
        started = time.perf_counter()
        frames = pipe(
            prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
            generator=torch.Generator(device).manual_seed(args.seed), output_type="np", **call_settings(args),
        ).frames[0]
        return frames, time.perf_counter() - started

    frames, elapsed = run()
    if config is not None:
        print(stats(pipe))
    if args.compare:
        compare_with_unpruned(pipe, run, frames, elapsed, "video")
    path = write_video(frames, args.output, fps=args.fps)
    print(f"generated {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} in {elapsed:.2f} s "
          f"on {device} -> {path}")


def compare_with_unpruned(pipe, run, frames, elapsed: float, what: str) -> None:
    """Run the same call again without vidprune and print the speedup and the fidelity of
    `frames` against that unpruned result (same prompt, seed and settings)."""
    from .metrics import flicker, psnr

    remove(pipe)
    reference, reference_time = run()
    print(f"unpruned {what}: {reference_time:.2f} s (speedup {reference_time / elapsed:.2f}x); "
          f"PSNR against it {psnr(frames, reference):.2f} dB; flicker {flicker(frames):.4f} "
          f"(unpruned {flicker(reference):.4f})")


def source_video(path: str, max_frames: int | None, height: int | None, width: int | None):
    """The input video as PIL frames, trimmed to 4k+1 frames, and the size to edit at."""
    from PIL import Image

    frames = read_video(path, max_frames)
    usable = (len(frames) - 1) // 4 * 4 + 1  # Wan's VAE takes 4k+1 frames
    if usable < 5:
        raise ValueError(f"input video has {len(frames)} frames: editing needs at least 5 (two latent frames)")
    if usable != len(frames):
        print(f"using the first {usable} of {len(frames)} frames (Wan takes 4k+1 frames)")
    height = height or frames.shape[1] // 16 * 16
    width = width or frames.shape[2] // 16 * 16
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(f"size {width}x{height} is not accepted: width and height must be multiples of 16, at least 16")
    return [Image.fromarray(frame) for frame in frames[:usable]], height, width


def edit(args: argparse.Namespace) -> None:
    device, dtype = _device(args.device)
    check_output_path(args.output)
    detection = LipDetection(tau=args.tau, target_prune=args.target_prune)
    tape = TapeConfig(keep=args.keep) if args.method == "lip-tape" else None
    config = None if args.method == "none" else LipConfig(detection=detection, recovery=args.method != "lip-noar",
                                                          tape=tape)
    video, height, width = source_video(args.input, args.max_frames, args.height, args.width)
    pipe = load_pipeline(args.model, device, dtype, video_to_video=True)

    def run() -> tuple[object, float]:
        started = time.perf_counter()
        frames = pipe(
            prompt=args.prompt, video=video, height=height, width=width, strength=args.strength,
            generator=torch.Generator(device).manual_seed(args.seed), output_type="np", **call_settings(args),
        ).frames[0]
        return frames, time.perf_counter() - started

    if config is not None:
        apply(pipe, config)
    print(f"method: {args.method}, {len(video)} frames at {width}x{height}, strength {args.strength}")
    frames, elapsed = run()
    if config is not None:
        spans = stats(pipe).forwards[0].spans
        if spans:
            total = spans[0].grid.per_frame
            print("pruned per latent frame: " + " ".join(f"{1 - k / total:.2f}" for k in spans[0].kept_per_frame()))
        else:
            print("pruned per latent frame: none (the source changes everywhere, so every token is computed)")
        print(f"tokens pruned: {1 - stats(pipe).mean_keep:.1%}, estimated block FLOPs saved {stats(pipe).flops_saved:.1%}")
    print(f"edited in {elapsed:.2f} s on {device}")
    if args.compare:
        compare_with_unpruned(pipe, run, frames, elapsed, "edit")
    path = write_video(frames, args.output, fps=args.fps)
    print(f"wrote {path}")


def bench(args: argparse.Namespace) -> None:
    random_shape = RANDOM_MODELS.get(args.model)
    fidelity = random_shape is None
    methods = parse_methods(args.methods or default_methods(not fidelity), random_weights=not fidelity)
    args.methods = [method.name for method in methods[1:]]  # the recorded command names them all
    counts = dict(prompts=16, seeds=2, repeats=1) if fidelity else dict(prompts=1, seeds=1, repeats=2)
    counts = {key: count if getattr(args, key) is None else getattr(args, key) for key, count in counts.items()}
    options = Options(clips=args.clips, warmup=args.warmup, strength=args.strength, random_weights=not fidelity,
                      **counts)
    pyplot()  # the plot's dependency, before the long run
    device, dtype = _device(args.device)
    if fidelity:
        pipe = load_pipeline(args.model, device, dtype)
        call = call_settings(args)
    else:
        print(f"model: {args.model}, a Wan2.1-shaped transformer ({random_shape}) with random weights in {dtype}: "
              "real speed, no fidelity")
        pipe = build_random_pipeline(random_shape, device, dtype)
        call = dict(num_inference_steps=args.steps or 20, guidance_scale=args.guidance)
    demo = args.model is None or _is_demo_folder(args.model)
    call.update(num_frames=args.frames or (17 if demo else 81), height=args.height or (128 if demo else 480),
                width=args.width or (128 if demo else 832))
    words = ["vidprune", "bench"]
    for key, value in vars(args).items():
        if key not in ("command", "run") and value is not None:
            words += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    report = run_bench(pipe, methods, call, options, args.model or "vidprune's demo model", shlex.join(words))
    print(markdown(report))
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local folder or hub id of a diffusers Wan pipeline (default: demo pipeline)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the demo model's 25, else 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidprune", description="Faster diffusers video transformers by token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text-to-video with token pruning")
    gen.add_argument("prompt")
    gen.add_argument("--method", choices=METHODS, default="tape",
                     help="tape (default: token cache, refreshing selection, first 20%% of steps dense), paper "
                          "(TAPE as its paper describes it), naive per-frame pruning, random pruning, or none")
    gen.add_argument("--keep", type=float, default=0.5, help="mean fraction of video tokens kept (0, 1]")
    gen.add_argument("--frames", type=int, default=17, help="video frames (4k+1 for Wan)")
    gen.add_argument("--height", type=int, default=128, help="the demo model is trained at 128x128")
    gen.add_argument("--width", type=int, default=128)
    gen.add_argument("--compare", action="store_true",
                     help="also generate without pruning (same seed) and report the speedup and PSNR against it")
    gen.add_argument("-o", "--output", default="out.mp4", help=".mp4 or .gif file to write")
    _common_arguments(gen)
    gen.set_defaults(run=generate)

    ed = commands.add_parser("edit", help="video-to-video editing with inter-frame pruning (LIP)")
    ed.add_argument("input", help="video file (mp4, avi, mov, mkv, webm, gif) or a folder of frames")
    ed.add_argument("--prompt", required=True, help="what the edited video should show")
    ed.add_argument("--method", choices=EDIT_METHODS, default="lip",
                    help="lip (with Attention Recovery, default), lip-noar (plain pruning), lip-tape (lip, then "
                         "TAPE pruning among the tokens LIP keeps) or none")
    ed.add_argument("--keep", type=float, default=0.5,
                    help="lip-tape: the share of LIP's kept tokens TAPE keeps, mean over the steps (default 0.5)")
    ed.add_argument("--strength", type=float, default=0.7, help="how far to noise the source (0, 1]")
    ed.add_argument("--tau", type=float, default=LipDetection.tau,
                    help="a token is computed where its latent distance to the previous frame exceeds tau")
    ed.add_argument("--target-prune", type=float,
                    help="instead of tau: the fraction of tokens to prune; tau is fitted to this video")
    ed.add_argument("--max-frames", type=int, help="read at most this many frames")
    ed.add_argument("--height", type=int, help="default: the video's, rounded down to a multiple of 16")
    ed.add_argument("--width", type=int, help="default: the video's, rounded down to a multiple of 16")
    ed.add_argument("--compare", action="store_true", help="also run the unpruned edit and report fidelity")
    ed.add_argument("-o", "--output", default="edited.mp4", help=".mp4 or .gif file to write")
    _common_arguments(ed)
    ed.set_defaults(run=edit)

    be = commands.add_parser(
        "bench", help="methods and diffusers' caches side by side: speed, fidelity, table and plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the methods side by side in one process on one pipeline, prompts and seeds, after "
                    "warm-up; writes bench.json, bench.md and bench.png to --out. Method names (NAME, NAME:VALUE, "
                    "or PRUNING+CACHE such as tape:0.5+fbc:0.1; unpruned always runs first, as the reference):\n"
                    + accepted_names(),
    )
    be.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="methods to run (default: all of the issue's list for the model)")
    be.add_argument("--model", help="local folder or hub id of a diffusers Wan pipeline, or a random-weight Wan2.1 "
                    f"transformer for speed only: {', '.join(RANDOM_MODELS)} (default: the demo pipeline)")
    be.add_argument("--prompts", type=int, help="text-to-video prompts (default 16; 1 on random weights)")
    be.add_argument("--seeds", type=int, help="seeds per prompt or clip (default 2; 1 on random weights)")
    be.add_argument("--clips", type=int, default=6, help="source clips to edit, when editing methods run")
    be.add_argument("--repeats", type=int, help="timed calls per method and input (default 1; 2 on random weights)")
    be.add_argument("--warmup", type=int, default=1, help="untimed calls per method before timing")
    be.add_argument("--strength", type=float, default=0.7, help="editing strength")
    be.add_argument("--frames", type=int, help="video frames (default: 17 for the demo model, else 81)")
    be.add_argument("--height", type=int, help="default: 128 for the demo model, else 480")
    be.add_argument("--width", type=int, help="default: 128 for the demo model, else 832")
    be.add_argument("--steps", type=int, help="denoising steps (default: the demo model's 25; 20 on random weights)")
    be.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    be.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    be.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md and bench.png")
    be.set_defaults(run=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "compare", False) and args.method == "none":
        parser.error("--compare sets the pruned video against the unpruned one: it needs a --method other than none")
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"vidprune: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
