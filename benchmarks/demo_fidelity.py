"""Fidelity of TAPE, its ablations and the baselines on the shipped demo model: each method's
video against the unpruned video of the same prompt and seed (PSNR), the video's flicker, and
the selection jitter (IoU of adjacent frames' kept sets). CPU is fine; quality numbers are of
the small demo model (a test bed trained on procedural clips), not of a product model.

    python benchmarks/demo_fidelity.py --prompts 4 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import vidprune
from vidprune.demo.data import make_clip
from vidprune.demo.pipeline import DEFAULT_CALL, load_demo_pipeline
from vidprune.metrics import flicker, psnr


def methods(keep: float) -> dict[str, vidprune.TapeConfig]:
    tape = vidprune.TapeConfig(keep=keep, record_selections=True)
    return {
        f"tape_{keep}": tape,
        f"tape_no_smoothing_{keep}": tape.with_(temporal_sigma=0.0),
        f"tape_no_reselection_{keep}": tape.with_(reselect_every=0),
        f"tape_no_schedule_{keep}": tape.with_(schedule="constant"),
        f"tape_full_first_step_{keep}": tape.with_(full_first_steps=1),
        f"tape_reuse_residuals_{keep}": tape.with_(full_first_steps=1, reuse_residuals=True),
        f"naive_{keep}": vidprune.TapeConfig.naive(keep, record_selections=True),
        f"random_{keep}": vidprune.TapeConfig.random(keep, record_selections=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [make_clip(1000 + i, split="heldout")[1] for i in range(args.prompts)]
    configs = {name: config for keep in args.keeps for name, config in methods(keep).items()}
    rows: dict[str, list[dict]] = {name: [] for name in ["unpruned", *configs]}
    for prompt in prompts:
        for seed in range(args.seeds):
            def generate():
                started = time.perf_counter()
                video = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
                             **DEFAULT_CALL).frames[0]
                return video, time.perf_counter() - started

            vidprune.remove(pipe)
            reference, seconds = generate()
            rows["unpruned"].append({"flicker": flicker(reference), "seconds": seconds})
            for name, config in configs.items():
                vidprune.apply(pipe, config)
                video, seconds = generate()
                stats = vidprune.stats(pipe)
                rows[name].append({"psnr": psnr(video, reference), "flicker": flicker(video), "seconds": seconds,
                                   "selection_iou": stats.selection_iou(), "flops_saved": stats.flops_saved})
                print(prompt[:40], seed, name, {k: round(v, 4) for k, v in rows[name][-1].items()}, flush=True)
    vidprune.remove(pipe)
    summary = {name: {key: statistics.median(r[key] for r in entries) for key in entries[0]}
               for name, entries in rows.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_fidelity.json").write_text(json.dumps({"prompts": prompts, "seeds": args.seeds,
                                                             "median": summary, "runs": rows}, indent=2))
    lines = [
        "# TAPE fidelity on the demo model",
        "",
        f"{len(prompts)} held-out prompts x {args.seeds} seed(s), {DEFAULT_CALL['num_frames']}x{DEFAULT_CALL['height']}x"
        f"{DEFAULT_CALL['width']}, {DEFAULT_CALL['num_inference_steps']} steps, CFG {DEFAULT_CALL['guidance_scale']}, CPU. "
        "PSNR of each method's video against the unpruned video of the same prompt and seed; flicker = mean "
        "absolute difference of consecutive frames; selection IoU = adjacent frames' kept sets (1 = no jitter). "
        "Medians. The demo model is small and undertrained: these numbers describe it, not a product model. "
        "Made by `python benchmarks/demo_fidelity.py " + f"--prompts {args.prompts} --seeds {args.seeds}`.",
        "",
        "| method | PSNR dB | flicker | selection IoU | block FLOPs saved | seconds (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s.get('psnr', float('inf')):.2f} | {s['flicker']:.4f} | "
                     f"{s.get('selection_iou', float('nan')):.3f} | {s.get('flops_saved', 0.0):.1%} | {s['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "demo_fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
