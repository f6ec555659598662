"""TAPE's presets, its ablations and diffusers' step caches on the demo model: fidelity to the
unpruned video and speed, side by side in one process.

Held-out prompts of the demo data (the model never saw these combinations) x seeds. Pruning
methods and the caches that decide without looking at the batch (MagCache from calibrated
ratios, TaylorSeer at fixed steps) run a whole batch of prompts per pipeline call (a selection is
per video, so batching changes nothing but speed); FirstBlockCache and its stacks run one video
per call, since it decides for a whole batch at once. Every video is compared with the unpruned video of the same prompt
and seed: PSNR, SSIM, flicker ratio, and whether the moving object keeps the unpruned video's
colour and direction (demo.measure), each against the unpruned run of the same batch size.
Speed: the wall time of each method's calls over the unpruned calls of the same batch size
(batches of all prompts: ~40k tokens a forward; one video: a launch-bound forward on a GPU), and
the block FLOPs computed.

The demo model is a small test bed (vidprune.demo), not a product model.

    python benchmarks/tape_fidelity.py --device cpu --embeds .gpu/embeds32.pt --write-embeds
    python benchmarks/tape_fidelity.py --device cuda --embeds .gpu/embeds32.pt --out benchmarks/results/tape_fidelity

The first line (here, with the text encoder) writes the prompts' embeddings; the second runs
where no text encoder can be installed (the GPU machine) from that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vidprune
from vidprune.bench import MethodContext, calibrate_mag_ratios, generation_inputs, tape_config
from vidprune.bench.caches import enable_cache_method
from vidprune.demo.measure import object_colour, object_direction
from diffusers import WanPipeline
from vidprune.demo.pipeline import DEFAULT_CALL, MODEL_DIR, load_demo_pipeline
from vidprune.metrics import fidelity_summary

def methods() -> dict[str, tuple[vidprune.TapeConfig | None, tuple[str, float] | None]]:
    """name -> (TAPE config or None, diffusers cache (kind, value) or None)."""
    table: dict[str, tuple] = {}
    for keep in (0.3, 0.5, 0.7):  # the named methods: the bench registry's configurations
        table[f"default:{keep}"] = (tape_config("tape-even", keep), None)
        table[f"paper:{keep}"] = (tape_config("paper", keep), None)
    table["naive:0.5"] = (tape_config("naive", 0.5), None)
    table["random:0.5"] = (tape_config("random", 0.5), None)
    ablations = {
        "cache-block": dict(cache="block"),
        "cache-none": dict(cache="none"),
        "no-change": dict(change_weight=0.0),
        "no-staleness": dict(staleness_weight=0.0, refresh_every=0),
        "soft-staleness": dict(staleness_weight=1.0),
        "reselect-every-2": dict(reselect_every=2),
        "no-forced-refresh": dict(refresh_every=0),
        "no-attention": dict(attention_weight=0.0),
        "refresh-every-3": dict(refresh_every=3),
        "refresh-every-8": dict(refresh_every=8),
        "no-dense": dict(dense_first=0.0),
        "dense-0.1": dict(dense_first=0.1),
        "dense-0.3": dict(dense_first=0.3),
        "cosine-schedule": dict(schedule="cosine"),
        "no-smoothing": dict(temporal_sigma=0.0),
        "no-reselect": dict(reselect_every=0),
        "random-importance": dict(importance="random"),
        "no-cfg-sharing": dict(share_cfg_selection=False),
        "change-weight-3": dict(change_weight=3.0),
        "staleness-weight-3": dict(staleness_weight=3.0),
        "change-since-step": dict(change_since="step"),
    }
    for name, change in ablations.items():
        table[f"default:0.5 {name}"] = (tape_config("tape-even", 0.5).with_(**change), None)
    for kind, values in (("mag", (0.06, 0.12, 0.24)), ("mag-fixed", (1, 2, 3)), ("fbc", (0.05, 0.1, 0.2)),
                         ("fbc-fixed", (2, 3)), ("taylor", (3, 5))):
        for value in values:
            table[f"{kind}:{value}"] = (None, (kind, value))
    for keep, cache in ((0.5, ("fbc", 0.1)), (0.5, ("mag", 0.06)), (0.7, ("mag", 0.06)), (0.7, ("mag", 0.12)),
                        (0.7, ("mag", 0.24))):
        table[f"default:{keep}+{cache[0]}:{cache[1]}"] = (tape_config("tape-even", keep), cache)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these method names (and unpruned)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tape_fidelity"))
    parser.add_argument("--embeds", type=Path, help="text embeddings of the prompts: read if the file exists (then "
                        "no text encoder is needed), else computed and written")
    parser.add_argument("--write-embeds", action="store_true", help="only write --embeds, then stop")
    args = parser.parse_args()
    device = args.device
    prompts = [i.arguments["prompt"] for i in generation_inputs(args.prompts, 1)]
    pipe, embeds = demo_pipeline_and_embeds(prompts, args.embeds, device)
    if args.write_embeds:
        return
    pipe.set_progress_bar_config(disable=True)
    call = dict(DEFAULT_CALL, output_type="np")
    seeds = range(args.seeds)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def generate(batch: list[int], seed: int) -> tuple[np.ndarray, float]:
        """Videos of prompts[batch] with per-video generators (as one call per video would draw)."""
        generators = [torch.Generator(device).manual_seed(seed * 10_000 + i) for i in batch]
        sync()
        started = time.perf_counter()
        frames = pipe(prompt_embeds=embeds[0][batch], negative_prompt_embeds=embeds[1].expand(len(batch), -1, -1),
                      generator=generators, **call).frames
        sync()
        return np.asarray(frames), time.perf_counter() - started

    everything = list(range(len(prompts)))
    batches = {"batched": [everything], "single": [[i] for i in everything]}

    def run_all(mode: str) -> tuple[dict[tuple[int, int], np.ndarray], list[float]]:
        videos, times = {}, []
        for seed in seeds:
            for batch in batches[mode]:
                frames, elapsed = generate(batch, seed)
                times.append(elapsed / len(batch))
                videos.update({(i, seed): frames[j] for j, i in enumerate(batch)})
        return videos, times

    table = methods()
    if args.only:
        table = {name: entry for name, entry in table.items() if name in args.only}
    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "model": "vidprune's demo model (a small test bed, not a product model)",
            "prompts": len(prompts), "seeds": args.seeds, "call": {k: v for k, v in call.items() if k != "output_type"},
            "command": "python benchmarks/tape_fidelity.py " + shlex.join(sys.argv[1:])}
    print(info, flush=True)
    with torch.no_grad():
        generate([0], 0)  # warm-up
        references = {}
        for mode in batches:
            videos, times = run_all(mode)
            references[mode] = (videos, statistics.median(times))
        setup = MethodContext(steps=call["num_inference_steps"])
        if any(cache and cache[0] == "mag" for _, cache in table.values()):
            setup.mag_ratios = calibrate_mag_ratios(pipe, lambda: generate([0], 0), setup.steps)
        rows = []
        for name, (config, cache) in table.items():
            if config is not None:
                vidprune.apply(pipe, config)
            if cache is not None:
                enable_cache_method(pipe, cache[0], cache[1], setup)
            mode = "single" if cache is not None and cache[0] == "fbc" else "batched"
            try:
                generate(batches[mode][0], 0)  # warm-up of this method
                videos, times = run_all(mode)
                stats = vidprune.stats(pipe) if config is not None else None
            finally:
                if cache is not None:
                    pipe.transformer.disable_cache()
                vidprune.remove(pipe)
            rows.append(summarise(name, config, cache, mode, videos, *references[mode], times, stats))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_video"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"info": info, "reference_s_per_video": {m: r[1] for m, r in references.items()}, "rows": rows}
    (args.out / "tape_fidelity.json").write_text(json.dumps(report, indent=1))
    (args.out / "tape_fidelity.md").write_text(markdown(report))
    print(markdown(report))


def demo_pipeline_and_embeds(prompts: list[str], path: Path | None, device: str):
    """The demo pipeline on `device` and (prompt embeddings, the negative prompt's), from `path`
    when it holds them for these prompts (the pipeline then loads without a text encoder)."""
    if path is not None and path.is_file():
        saved = torch.load(path)
        if saved["prompts"] != prompts:
            raise SystemExit(f"{path} holds embeddings of other prompts: delete it to compute them again")
        pipe = WanPipeline.from_pretrained(MODEL_DIR, tokenizer=None, text_encoder=None, local_files_only=True)
        pipe = pipe.to(device)
    else:
        pipe = load_demo_pipeline()
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu",
                                                    max_sequence_length=DEFAULT_CALL["max_sequence_length"])
        saved = {"prompts": prompts, "prompt_embeds": positive, "negative_prompt_embeds": negative[:1]}
        if path is not None:
            torch.save(saved, path)
        pipe = pipe.to(device)
    return pipe, (saved["prompt_embeds"].to(device), saved["negative_prompt_embeds"].to(device))


def embeds_generator(pipe, positive: torch.Tensor, negative: torch.Tensor, call: dict, device: str):
    """generate(batch, seed, output_type="np"): the videos of prompt embeddings `batch` (indices
    into `positive`), each video's generator seeded by the seed and its index, as the demo
    fidelity benchmarks compare them."""
    def generate(batch: list[int], seed: int, output_type: str = "np"):
        generators = [torch.Generator(device).manual_seed(seed * 10_000 + i) for i in batch]
        return pipe(prompt_embeds=positive[batch], negative_prompt_embeds=negative.expand(len(batch), -1, -1),
                    generator=generators, **{**call, "output_type": output_type}).frames
    return generate


def summarise(name, config, cache, mode, videos, references, reference_s, times, stats) -> dict:
    per_video = []
    for key, video in videos.items():
        reference = references[key]
        summary = fidelity_summary(video, reference, learned=False)
        summary["colour_kept"] = object_colour(video) == object_colour(reference)
        summary["direction_kept"] = object_direction(video) == object_direction(reference)
        per_video.append(summary)
    median = lambda k: float(np.median([v[k] for v in per_video]))  # noqa: E731
    return {
        "method": name,
        "config": None if config is None else repr(config),
        "cache": None if cache is None else f"{cache[0]}:{cache[1]}",
        "videos": len(per_video),
        "psnr": median("psnr"), "psnr_mean": float(np.mean([v["psnr"] for v in per_video])),
        "ssim": median("ssim"), "flicker_ratio": median("flicker_ratio"),
        "colour_kept": float(np.mean([v["colour_kept"] for v in per_video])),
        "direction_kept": float(np.mean([v["direction_kept"] for v in per_video])),
        "s_per_video": statistics.median(times), "speedup": reference_s / statistics.median(times),
        "timed_as": "single videos" if mode == "single" else "batches",
        "flops_computed": None if stats is None else 1.0 - stats.flops_saved,
        "mean_keep": None if stats is None else stats.mean_keep,
        "token_memory_mib": None if stats is None else stats.memory_bytes / 2**20,
        "per_video": [{k: v for k, v in p.items() if k in ("psnr", "ssim", "flicker_ratio")} for p in per_video],
    }


def markdown(report: dict) -> str:
    info = report["info"]
    lines = [
        "# TAPE presets, ablations and step caches on the demo model",
        "",
        f"{info['device']}, torch {info['torch']}, {info['model']}; {info['prompts']} held-out prompts x "
        f"{info['seeds']} seeds, {info['call']}. Medians over the videos against the unpruned video of the same "
        "prompt and seed; colour/direction kept = share of videos whose moving object has the unpruned video's "
        "colour/direction. Speedup: wall time per video over the unpruned run timed the same way (batches of "
        "all prompts per call; FirstBlockCache and its stacks: one video per call). FLOPs = share of block FLOPs "
        "computed (for a stack it counts the forwards the cache skipped as computed: an upper bound). "
        f"Made by `{info['command']}`.",
        "",
        "| method | PSNR dB | SSIM | flicker ratio | colour kept | direction kept | FLOPs | speedup | token memory MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        flops = "-" if r["flops_computed"] is None else f"{r['flops_computed']:.2f}"
        memory = "-" if r["token_memory_mib"] is None else f"{r['token_memory_mib']:.0f}"
        lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['flicker_ratio']:.2f} | "
                     f"{r['colour_kept']:.0%} | {r['direction_kept']:.0%} | {flops} | {r['speedup']:.2f}x "
                     f"({r['timed_as']}) | {memory} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
