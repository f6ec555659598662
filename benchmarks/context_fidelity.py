"""Full context on the demo model: TAPE token steps whose kept tokens attend over the kept
tokens only (context "kept") or over every token (context "full": the pruned tokens' keys from
their replayed state, from their remembered keys, or from the block cache's replay), at several
keeps; the same inside budgets that mix reuse and token steps; and `vidprune calibrate`'s
profiles searched with each context (calibration on 8 training-split captions, never the
evaluation prompts).

Evaluation on held-out prompts x seeds, each video against the unpruned video of the same
prompt and seed, all calls batched. The demo model is a small test bed (vidprune.demo), not a
product model.

    python benchmarks/context_fidelity.py --device cuda --embeds .gpu/budget_embeds.pt --out DIR
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
from vidprune.bench import generation_inputs
from vidprune.calibrate import calibrate, pipeline_search
from vidprune.cli_calibrate import demo_calibration_prompts
from vidprune.demo.pipeline import DEFAULT_CALL

from budget_fidelity import mixed_keeps
from tape_fidelity import demo_pipeline_and_embeds, embeds_generator, summarise

CONTEXTS = {"kept": {}, "full-replayed": dict(context="full"),
            "full-remembered": dict(context="full", context_keys="remembered"),
            "full-block": dict(context="full", cache="block"),
            "full-replayed-f8": dict(context="full", context_storage="float8")}
TARGETS = (0.7, 0.5, 0.35)
REFERENCE_KEYS = ("prompt_set", "evaluation_prompts", "seeds", "call")  # what makes two runs' references the same


def methods(steps: int) -> dict[str, vidprune.TapeConfig]:
    table = {}
    keeps = {"kept": (0.7, 0.5, 0.3), "full-replayed": (0.7, 0.5, 0.3), "full-remembered": (0.7, 0.5, 0.3),
             "full-block": (0.5,), "full-replayed-f8": (0.5, 0.3)}
    for keep in (0.7, 0.5, 0.3):
        for context, fields in CONTEXTS.items():
            if keep in keeps[context]:
                table[f"even:{keep} {context}"] = vidprune.TapeConfig(keep=keep, budget="even", **fields)
    for keep in (0.5, 0.3):
        for context in ("kept", "full-replayed"):
            table[f"mixed:{keep} {context}"] = vidprune.TapeConfig(budget=mixed_keeps(keep, steps, 0.2),
                                                                   **CONTEXTS[context])
    table["cycle:0.5"] = vidprune.TapeConfig(keep=0.5)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=0, help="videos per call (0: all prompts in one call, as on a "
                        "GPU; on a CPU small batches run faster)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/context"))
    parser.add_argument("--embeds", type=Path, required=True, help="text embeddings of the prompts (read if the file "
                        "exists, else computed and written: benchmarks/budget_fidelity.py --write-embeds)")
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL["num_inference_steps"])
    parser.add_argument("--moves", type=int, default=8, help="measured local-search moves per target")
    parser.add_argument("--no-calibration", action="store_true", help="only the fixed budgets")
    parser.add_argument("--only", nargs="*", help="only these methods of the fixed budgets (none: calibration only)")
    parser.add_argument("--name", default="context_fidelity", help="stem of the JSON and markdown written to --out")
    parser.add_argument("--references", type=Path, help="the unpruned videos: read if the file exists (an earlier "
                        "run of the same evaluation), else computed and written (a local file, not a result)")
    parser.add_argument("--report", type=Path, help="only write the markdown of this JSON (beside it)")
    parser.add_argument("--tune", action="store_true", help="evaluate on the calibration prompts instead: for choosing "
                        "settings, never a fidelity figure (those come from the held-out prompts)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="TapeConfig fields set on every fixed-budget method (its name then says them)")
    args = parser.parse_args()
    if args.report is not None:
        args.report.with_suffix(".md").write_text(markdown(json.loads(args.report.read_text())))
        return
    device = args.device
    evaluation = [i.arguments["prompt"] for i in generation_inputs(args.prompts, 1)]
    calibration = demo_calibration_prompts(8)
    assert not set(evaluation) & set(calibration), "calibration and evaluation prompts must be disjoint"
    pipe, (positive, negative) = demo_pipeline_and_embeds(evaluation + calibration, args.embeds, device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(DEFAULT_CALL, output_type="np", num_inference_steps=args.steps)
    steps = args.steps
    calibrating = list(range(len(evaluation), len(evaluation) + len(calibration)))
    evaluated = calibrating if args.tune else list(range(len(evaluation)))
    args.out.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generate = embeds_generator(pipe, positive, negative, call, device)

    size = args.batch or len(evaluated)
    batches = [evaluated[i:i + size] for i in range(0, len(evaluated), size)]

    def run_all() -> tuple[dict, list[float]]:
        videos, times = {}, []
        for seed in range(args.seeds):
            for batch in batches:
                sync()
                started = time.perf_counter()
                frames = np.asarray(generate(batch, seed))
                sync()
                times.append((time.perf_counter() - started) / len(batch))
                videos.update({(i, seed): frames[j] for j, i in enumerate(batch)})
        return videos, times

    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "model": "vidprune's demo model (a small test bed, not a product model)",
            "prompt_set": "calibration (tuning only)" if args.tune else "held-out",
            "evaluation_prompts": len(evaluated), "seeds": args.seeds, "calibration_prompts": calibration,
            "call": {k: v for k, v in call.items() if k != "output_type"},
            "command": "python benchmarks/context_fidelity.py " + shlex.join(sys.argv[1:])}
    print(info, flush=True)
    table = methods(steps)
    if args.only is not None:
        table = {name: config for name, config in table.items() if name in args.only}
    changes = dict(field_value(text) for text in args.set)
    if changes:
        table = {f"{name} {' '.join(args.set)}": config.with_(**changes) for name, config in table.items()}
    rows, calibration_report = [], {}
    out_file = args.out / f"{args.name}.json"

    def write() -> None:
        report = {"info": info, "calibration": calibration_report, "reference_s_per_video": reference_s, "rows": rows}
        out_file.write_text(json.dumps(report, indent=1))
        out_file.with_suffix(".md").write_text(markdown(report))

    def evaluate(name: str, config: vidprune.TapeConfig) -> None:
        vidprune.apply(pipe, config)
        try:
            if device.startswith("cuda"):
                generate(evaluated, 0)  # warm-up of this method (for its timing)
            videos, times = run_all()
            stats = vidprune.stats(pipe)
        finally:
            vidprune.remove(pipe)
        row = summarise(name, config, None, "batched", videos, references, reference_s, times, stats)
        row["forward_keeps"] = [f.keep for f in stats.forwards]
        rows.append(row)
        write()  # so far: a cut run keeps it
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_video", "forward_keeps", "config")}), flush=True)

    with torch.no_grad():
        generate(evaluated[:1], 0)  # warm-up
        if args.references is not None and args.references.is_file():  # an earlier run's, same prompts and call
            saved = torch.load(args.references, weights_only=False)  # our own file: numpy videos
            if saved["info"] != {k: info[k] for k in REFERENCE_KEYS}:
                raise SystemExit(f"{args.references} holds the references of another evaluation: delete it")
            references, reference_times = saved["videos"], saved["times"]
        else:
            references, reference_times = run_all()
            if args.references is not None:
                torch.save({"info": {k: info[k] for k in REFERENCE_KEYS},
                            "videos": references, "times": reference_times}, args.references)
        reference_s = statistics.median(reference_times)
        for name, config in table.items():
            evaluate(name, config)
        if not args.no_calibration:
            for context in ("kept", "full-replayed"):
                base = vidprune.TapeConfig(budget="even", **CONTEXTS[context])
                sync()
                started = time.perf_counter()
                search, sigmas = pipeline_search(pipe, lambda: generate(calibrating, 0, "latent"), steps, base,
                                                 lambda message: print("calibrate:", message, flush=True))
                found = calibrate(search, base, sigmas, TARGETS, (0.0, 0.5), moves=args.moves,
                                  family="WanTransformer3DModel", model="vidprune demo model",
                                  scheduler=type(pipe.scheduler).__name__, guidance_scale=call["guidance_scale"])
                sync()
                calibration_report[context] = {"seconds": time.perf_counter() - started, "calls": search.calls}
                for profile in found:
                    profile.save(args.out / f"demo-{steps}steps-{context}-cost{profile.target_cost:.2f}.json")
                    # the profile's own context on its token steps (a profile of reuse and dense steps only takes "kept")
                    evaluate(f"profile:{profile.target_cost} {context}", base.with_budget(profile))
    print(f"wrote {out_file}")


def field_value(text: str) -> tuple[str, object]:
    """"refresh_every=3" -> ("refresh_every", 3): a number or true/false as JSON reads it, else the text."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def markdown(report: dict) -> str:
    info = report["info"]
    lines = [f"# Full context on the demo model ({info['device'] or 'cpu'})", "",
             f"{info['model']}; {info['evaluation_prompts']} {info.get('prompt_set', 'held-out')} prompts x "
             f"{info['seeds']} seeds = "
             f"{info['evaluation_prompts'] * info['seeds']} videos, each against the unpruned video of the same prompt "
             f"and seed; call {info['call']}. Made by `{info['command']}`.", "",
             "| method | PSNR dB (median) | mean | SSIM | flicker ratio | colour kept | direction kept | mean keep "
             "| block FLOPs computed | token memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['psnr']:.2f} | {row['psnr_mean']:.2f} | {row['ssim']:.3f} | "
                     f"{row['flicker_ratio']:.2f} | {row['colour_kept']:.0%} | {row['direction_kept']:.0%} | "
                     f"{row['mean_keep']:.2f} | {row['flops_computed']:.3f} | {row['token_memory_mib']:.1f} |")
    lines += ["", "Block FLOPs computed: the share of a dense call's, full context's token steps counting every key "
              "in their attention. Times of a CPU run are not speed figures (full-size speed: "
              "benchmarks/context_speed.py on a GPU)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
