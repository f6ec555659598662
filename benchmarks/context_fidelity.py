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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/context"))
    parser.add_argument("--embeds", type=Path, required=True, help="text embeddings of the prompts (read if the file "
                        "exists, else computed and written: benchmarks/budget_fidelity.py --write-embeds)")
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL["num_inference_steps"])
    parser.add_argument("--moves", type=int, default=8, help="measured local-search moves per target")
    parser.add_argument("--no-calibration", action="store_true", help="only the fixed budgets")
    parser.add_argument("--only", nargs="*", help="only these methods of the fixed budgets (none: calibration only)")
    parser.add_argument("--name", default="context_fidelity", help="stem of the JSON written to --out")
    args = parser.parse_args()
    device = args.device
    evaluation = [i.arguments["prompt"] for i in generation_inputs(args.prompts, 1)]
    calibration = demo_calibration_prompts(8)
    assert not set(evaluation) & set(calibration), "calibration and evaluation prompts must be disjoint"
    pipe, (positive, negative) = demo_pipeline_and_embeds(evaluation + calibration, args.embeds, device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(DEFAULT_CALL, output_type="np", num_inference_steps=args.steps)
    steps = args.steps
    evaluated = list(range(len(evaluation)))
    calibrating = list(range(len(evaluation), len(evaluation) + len(calibration)))
    args.out.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generate = embeds_generator(pipe, positive, negative, call, device)

    def run_all() -> tuple[dict, list[float]]:
        videos, times = {}, []
        for seed in range(args.seeds):
            sync()
            started = time.perf_counter()
            frames = np.asarray(generate(evaluated, seed))
            sync()
            times.append((time.perf_counter() - started) / len(evaluated))
            videos.update({(i, seed): frames[i] for i in evaluated})
        return videos, times

    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "model": "vidprune's demo model (a small test bed, not a product model)",
            "evaluation_prompts": len(evaluation), "seeds": args.seeds, "calibration_prompts": calibration,
            "call": {k: v for k, v in call.items() if k != "output_type"},
            "command": "python benchmarks/context_fidelity.py " + shlex.join(sys.argv[1:])}
    print(info, flush=True)
    table = methods(steps)
    if args.only is not None:
        table = {name: config for name, config in table.items() if name in args.only}
    rows, calibration_report = [], {}
    out_file = args.out / f"{args.name}.json"

    def write() -> None:
        out_file.write_text(json.dumps({"info": info, "calibration": calibration_report,
                                        "reference_s_per_video": reference_s, "rows": rows}, indent=1))

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
        references, reference_times = run_all()
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
                    fields = CONTEXTS[context] if any(0.0 < k < 1.0 for k in profile.keeps) else {}
                    evaluate(f"profile:{profile.target_cost} {context}", vidprune.TapeConfig(budget=profile, **fields))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
