"""The full-size speed of every budget and step cache of budget_fidelity.py: a Wan2.1-1.3B-shaped
WanPipeline with **random weights** (latency does not depend on weights), bf16, 480x832x81, the
demo run's step count and CFG, one GPU, everything side by side in one process.

A budget's speed does not depend on weights, and a calibrated cache replays the skip pattern it
chose on the demo model, so each method's call time is predicted from its per-forward pattern
(read from the fidelity run's JSON) and per-forward times measured here:
- a dense forward, token forwards at keeps 0.125-0.75 (between them, linear), a reuse forward
  (spans from layer 2: the first two layers run) and a whole-stack reuse forward (no block runs),
  read from calls whose budgets hold each of them several times;
- MagCache's and FirstBlockCache's skipped forwards, from their fixed-pattern calls;
- the pipeline's own time per call (scheduler, embeddings: the call minus its forwards).
Fixed patterns (MagCache, FirstBlockCache, TaylorSeer at fixed steps) and a few budgets are also
measured as whole calls, to check the prediction. The ceiling of a reuse forward: the forward's
non-block time plus its two unpruned layers, from measured block times.

    python benchmarks/budget_speed.py --fidelity DIR/budget_fidelity.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import shlex
import time
from pathlib import Path

import numpy as np
import torch

import vidprune
from vidprune.bench import ForwardTimer, build_random_pipeline
from vidprune.bench.block_times import BlockTimes
from vidprune.bench.caches import MethodContext, enable_cache_method
from vidprune.budget import BudgetProfile

TOKEN_KEEPS = (0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
WHOLE_STACK = dict(first_pruned_layer=0, reselect_every=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fidelity", type=Path, required=True, help="budget_fidelity.json of the demo run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="wan-1.3b", help="a random-weight Wan shape (wan-tiny: a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()
    fidelity = json.loads(args.fidelity.read_text())
    steps = fidelity["info"]["call"]["num_inference_steps"]
    guidance = fidelity["info"]["call"]["guidance_scale"]
    device = args.device
    cuda = device.startswith("cuda")
    pipe = build_random_pipeline(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    prompt_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    negative_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "model": args.model,
            "weights": "random (latency does not depend on weights)", "dtype": "bfloat16",
            "video": [args.frames, args.height, args.width], "steps": steps, "guidance_scale": guidance,
            "command": "python benchmarks/budget_speed.py " + shlex.join(sys.argv[1:])}
    print(info, flush=True)

    def call(count: int = steps):
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, guidance_scale=guidance,
                    height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=count,
                    output_type="latent", generator=torch.Generator(device).manual_seed(0)).frames

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_gib() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    timer = ForwardTimer(transformer)
    ran = []
    # the last block's feed-forward: a cache's hook can stand in for the block's forward, not run inside it
    last_block = transformer.blocks[-1].ffn.register_forward_hook(lambda m, a, o: ran.append(len(timer.marks)))

    def tape(config: vidprune.TapeConfig):
        """A setup that applies `config`, and one that applies it for a 4-step warm-up call (a
        per-step list: its first four distinct keeps)."""
        if isinstance(config.budget, str):
            return lambda: vidprune.apply(pipe, config), None
        levels = [1.0] + sorted(set(config.budget.keeps if isinstance(config.budget, BudgetProfile) else config.budget) - {1.0})
        warm = (levels + [1.0] * 4)[:4]
        return lambda: vidprune.apply(pipe, config), lambda: vidprune.apply(pipe, config.with_(budget=warm))

    def timed_call(setup=None, teardown=None, warm=None) -> tuple[float, list[float], list[bool]]:
        """(call seconds, per-forward ms, per-forward: ran its last block), after a short warm-up call."""
        (warm or setup or (lambda: None))()
        try:
            call(4)
            if warm is not None:
                setup()
            timer.take()
            ran.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            started = time.perf_counter()
            call()
            sync()
            seconds = time.perf_counter() - started
            forwards = timer.take()
            last = set(ran)
            ran.clear()
            return seconds, forwards, [i + 1 in last for i in range(len(forwards))]
        finally:
            if teardown is not None:
                teardown()
            vidprune.remove(pipe)

    results: dict = {"info": info, "calls": {}, "forward_ms": {}}

    def record(name: str, seconds: float, forwards: list[float], extra: dict | None = None) -> None:
        results["calls"][name] = {"call_s": seconds, "forward_ms_sum": sum(forwards), "forwards": len(forwards),
                                  **(extra or {})}
        print(name, f"{seconds:.2f} s", flush=True)

    with torch.no_grad():
        # -- per-forward times ---------------------------------------------------------------------
        seconds, forwards, _ = timed_call()
        record("unpruned", seconds, forwards, {"peak_memory_gib": peak_gib()})
        results["forward_ms"]["dense"] = statistics.median(forwards)
        overhead = seconds * 1000 - sum(forwards)
        results["pipeline_ms_per_call"] = overhead
        cycle = [1.0, *TOKEN_KEEPS, 0.0]
        keeps = [1.0] + [cycle[1 + i % (len(cycle) - 1)] for i in range(steps - 1)]
        setup, warm = tape(vidprune.TapeConfig(budget=keeps))
        seconds, forwards, _ = timed_call(setup, warm=warm)
        by_keep = {k: [f for f, kk in zip(forwards, [k2 for k2 in keeps for _ in (0, 1)]) if kk == k] for k in set(keeps)}
        for k, times in by_keep.items():
            results["forward_ms"]["reuse" if k == 0 else f"token:{k}" if k < 1 else "dense_through_spans"] = \
                statistics.median(times)
        stack = [1.0 if i % 2 == 0 else 0.0 for i in range(steps)]
        setup, warm = tape(vidprune.TapeConfig(budget=stack, **WHOLE_STACK))
        seconds, forwards, _ = timed_call(setup, warm=warm)
        results["forward_ms"]["reuse_whole_stack"] = statistics.median(
            [f for f, k in zip(forwards, [k for k in stack for _ in (0, 1)]) if k == 0])
        setup = MethodContext(steps=steps)
        for kind, value in (("mag-fixed", 1), ("mag-fixed", 2), ("mag-fixed", 3), ("fbc-fixed", 2), ("fbc-fixed", 3),
                            ("taylor", 3)):
            seconds, forwards, last_ran = timed_call(lambda: enable_cache_method(pipe, kind, value, setup),
                                                     lambda: transformer.disable_cache())
            skipped = [f for f, r in zip(forwards, last_ran) if not r]
            record(f"{kind}:{value}", seconds, forwards, {"computed_forwards": sum(last_ran),
                                                          "skipped_forward_ms": statistics.median(skipped) if skipped else None})
            if kind in ("mag-fixed", "fbc-fixed") and skipped:
                results["forward_ms"][f"{kind.split('-')[0]}_skipped"] = statistics.median(skipped)
        # -- whole budget calls, to check the prediction ----------------------------------------------
        profiles = {name: BudgetProfile(keeps=tuple(p["keeps"])) for name, p in fidelity["profiles"].items()}
        checks = {"even:0.5 (TAPE default)": vidprune.TapeConfig(keep=0.5),
                  "cycle:0.5": vidprune.TapeConfig(keep=0.5, budget="cycle"),
                  "cycle:0.5 whole-stack reuse": vidprune.TapeConfig(keep=0.5, budget="cycle", **WHOLE_STACK)}
        checks.update({name: vidprune.TapeConfig(budget=p) for name, p in profiles.items() if name.startswith("profile:")})
        for name, config in checks.items():
            setup, warm = tape(config)
            seconds, forwards, _ = timed_call(setup, warm=warm)
            record(name, seconds, forwards, {"peak_memory_gib": peak_gib()})

        # -- the ceiling of a reuse forward --------------------------------------------------------------
        latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, device=device,
                              dtype=torch.bfloat16)
        timer.remove()
        last_block.remove()
        block_times = BlockTimes(transformer, dict(hidden_states=latents, timestep=torch.tensor([500.0], device=device),
                                                   encoder_hidden_states=prompt_embeds), repeats=10)
        block_ms = block_times.block_ms(len(transformer.blocks) // 2, block_times.tokens)
        non_block = results["forward_ms"]["dense"] - block_times.blocks_ms()
        first_span = vidprune.TapeConfig().first_pruned_layer
        results["ceiling"] = {"block_ms": block_ms, "non_block_ms": non_block,
                              "reuse_forward_ms": non_block + first_span * block_ms,
                              "whole_stack_reuse_forward_ms": non_block}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_speed.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "info"}, indent=1))


if __name__ == "__main__":
    main()
