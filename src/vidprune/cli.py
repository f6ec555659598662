"""The `vidprune` command."""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

import torch

from .adapters import (
    Adapter,
    adapter_for,
    adapter_for_pipeline,
    supported_pipelines,
)
from .bench import (
    RANDOM_MODELS,
    Options,
    accepted_names,
    benchmark_shape,
    build_random_pipeline,
    check_family,
    default_methods,
    parse_methods,
    run_bench,
)
from .bench.methods import tape_config as registry_tape_config
from .bench.report import markdown, pyplot, write_report
from .cli_arguments import (
    FRACTION,
    FRAMES,
    MAX_FRAMES,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    SIZE,
    check_budget,
    check_edit_steps,
    demo_edit_size,
    device_name,
    model_name,
    warn_untrained_size,
)
from .cli_calibrate import add_parser as add_calibrate_parser
from .cli_loading import (
    _device,
    _is_demo_folder,
    call_settings,
    check_pipeline_class,
    folder_pipeline_class,
    load_pipeline,
)
from .budget import BudgetProfile
from .config import CONTEXT_KINDS, LipConfig, TapeConfig
from .demo.pipeline import (
    HEIGHT,
    demo_profile,
    NUM_FRAMES,
    WIDTH,
)
from .extras import MissingExtraError
from .interframe import LipDetection
from .patch import apply, remove, stats
from .video_io import check_folder, check_output_path, read_video, write_video

METHODS = ("none", "tape", "paper", "naive", "random")
EDIT_METHODS = ("none", "lip", "lip-noar", "lip-tape")


def tape_config(method: str, keep: float) -> TapeConfig | None:
    """The configuration behind a --method name (None: unpruned), from the bench registry."""
    return None if method == "none" else registry_tape_config(method, keep)


# -- commands ----------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> None:
    device, dtype = _device(args.device)
    config = tape_config(args.method, args.keep)  # validate the arguments before the model loads
    if config is not None and (args.budget is not None or args.context is not None):
        config = config.with_(**budget_and_context(args))
    elif config is None and args.context is not None:
        raise ValueError("--context applies to pruning methods; --method none computes every token")
    check_output_path(args.output, args.overwrite)
    settings = call_settings(args)
    if args.method == "tape" and args.budget is None:
        config = default_budget(config, args, settings["num_inference_steps"])
    planned = check_budget(config, settings["num_inference_steps"])
    if args.model is None:
        warn_untrained_size(args.frames, args.height, args.width)
    pipe = load_pipeline(args.model, device, dtype)
    if config is not None:
        apply(pipe, config)
    print(f"method: {args.method}" + ("" if config is None else f" (budget {budget_name(config)}, mean keep "
                                      f"{sum(planned) / len(planned):.3g})"))

    def run() -> tuple[object, float]:
        started = time.perf_counter()
        frames = pipe(
            prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
            generator=torch.Generator(device).manual_seed(args.seed), output_type="np", **settings,
        ).frames[0]
        return frames, time.perf_counter() - started

    print(f"generating {args.frames} frames at {args.width}x{args.height}, "
          f"{settings['num_inference_steps']} steps...")
    frames, elapsed = run()
    if config is not None:
        print(stats(pipe))
    if args.compare:
        compare_with_unpruned(pipe, run, frames, elapsed, "video")
    path = write_video(frames, args.output, fps=args.fps, overwrite=args.overwrite)
    print(f"generated {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} in {elapsed:.2f} s "
          f"on {device} -> {path}")


def compare_with_unpruned(pipe, run, frames, elapsed: float, what: str) -> None:
    """Run the same call again without vidprune and print the speedup and the fidelity of
    `frames` against that unpruned result (same prompt, seed and settings)."""
    from .metrics import flicker, psnr

    print(f"running the unpruned {what} to compare...")
    remove(pipe)
    reference, reference_time = run()
    print(f"unpruned {what}: {reference_time:.2f} s (speedup {reference_time / elapsed:.2f}x); "
          f"PSNR against it {psnr(frames, reference):.2f} dB; flicker {flicker(frames):.4f} "
          f"(unpruned {flicker(reference):.4f})")


def source_video(path: str, max_frames: int | None, height: int | None, width: int | None):
    """The input video as PIL frames, trimmed to 4k+1 frames, and the size to edit at."""
    from PIL import Image

    print(f"reading {path}...")
    frames = read_video(path, max_frames)
    usable = (len(frames) - 1) // 4 * 4 + 1  # Wan's VAE takes 4k+1 frames
    if usable < 5:
        raise ValueError(f"input video has {len(frames)} frames: editing needs at least 5 (two latent frames)")
    if usable != len(frames):
        print(f"using the first {usable} of {len(frames)} frames (Wan takes 4k+1 frames)")
    height = frames.shape[1] // 16 * 16 if height is None else height
    width = frames.shape[2] // 16 * 16 if width is None else width
    if height < 16 or width < 16:
        raise ValueError(f"input video is {frames.shape[2]}x{frames.shape[1]}: editing at its size needs at least "
                         "16x16; give --height and --width (multiples of 16)")
    return [Image.fromarray(frame) for frame in frames[:usable]], height, width


def edit_source(pipeline_class: type, video: list, mask_path: str | None, strength: float) -> dict:
    """The edit call's source arguments for a pipeline of `pipeline_class`. A pipeline whose call
    takes a mask (WanVACEPipeline) regenerates where the mask is set and reproduces the video
    elsewhere, where LIP prunes (with no mask it regenerates every pixel, and LIP would prune
    nothing): it needs --mask. The others noise the whole video by --strength."""
    from PIL import Image

    name = pipeline_class.__name__
    if "mask" not in inspect.signature(pipeline_class.__call__).parameters:
        if mask_path is not None:
            raise ValueError(f"--mask is for a pipeline that takes a mask (WanVACEPipeline); {name} edits the whole "
                             "video by --strength: leave --mask out")
        return dict(video=video, strength=strength)
    if mask_path is None:
        raise ValueError(f"{name} regenerates what its mask covers and keeps the rest, where LIP prunes; with no mask "
                         "it regenerates every pixel: give --mask VIDEO (white where the edit goes, black where the "
                         "source stays)")
    mask = [Image.fromarray(frame) for frame in read_video(mask_path, len(video))]
    if len(mask) != len(video):
        raise ValueError(f"--mask has {len(mask)} frames and the video is edited on {len(video)}: give a mask as long")
    return dict(video=video, mask=mask, num_frames=len(video))  # its num_frames would default to 81


def edit(args: argparse.Namespace) -> None:
    device, dtype = _device(args.device)
    check_output_path(args.output, args.overwrite)
    detection = LipDetection(tau=args.tau, target_prune=args.target_prune)
    tape = TapeConfig(keep=args.keep, budget="even") if args.method == "lip-tape" else None
    config = None if args.method == "none" else LipConfig(detection=detection, recovery=args.method != "lip-noar",
                                                          tape=tape)
    settings = call_settings(args)
    steps = settings["num_inference_steps"]
    if args.mask is None:  # a masked edit (VACE) runs every step; --strength is not used
        check_edit_steps(steps, args.strength)
    check_budget(tape, steps if args.mask else int(steps * args.strength))
    if args.model is not None and folder_pipeline_class(args.model) is not None:  # before the video is read
        check_pipeline_class(folder_pipeline_class(args.model), args.model, video_to_video=True)
    if args.model is None:
        demo_edit_size(args)
    video, height, width = source_video(args.input, args.max_frames, args.height, args.width)
    if args.model is None:
        warn_untrained_size(len(video), height, width)
    # A local folder names its pipeline (the demo's is Wan's video-to-video): the mask is checked
    # before loading; a hub id's pipeline is known once loaded.
    import diffusers

    named = "WanVideoToVideoPipeline" if args.model is None else folder_pipeline_class(args.model)
    source = None if named is None else edit_source(getattr(diffusers, named), video, args.mask, args.strength)
    pipe = load_pipeline(args.model, device, dtype, video_to_video=True)
    if source is None:
        source = edit_source(type(pipe), video, args.mask, args.strength)

    def run() -> tuple[object, float]:
        started = time.perf_counter()
        frames = pipe(
            prompt=args.prompt, height=height, width=width, generator=torch.Generator(device).manual_seed(args.seed),
            output_type="np", **source, **settings,
        ).frames[0]
        return frames, time.perf_counter() - started

    if config is not None:
        apply(pipe, config)
    print(f"method: {args.method}, {len(video)} frames at {width}x{height}, "
          + (f"mask {args.mask}" if args.mask else f"strength {args.strength}"))
    print(f"encoding {len(video)} frames, then denoising...")
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
    path = write_video(frames, args.output, fps=args.fps, overwrite=args.overwrite)
    print(f"wrote {path}")


def bench(args: argparse.Namespace) -> None:
    check_folder(args.out, f"--out {args.out!r}")
    random_shape = RANDOM_MODELS.get(args.model)
    fidelity = random_shape is None
    adapter = bench_family(args.model)
    methods = parse_methods(args.methods or default_methods(not fidelity, adapter), random_weights=not fidelity)
    if adapter is not None:
        check_family(methods, adapter)
    args.methods = [method.name for method in methods[1:]]  # the recorded command names them all
    counts = dict(prompts=16, seeds=2, repeats=1) if fidelity else dict(prompts=1, seeds=1, repeats=2)
    counts = {key: count if getattr(args, key) is None else getattr(args, key) for key, count in counts.items()}
    options = Options(clips=args.clips, warmup=args.warmup, strength=args.strength, random_weights=not fidelity,
                      **counts)
    pyplot()  # the plot's dependency, before the long run
    device, dtype = _device(args.device)
    if fidelity:
        call = call_settings(args)
    else:
        call = dict(num_inference_steps=20 if args.steps is None else args.steps, guidance_scale=args.guidance)
    demo = args.model is None or _is_demo_folder(args.model)
    if demo:
        usual = (NUM_FRAMES, HEIGHT, WIDTH)
    else:  # a random-weight model's own size, else its family's first published one
        usual = benchmark_shape(random_shape)[1].video if random_shape else usual_video(adapter)
    sizes = dict(num_frames=(args.frames, usual[0]), height=(args.height, usual[1]), width=(args.width, usual[2]))
    call.update({key: default if given is None else given for key, (given, default) in sizes.items()})
    if any(method.task == "edit" for method in methods):
        check_edit_steps(call["num_inference_steps"], args.strength)
    if args.model is None:
        warn_untrained_size(call["num_frames"], call["height"], call["width"])
    if fidelity:
        pipe = load_pipeline(args.model, device, dtype)
        check_family(methods, adapter_for(pipe.transformer))  # a hub id's family is known once loaded
    else:
        print(f"model: {args.model}, shaped as {benchmark_shape(random_shape)[1].source}, with random weights in "
              f"{dtype}: real speed, no fidelity")
        pipe = build_random_pipeline(random_shape, device, dtype)
    words = ["vidprune", "bench"]
    for key, value in vars(args).items():
        if key not in ("command", "run") and value is not None:
            words += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    report = run_bench(pipe, methods, call, options, args.model or "vidprune's demo model", shlex.join(words))
    print(markdown(report))
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")


def bench_family(model: str | None) -> Adapter | None:
    """The family of a bench --model where it is known before loading: a random-weight name, a
    local folder (its model_index.json), the demo model (Wan); None for a hub id."""
    if model is None:
        return adapter_for_pipeline("WanPipeline")
    if model in RANDOM_MODELS:
        return benchmark_shape(RANDOM_MODELS[model])[0]
    name = folder_pipeline_class(model)
    if name is None:
        return None
    check_pipeline_class(name, model)
    return adapter_for_pipeline(name)


def usual_video(adapter: Adapter | None) -> tuple[int, int, int]:
    """Frames, height and width of the family's first published size (Wan2.1's 81 x 480 x 832 when unknown)."""
    adapter = adapter or adapter_for_pipeline("WanPipeline")
    return next(shape.video for shape in adapter.benchmark_shapes.values() if not shape.tiny)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_name,
                        help="local folder or hub id of a diffusers pipeline: " + ", ".join(supported_pipelines())
                        + " (edit: Wan's, CogVideoX's or WanVACEPipeline; default: the demo pipeline)")
    parser.add_argument("--steps", type=POSITIVE, help="denoising steps (default: the demo model's 25, else 25)")
    parser.add_argument("--guidance", type=NON_NEGATIVE, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--fps", type=POSITIVE, default=16)
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors take vidprune's form: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vidprune: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vidprune", description="Faster diffusers video transformers by token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text-to-video with token pruning")
    gen.add_argument("prompt")
    gen.add_argument("--method", choices=METHODS, default="tape",
                     help="tape (default: token cache, refreshing selection, first 20%% of steps dense), paper "
                          "(TAPE as its paper describes it), naive per-frame pruning, random pruning, or none")
    gen.add_argument("--keep", type=FRACTION, default=0.5, help="mean fraction of video tokens kept (0, 1]")
    gen.add_argument("--budget", help="how the keep is spread over the steps: cycle (dense steps among reuse steps, "
                     "which run no block), even (token steps after the dense start), or a profile file from `vidprune "
                     "calibrate` (its mean keep replaces --keep). Default: with the demo model its calibrated profile "
                     "nearest --keep, else cycle")
    gen.add_argument("--context", choices=CONTEXT_KINDS, help="what kept tokens attend over in a token step: kept "
                     "(the kept tokens only, fastest) or full (every token, the pruned ones from their remembered "
                     "state: closer to the unpruned video; Wan only). Default: a profile's own, else kept")
    gen.add_argument("--frames", type=FRAMES, default=NUM_FRAMES, help="video frames (4k+1; LTX: 8k+1)")
    gen.add_argument("--height", type=SIZE, default=HEIGHT, help=f"the demo model is trained at {WIDTH}x{HEIGHT}")
    gen.add_argument("--width", type=SIZE, default=WIDTH)
    gen.add_argument("--compare", action="store_true",
                     help="also generate without pruning (same seed) and report the speedup and PSNR against it")
    gen.add_argument("-o", "--output", default="out.mp4", help=".mp4 or .gif file to write")
    _common_arguments(gen)
    gen.set_defaults(run=generate)

    add_calibrate_parser(commands)

    ed = commands.add_parser("edit", help="video-to-video editing with inter-frame pruning (LIP)")
    ed.add_argument("input", help="video file (mp4, avi, mov, mkv, webm, gif) or a folder of frames")
    ed.add_argument("--prompt", required=True, help="what the edited video should show")
    ed.add_argument("--method", choices=EDIT_METHODS, default="lip",
                    help="lip (with Attention Recovery, default), lip-noar (plain pruning), lip-tape (lip, then "
                         "TAPE pruning among the tokens LIP keeps) or none")
    ed.add_argument("--keep", type=FRACTION, default=0.5,
                    help="lip-tape: the share of LIP's kept tokens TAPE keeps, mean over the steps (default 0.5)")
    ed.add_argument("--strength", type=FRACTION, default=0.7, help="how far to noise the source (0, 1]")
    ed.add_argument("--mask", help="WanVACEPipeline: a mask video (white: regenerate, black: keep the source), "
                    "which such an edit needs; instead of --strength")
    ed.add_argument("--tau", type=NON_NEGATIVE, default=LipDetection.tau,
                    help="a token is computed where its latent distance to the previous frame exceeds tau")
    ed.add_argument("--target-prune", type=OPEN_FRACTION,
                    help="instead of tau: the fraction of tokens to prune; tau is fitted to this video")
    ed.add_argument("--max-frames", type=MAX_FRAMES,
                    help=f"read at most this many frames (default: {NUM_FRAMES} with the demo model, else all)")
    ed.add_argument("--height", type=SIZE, help=f"default: {HEIGHT} with the demo model, else the video's, rounded "
                    "down to a multiple of 16; the frames are resized")
    ed.add_argument("--width", type=SIZE, help=f"default: {WIDTH} with the demo model, else the video's, rounded "
                    "down to a multiple of 16")
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
    be.add_argument("--model", type=model_name, help="local folder or hub id of a diffusers pipeline ("
                    + ", ".join(supported_pipelines()) + "), or a random-weight model of a published size for speed "
                    f"only: {', '.join(RANDOM_MODELS)} (default: the demo pipeline)")
    # bench.Options checks the counts, also before any model loads.
    be.add_argument("--prompts", type=int, help="text-to-video prompts (default 16; 1 on random weights)")
    be.add_argument("--seeds", type=int, help="seeds per prompt or clip (default 2; 1 on random weights)")
    be.add_argument("--clips", type=int, default=6, help="source clips to edit, when editing methods run")
    be.add_argument("--repeats", type=int, help="timed calls per method and input (default 1; 2 on random weights)")
    be.add_argument("--warmup", type=int, default=1, help="untimed calls per method before timing")
    be.add_argument("--strength", type=FRACTION, default=0.7, help="editing strength (0, 1]")
    be.add_argument("--frames", type=FRAMES, help=f"video frames (default: {NUM_FRAMES} for the demo model, else the family's usual, e.g. 81 for Wan)")
    be.add_argument("--height", type=SIZE, help=f"default: {HEIGHT} for the demo model, else the family's usual (Wan: 480)")
    be.add_argument("--width", type=SIZE, help=f"default: {WIDTH} for the demo model, else the family's usual (Wan: 832)")
    be.add_argument("--steps", type=POSITIVE,
                    help="denoising steps (default: the demo model's 25; 20 on random weights)")
    be.add_argument("--guidance", type=NON_NEGATIVE, default=5.0, help="classifier-free guidance scale")
    be.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    be.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md and bench.png")
    be.set_defaults(run=bench)
    return parser


def budget_and_context(args: argparse.Namespace) -> dict:
    """TapeConfig fields from --budget and --context: without --context, a profile's own context
    (the one its token steps were calibrated with); with --context full and no --budget, the even
    rule (full context changes token steps, and the default rule has none)."""
    fields = {} if args.budget is None else {"budget": args.budget}
    if args.context is not None:
        fields["context"] = args.context
        if args.context == "full" and args.budget is None:
            fields["budget"] = "even"
    elif args.budget is not None and args.budget.endswith(".json"):
        fields["context"] = BudgetProfile.load(args.budget).context
    return fields


def default_budget(config: TapeConfig, args: argparse.Namespace, steps: int) -> TapeConfig:
    """--method tape without --budget: the demo model's calibrated profile nearest --keep for
    its step count; else the default rule, saying how to calibrate the model's own."""
    if config.context == "full":
        print(f"budget: the even rule (full context changes token steps); `vidprune calibrate --context full` finds "
              f"this model's own budget for {steps} steps")
        return config
    profile = demo_profile(args.keep, steps) if args.model is None else None
    if profile is not None:
        print(f"budget: the demo model's profile calibrated for {steps} steps at cost {profile.target_cost} (the "
              f"nearest to --keep {args.keep}; --budget even|cycle|FILE chooses another)")
        return config.with_(budget=profile)
    print(f"budget: the {config.budget} rule; `vidprune calibrate` finds this model's own budget for {steps} steps")
    return config


def budget_name(config: TapeConfig) -> str:
    if isinstance(config.budget, str):
        return config.budget
    if isinstance(config.budget, tuple):
        return "per-step list"
    return f"profile for {config.budget.steps} steps, cost {config.budget.cost:.2f} of the block FLOPs"


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "compare", False) and args.method == "none":
        parser.error("--compare sets the pruned video against the unpruned one: it needs a --method other than none")
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, MissingExtraError) as error:  # user errors, files that cannot be
        # read or written, and an extra the command needs that is not installed
        print("vidprune: " + " ".join(str(error).splitlines()), file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
