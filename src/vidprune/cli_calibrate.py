"""`vidprune calibrate`: per-step budget profiles for one pipeline and step count (calibrate.py
has the search), written as JSON files that `TapeConfig(budget=PATH)` and `vidprune generate
--budget PATH` read."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from .calibrate import DEFAULT_LEVELS, DEFAULT_TARGETS, calibrate, check_search, pipeline_search
from .cli_arguments import FRAMES, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, SIZE, device_name, model_name
from .cli_loading import _device, _is_demo_folder, call_settings, load_pipeline
from .config import CONTEXT_KINDS, TapeConfig
from .demo.pipeline import HEIGHT, NUM_FRAMES, WIDTH

DEMO_CALIBRATION_PROMPTS = 8


def demo_calibration_prompts(count: int) -> list[str]:
    """Captions of the demo data's training split: never the held-out prompts its fidelity is
    measured on (demo/data.py keeps the two splits' combinations apart)."""
    from .demo.data import make_clip

    return [make_clip(5000 + i, split="train")[1] for i in range(count)]


def read_prompts(path: str) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt (one a line)")
    return prompts


def run(args: argparse.Namespace) -> None:
    device, dtype = _device(args.device)
    demo = args.model is None or _is_demo_folder(args.model)
    if args.prompts is None and not demo:
        raise ValueError("--prompts FILE is needed with --model (one calibration prompt a line; never the prompts "
                         "you will measure the profiles on)")
    check_search(args.targets, args.levels, args.moves)  # before anything loads
    prompts = read_prompts(args.prompts) if args.prompts else demo_calibration_prompts(DEMO_CALIBRATION_PROMPTS)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = call_settings(args)
    steps = settings["num_inference_steps"]
    pipe = load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    name = "demo" if args.model is None else re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model).name)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"calibrate: {message} ({time.perf_counter() - started:.0f} s)", flush=True)

    def call() -> torch.Tensor:
        # One prompt a call: some families select per call, not per sample (CogVideoX's RoPE)
        return torch.cat([pipe(prompt=prompt, num_frames=args.frames, height=args.height, width=args.width,
                               generator=torch.Generator(device).manual_seed(args.seed + i), output_type="latent",
                               **settings).frames for i, prompt in enumerate(prompts)])

    # full context: the token steps searched run with it (the default rule has none: "even" stands in)
    config = TapeConfig() if args.context == "kept" else TapeConfig(budget="even", context=args.context)
    print(f"calibrating {name}: {len(prompts)} prompts, {steps} steps, target costs {list(args.targets)}, "
          f"levels {list(args.levels)} (about {(steps - 1) * len(args.levels) + 4 * len(args.targets) + 2} calls and "
          f"up to {args.moves} more per target)", flush=True)
    with torch.no_grad():
        search, sigmas = pipeline_search(pipe, call, steps, config, progress)
        progress("reference and dense calls done")
        profiles = calibrate(search, config, sigmas, args.targets, args.levels, args.moves,
                             family=type(pipe.transformer).__name__, model=args.model or "vidprune demo model",
                             scheduler=type(pipe.scheduler).__name__, guidance_scale=settings["guidance_scale"])
    for profile in profiles:
        profile.calibration.update(prompts=len(prompts), device=str(device))
        path = args.out / f"{name}-{steps}steps-cost{profile.target_cost:.2f}.json"
        profile.save(path)
        keeps = " ".join("D" if k == 1 else "r" if k == 0 else f"{k:g}" for k in profile.keeps)
        print(f"cost {profile.cost:.3f} (target {profile.target_cost}): error {profile.calibration['error']:.4g} "
              f"(even {profile.calibration['start_errors'].get('even', float('nan')):.4g}) [{keeps}] -> {path}")
    print(f"{search.calls} calls in {time.perf_counter() - started:.0f} s on {device}; use a profile with "
          f"`vidprune generate ... --budget FILE` or `TapeConfig(budget=FILE)`")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="find per-step budgets (reuse steps, token steps, dense steps) for a model",
        description="For one pipeline, step count and guidance, find at each target cost the per-step TAPE budget "
                    "whose final latents stay closest to the unpruned call's on calibration prompts; write one "
                    "profile (JSON) per target.")
    parser.add_argument("--model", type=model_name, help="pipeline folder or hub id (default: the demo model)")
    parser.add_argument("--prompts", help="calibration prompts, one a line (default for the demo model: 8 captions "
                        "of its training split, none of the held-out ones)")
    parser.add_argument("--steps", type=POSITIVE, help="denoising steps (default: the demo model's 25, else 25)")
    parser.add_argument("--guidance", type=NON_NEGATIVE, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--frames", type=FRAMES, default=NUM_FRAMES)
    parser.add_argument("--height", type=SIZE, default=HEIGHT)
    parser.add_argument("--width", type=SIZE, default=WIDTH)
    parser.add_argument("--targets", type=OPEN_FRACTION, nargs="+", default=list(DEFAULT_TARGETS),
                        help="costs, as shares of the dense call's block FLOPs (default: %(default)s)")
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS),
                        help="a step's cheaper choices besides dense: 0 a reuse step, else a token step's keep "
                             "(default: %(default)s)")
    parser.add_argument("--context", choices=CONTEXT_KINDS, default="kept", help="what kept tokens attend over in the "
                        "token steps searched: kept (default) or full (every token; Wan only); the profiles record it")
    parser.add_argument("--moves", type=int, default=8, help="measured local-search moves per target (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("out/profiles"), help="folder for the profiles")
    parser.set_defaults(run=run)
