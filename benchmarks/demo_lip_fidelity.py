"""Fidelity of LIP variants on the demo model against the prune ratio: edits of procedural
source clips (still camera) with each variant against the unpruned edit of the same clip,
prompt and seed (PSNR), and flicker. Each setting is LIP's default thresholds or a mask fitted
to a target prune ratio. Quality numbers of the small demo model (a test bed), CPU.

    python benchmarks/demo_lip_fidelity.py --clips 6 --settings default 0.3 0.5 0.7
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


def variants(detection: vidprune.LipDetection) -> dict[str, vidprune.LipConfig]:
    return {
        "lip": vidprune.LipConfig(detection=detection),
        "lip-noar": vidprune.LipConfig(detection=detection, recovery=False),
        "lip-m1": vidprune.LipConfig(detection=detection, duplicates=1),
        "lip-clean-kv": vidprune.LipConfig(detection=detection, kv_source="clean"),
        "lip-copy-prediction": vidprune.LipConfig(detection=detection, restore="prediction"),
    }


def detection_for(setting: str) -> vidprune.LipDetection:
    return vidprune.LipDetection() if setting == "default" else vidprune.LipDetection(target_prune=float(setting))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=["default", "0.3", "0.5", "0.7"],
                        help="'default' (LIP's thresholds) or target prune ratios")
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for setting in args.settings:
        detection_for(setting)  # a bad setting fails before the long run
    demo = load_demo_pipeline()
    pipe = WanVideoToVideoPipeline.from_pipe(demo, dtype=demo.transformer.dtype)
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in DEFAULT_CALL.items() if k != "num_frames"}
    # rows[setting][variant] = one entry per clip
    rows: dict[str, dict[str, list[dict]]] = {s: {} for s in ["unpruned", *args.settings]}
    for source, prompt in edit_sources(args.clips):  # still-camera clips (LIP's setting), main colour changed
        video = [Image.fromarray(frame) for frame in source]

        def edit():
            return pipe(prompt=prompt, video=video, strength=args.strength, output_type="np",
                        generator=torch.Generator().manual_seed(0), **call).frames[0]

        vidprune.remove(pipe)
        reference = edit()
        rows["unpruned"].setdefault("unpruned", []).append({"flicker": flicker(reference), "pruned": 0.0})
        for setting in args.settings:
            for name, config in variants(detection_for(setting)).items():
                vidprune.apply(pipe, config)
                edited = edit()
                entry = {"psnr": psnr(edited, reference), "flicker": flicker(edited),
                         "pruned": 1 - vidprune.stats(pipe).mean_keep}
                rows[setting].setdefault(name, []).append(entry)
                print(prompt[:40], setting, name, entry, flush=True)
    vidprune.remove(pipe)
    median = {s: {name: {key: statistics.median(e[key] for e in entries) for key in entries[0]}
                  for name, entries in by_name.items()} for s, by_name in rows.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_lip_fidelity.json").write_text(json.dumps({"median": median, "runs": rows}, indent=2))
    lines = [
        "# LIP fidelity on the demo model, against the prune ratio",
        "",
        f"{args.clips} procedural still-camera source clips (17x128x128), edit prompt = the clip's caption with the "
        f"main colour changed, strength {args.strength}, {call['num_inference_steps']} steps, CFG "
        f"{call['guidance_scale']}, CPU. Setting: LIP's default thresholds, or a mask fitted to a target prune ratio "
        "per clip. PSNR against the unpruned edit of the same clip, prompt and seed; medians over clips; "
        "'beats lip-noar': clips where the variant's PSNR is higher. Numbers of the small demo model. Made by "
        f"`python benchmarks/demo_lip_fidelity.py --clips {args.clips} --settings {' '.join(args.settings)}`.",
        "",
        f"Unpruned flicker: {median['unpruned']['unpruned']['flicker']:.4f}.",
        "",
        "| setting | variant | tokens pruned | PSNR dB | beats lip-noar | PSNR per clip | flicker |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in args.settings:
        plain = [e["psnr"] for e in rows[setting]["lip-noar"]]
        for name, entries in rows[setting].items():
            wins = "" if name == "lip-noar" else f"{sum(e['psnr'] > p for e, p in zip(entries, plain))}/{len(plain)}"
            m = median[setting][name]
            per_clip = " ".join(f"{e['psnr']:.1f}" for e in entries)
            lines.append(f"| {setting} | {name} | {m['pruned']:.1%} | {m['psnr']:.2f} | {wins} | {per_clip} | "
                         f"{m['flicker']:.4f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "demo_lip_fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
