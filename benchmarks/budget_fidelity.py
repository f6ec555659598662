"""One budget over steps and tokens, on the demo model: `vidprune calibrate`'s profiles, the budget
rules and diffusers' step caches (fixed patterns and calibrated) side by side in one process.

1. Calibration on 8 captions of the demo data's training split (never the evaluation prompts):
   profiles at target costs 0.7, 0.5, 0.35, 0.25 over reuse and token steps (levels 0 and 0.5),
   plus two ablations at 0.5: reuse steps only (levels 0) and token steps only (levels 0.5, 0.25).
2. Evaluation on held-out prompts x seeds (the demo model never saw these combinations), each
   video against the unpruned video of the same prompt and seed; batched calls (FirstBlockCache
   with its residual test: one video per call, since it decides for a whole batch).
3. For the full-size speed (benchmarks/budget_speed.py), every method's per-forward pattern: the
   keep of each forward (TAPE) or whether it ran its last block (the step caches).

The demo model is a small test bed (vidprune.demo), not a product model.

    python benchmarks/budget_fidelity.py --device cpu --embeds .gpu/budget_embeds.pt --write-embeds
    python benchmarks/budget_fidelity.py --device cuda --embeds .gpu/budget_embeds.pt --out DIR
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
from vidprune.bench import MethodContext, calibrate_mag_ratios, generation_inputs
from vidprune.bench.caches import enable_cache_method
from vidprune.calibrate import calibrate, pipeline_search
from vidprune.cli_calibrate import demo_calibration_prompts
from vidprune.demo.pipeline import DEFAULT_CALL

from tape_fidelity import demo_pipeline_and_embeds, embeds_generator, summarise

TARGETS = (0.7, 0.5, 0.35, 0.25)
CALIBRATION_PROMPTS = 8


def tape_methods(profiles: dict[str, vidprune.budget.BudgetProfile], steps: int) -> dict[str, vidprune.TapeConfig]:
    table = {}
    for keep in (0.3, 0.5, 0.7):
        table[f"even:{keep} (TAPE default)"] = vidprune.TapeConfig(keep=keep, budget="even")
    for keep in (0.3, 0.4, 0.5, 0.7):
        table[f"cycle:{keep}"] = vidprune.TapeConfig(keep=keep, budget="cycle")
    whole_stack = dict(first_pruned_layer=0, reselect_every=0)  # a reuse step skips every block (as MagCache)
    for keep in (0.3, 0.5):
        table[f"cycle:{keep} whole-stack reuse"] = vidprune.TapeConfig(keep=keep, budget="cycle", **whole_stack)
    for keep in (0.3, 0.5):  # a candidate rule: after the dense start, reuse and token steps alternate
        table[f"mixed:{keep}"] = vidprune.TapeConfig(budget=mixed_keeps(keep, steps, 0.2))
    for name, profile in profiles.items():
        table[name] = vidprune.TapeConfig(budget=profile)
    return table


def mixed_keeps(keep: float, steps: int, dense_first: float) -> list[float]:
    """After the dense first steps, reuse and token steps alternate (reuse first), the token
    steps' keep making the mean `keep`: half the steps' savings from reuse, half from tokens."""
    dense = round(dense_first * steps)
    rest = list(range(dense, steps))
    tokens = rest[1::2]
    token_keep = min(1.0, (keep * steps - dense) / len(tokens))
    return [1.0 if i < dense else token_keep if i in tokens else 0.0 for i in range(steps)]


CACHES = [("mag-fixed", 1), ("mag-fixed", 2), ("mag-fixed", 3), ("mag", 0.06), ("mag", 0.12), ("mag", 0.24),
          ("fbc-fixed", 2), ("fbc-fixed", 3), ("fbc", 0.1), ("fbc", 0.2), ("taylor", 3), ("taylor", 5)]


class ForwardPattern:
    """Per transformer forward: whether its last block ran (a step cache's skipped forward runs
    none, or only the first block)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.ran: list[bool] = []
        self.handles = [transformer.register_forward_pre_hook(lambda m, a: self.ran.append(False)),
                        # the feed-forward inside the last block: a cache's hook can stand in for the
                        # block's forward, but only a computed block runs its feed-forward
                        transformer.blocks[-1].ffn.register_forward_hook(lambda m, a, o: self._mark())]

    def _mark(self) -> None:
        self.ran[-1] = True

    def take(self) -> list[bool]:
        ran, self.ran = self.ran, []
        return ran

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/budget"))
    parser.add_argument("--embeds", type=Path, required=True, help="text embeddings of the prompts: read if the "
                        "file exists (then no text encoder is needed), else computed and written")
    parser.add_argument("--write-embeds", action="store_true", help="only write --embeds, then stop")
    parser.add_argument("--calibration-prompts", type=int, default=CALIBRATION_PROMPTS)
    parser.add_argument("--moves", type=int, default=8, help="measured local-search moves per target")
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL["num_inference_steps"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 targets, few methods")
    parser.add_argument("--caches", nargs="*", help="only these step caches (NAME:VALUE), no calibration or budgets")
    args = parser.parse_args()
    device = args.device
    evaluation = [i.arguments["prompt"] for i in generation_inputs(args.prompts, 1)]
    calibration = demo_calibration_prompts(args.calibration_prompts)
    assert not set(evaluation) & set(calibration), "calibration and evaluation prompts must be disjoint"
    pipe, (positive, negative) = demo_pipeline_and_embeds(evaluation + calibration, args.embeds, device)
    if args.write_embeds:
        return
    pipe.set_progress_bar_config(disable=True)
    call = dict(DEFAULT_CALL, output_type="np", num_inference_steps=args.steps)
    steps = call["num_inference_steps"]
    evaluated, calibrating = list(range(len(evaluation))), list(range(len(evaluation), len(evaluation) + len(calibration)))
    args.out.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generate = embeds_generator(pipe, positive, negative, call, device)

    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "model": "vidprune's demo model (a small test bed, not a product model)",
            "evaluation_prompts": len(evaluation), "seeds": args.seeds, "calibration_prompts": calibration,
            "call": {k: v for k, v in call.items() if k != "output_type"},
            "command": "python benchmarks/budget_fidelity.py " + shlex.join(sys.argv[1:])}
    print(info, flush=True)

    # -- 1. calibration --------------------------------------------------------------------------
    config = vidprune.TapeConfig()
    targets = TARGETS[1:3] if args.quick else TARGETS
    runs = {} if args.caches is not None else {"profile": ((0.0, 0.5), targets)}
    if not args.quick and args.caches is None:
        runs.update({"profile steps-only": ((0.0,), (0.5,)), "profile tokens-only": ((0.5, 0.25), (0.5,))})
    profiles, calibration_report = {}, {}
    with torch.no_grad():
        for kind, (levels, run_targets) in runs.items():
            sync()
            started = time.perf_counter()
            search, sigmas = pipeline_search(pipe, lambda: generate(calibrating, 0, "latent"), steps, config,
                                             lambda message: print("calibrate:", message, flush=True))
            found = calibrate(search, config, sigmas, run_targets, levels, moves=args.moves, family="WanTransformer3DModel",
                              model="vidprune demo model", scheduler=type(pipe.scheduler).__name__,
                              guidance_scale=call["guidance_scale"])
            sync()
            seconds = time.perf_counter() - started
            calibration_report[kind] = {"levels": list(levels), "targets": list(run_targets), "seconds": seconds,
                                        "calls": search.calls}
            print(kind, calibration_report[kind], flush=True)
            for profile in found:
                profile.calibration.update(prompts=len(calibration), device=info["device"], seconds_all_targets=seconds)
                name = f"{kind}:{profile.target_cost}"
                profiles[name] = profile
                profile.save(args.out / f"demo-{steps}steps-{kind.replace(' ', '-')}-cost{profile.target_cost:.2f}.json")
                print(name, profile.to_dict(), flush=True)

    # -- 2. evaluation -----------------------------------------------------------------------------
    everything = evaluated
    batches = {"batched": [everything], "single": [[i] for i in everything]}
    pattern = ForwardPattern(pipe.transformer)

    def run_all(mode: str) -> tuple[dict, list[float], list[list]]:
        videos, times, patterns = {}, [], []
        for seed in range(args.seeds):
            for batch in batches[mode]:
                sync()
                started = time.perf_counter()
                frames = np.asarray(generate(batch, seed))
                sync()
                times.append((time.perf_counter() - started) / len(batch))
                patterns.append(pattern.take())
                videos.update({(i - everything[0], seed): frames[j] for j, i in enumerate(batch)})
        return videos, times, patterns

    table = tape_methods(profiles, steps)
    caches = CACHES[:3] if args.quick else CACHES
    if args.caches is not None:
        table, caches = {}, [(c, v) for c, v in CACHES if f"{c}:{v}" in args.caches]
    rows = []
    with torch.no_grad():
        generate(everything[:1], 0)  # warm-up
        pattern.take()
        references = {}
        needs_single = any(kind == "fbc" for kind, _ in caches)
        for mode in ("batched", "single") if needs_single else ("batched",):
            videos, times, _ = run_all(mode)
            references[mode] = (videos, statistics.median(times))
        setup = MethodContext(steps=steps)
        setup.mag_ratios = calibrate_mag_ratios(pipe, lambda: generate(calibrating[:1], 0), steps)  # calibration prompt
        pattern.take()
        entries = [(name, tape, None) for name, tape in table.items()] + [(f"{k}:{v}", None, (k, v)) for k, v in caches]
        for name, tape, cache in entries:
            if tape is not None:
                vidprune.apply(pipe, tape)
            else:
                enable_cache_method(pipe, cache[0], cache[1], setup)
            mode = "single" if cache is not None and cache[0] == "fbc" else "batched"
            try:
                generate(batches[mode][0], 0)  # warm-up of this method
                pattern.take()
                videos, times, patterns = run_all(mode)
                stats = vidprune.stats(pipe) if tape is not None else None
            finally:
                if cache is not None:
                    pipe.transformer.disable_cache()
                vidprune.remove(pipe)
            row = summarise(name, tape, None if cache is None else cache, mode, videos, *references[mode], times, stats)
            row["forward_ran_last_block"] = patterns[0]
            row["computed_forwards_mean"] = float(np.mean([sum(p) for p in patterns]))
            row["forwards_per_call"] = len(patterns[0])
            if stats is not None:
                row["forward_keeps"] = [f.keep for f in stats.forwards]
                row["config"] = repr(tape)
            rows.append(row)
            write_report(args.out, info, calibration_report, profiles, references, rows)  # so far: a cut run keeps it
            print(json.dumps({k: v for k, v in row.items() if k not in ("per_video", "forward_ran_last_block",
                                                                          "forward_keeps", "config")}), flush=True)
    pattern.remove()
    print(f"wrote {args.out / 'budget_fidelity.json'}")


def write_report(out: Path, info: dict, calibration: dict, profiles: dict, references: dict, rows: list) -> None:
    report = {"info": info, "calibration": calibration,
              "profiles": {name: profile.to_dict() for name, profile in profiles.items()},
              "reference_s_per_video": {m: r[1] for m, r in references.items()}, "rows": rows}
    (out / "budget_fidelity.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
