"""Fidelity of LIP variants on the demo model: edits of procedural source clips (still camera)
with each variant against the unpruned edit of the same clip, prompt and seed (PSNR), and
flicker. The demo VAE encodes static content differently in a clip's first latent frames, so
default thresholds prune nothing here: the mask is fitted to a target prune ratio instead.
Quality numbers of the small demo model (a test bed), CPU.

    python benchmarks/demo_lip_fidelity.py --clips 3 --target-prune 0.4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from diffusers import WanVideoToVideoPipeline
from PIL import Image

import vidprune
from vidprune.bench import edit_sources
from vidprune.demo.pipeline import DEFAULT_CALL, load_demo_pipeline
from vidprune.metrics import flicker, psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--target-prune", type=float, default=0.4)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    pipe = WanVideoToVideoPipeline.from_pipe(load_demo_pipeline())
    pipe.set_progress_bar_config(disable=True)
    detection = vidprune.LipDetection(target_prune=args.target_prune)
    variants = {
        "lip": vidprune.LipConfig(detection=detection),
        "lip-noar": vidprune.LipConfig(detection=detection, recovery=False),
        "lip-clean-kv": vidprune.LipConfig(detection=detection, kv_source="clean"),
        "lip-copy-prediction": vidprune.LipConfig(detection=detection, restore="prediction"),
    }
    call = {k: v for k, v in DEFAULT_CALL.items() if k != "num_frames"}
    rows: dict[str, list[dict]] = {name: [] for name in ["unpruned", *variants]}
    for source, prompt in edit_sources(args.clips):  # still-camera clips (LIP's setting), main colour changed
        video = [Image.fromarray(frame) for frame in source]

        def edit():
            return pipe(prompt=prompt, video=video, strength=args.strength, output_type="np",
                        generator=torch.Generator().manual_seed(0), **call).frames[0]

        vidprune.remove(pipe)
        reference = edit()
        rows["unpruned"].append({"flicker": flicker(reference), "pruned": 0.0})
        for name, config in variants.items():
            vidprune.apply(pipe, config)
            edited = edit()
            rows[name].append({"psnr": psnr(edited, reference), "flicker": flicker(edited),
                               "pruned": 1 - vidprune.stats(pipe).mean_keep})
            print(prompt[:50], name, rows[name][-1], flush=True)
    vidprune.remove(pipe)
    summary = {name: {key: statistics.median(r[key] for r in entries) for key in entries[0]}
               for name, entries in rows.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_lip_fidelity.json").write_text(json.dumps({"median": summary, "runs": rows}, indent=2))
    lines = [
        "# LIP fidelity on the demo model",
        "",
        f"{args.clips} procedural still-camera source clips (17x128x128), edit prompt = the clip's caption with the "
        f"main colour changed, strength {args.strength}, {call['num_inference_steps']} steps, CFG "
        f"{call['guidance_scale']}, CPU; mask fitted to prune {args.target_prune:.0%} of the tokens per clip "
        "(the demo VAE makes default thresholds prune nothing). PSNR against the unpruned edit of the same clip, "
        "prompt and seed; medians. Numbers of the small, undertrained demo model. Made by "
        f"`python benchmarks/demo_lip_fidelity.py --clips {args.clips} --target-prune {args.target_prune}`.",
        "",
        "| variant | tokens pruned | PSNR dB | PSNR per clip | flicker |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        per_clip = " ".join(f"{r['psnr']:.1f}" for r in rows[name]) if name != "unpruned" else ""
        lines.append(f"| {name} | {s['pruned']:.1%} | {s.get('psnr', float('inf')):.2f} | {per_clip} | {s['flicker']:.4f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "demo_lip_fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
