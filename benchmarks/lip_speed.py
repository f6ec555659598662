"""LIP speed in WanVideoToVideoPipeline on a full-size Wan2.1-1.3B-shaped transformer (random
weights, bf16) on one GPU, with the keep mask detected on real Wan2.1 latents.

The real latents (../shared/data/wan21_latents/test_latents_wan.pth, 16 x 40 x 64, a
low-motion clip) are the source video: the pipeline gets them noised to the first step of the
edit (latents=...) and LIP gets them as LipConfig(source_latents=...). Random weights give the
real speed of the architecture (latency does not depend on the weights); they say nothing of
quality. Methods run side by side in one process; per-forward times are CUDA-event medians
from the second of two identical calls.

    python benchmarks/lip_speed.py --latents ../shared/data/wan21_latents/test_latents_wan.pth

--graphs: eager rows, then the same methods with vidprune.compile_blocks(pipe, graphs=True,
compile=False) (pruned spans as CUDA graphs; with --compile also torch.compiled blocks), with
GPU kernel time per forward; writes lip_speed_<shape>_graphs.{json,md}. `--device cpu --shape
tiny` is a dry run of it on the CPU (synthetic latents, graphs.EagerReplayGraph as the graph).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from diffusers import WanVideoToVideoPipeline

import vidprune
from vidprune.bench import ForwardTimer, build_random_pipeline
from vidprune.interframe import keep_mask, prune_report

from tape_speed import measure_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=Path, default=Path("../shared/data/wan21_latents/test_latents_wan.pth"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--tape-keep", type=float, default=0.5, help="TAPE's keep among LIP's kept tokens (lip-tape rows)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--profile", action="store_true", help="also compare GPU kernel time with wall time per forward")
    parser.add_argument("--compile", action="store_true",
                        help="after the eager rows, vidprune.compile_blocks and every method again in the same "
                             "process (rows ' (compiled)'); results go to lip_speed_1.3b_compiled.*")
    parser.add_argument("--methods", nargs="+", help="run only these rows (default: all; unpruned always runs)")
    parser.add_argument("--graphs", action="store_true",
                        help="eager rows, then with compile_blocks(graphs=True): lip_speed_<shape>_graphs.{json,md}")
    parser.add_argument("--quick", action="store_true", help="--graphs: 10-step calls (default --steps otherwise)")
    parser.add_argument("--shape", choices=["1.3b", "14b", "tiny"], default="1.3b", help="--graphs: transformer shape")
    parser.add_argument("--device", default="cuda", help="--graphs: cuda, or cpu for a dry run with --shape tiny")
    args = parser.parse_args()
    if args.graphs:
        from lip_speed_graphs import run_graphs

        run_graphs(args, make_call)
        return
    if args.shape != "1.3b" or args.device != "cuda" or args.quick:
        parser.error("--shape, --device and --quick are for --graphs")
    device = "cuda"
    torch.manual_seed(0)

    source = torch.load(args.latents, map_location="cpu").to(device=device, dtype=torch.float32)  # (1, 16, F, H, W)
    pipe = build_random_pipeline("wan-1.3b", device, pipeline=WanVideoToVideoPipeline)
    transformer = pipe.transformer
    pipe.set_progress_bar_config(disable=True)
    mask = keep_mask(source, (1, 2, 2))
    report = prune_report(mask)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "latents": list(source.shape),
        "tokens": int(mask[0].numel()),
        "prune_ratio": float(report.overall[0]),
        "prune_ratio_per_frame": [round(float(r), 3) for r in report.per_frame[0]],
        "weights": "random (latency does not depend on weights)",
        "compiled_blocks": args.compile,
    }
    print(info, flush=True)

    call = make_call(pipe, source, args.strength)

    methods = {
        "unpruned": None,
        "lip-noar": vidprune.LipConfig(recovery=False, source_latents=source),
        "lip": vidprune.LipConfig(source_latents=source),
        "lip-dup2": vidprune.LipConfig(duplicates=2, source_latents=source),
        "lip-clean-kv": vidprune.LipConfig(kv_source="clean", source_latents=source),
        # TAPE prunes among the tokens LIP keeps (half of them, on average over the steps).
        "lip-noar-tape": vidprune.LipConfig(recovery=False, tape=vidprune.TapeConfig(keep=args.tape_keep, budget="even"),
                                            source_latents=source),
        "lip-tape": vidprune.LipConfig(tape=vidprune.TapeConfig(keep=args.tape_keep, budget="even"), source_latents=source),
    }
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            parser.error(f"unknown --methods {', '.join(unknown)}; accepted: {', '.join(methods)}")
        methods = {name: config for name, config in methods.items() if name == "unpruned" or name in args.methods}
    timer = ForwardTimer(transformer)
    results = {}
    modes = [""] + [" (compiled)"] * args.compile  # the eager rows first: compiling cannot be undone
    for mode in modes:
        if mode:
            vidprune.remove(pipe)
            vidprune.compile_blocks(pipe)
        with torch.no_grad():
            for name, config in methods.items():
                entry = measure_calls(pipe, config, call, args.steps, timer)
                entry["kept_fraction"] = entry.pop("mean_keep", 1.0)
                results[name + mode] = entry
                print(name + mode, {k: v for k, v in entry.items() if k != "forward_ms"}, flush=True)
        if args.profile:
            for name in [name for name in ("unpruned", "lip-noar", "lip", "lip-noar-tape", "lip-tape") if name in methods]:
                kernel_ms = kernel_time_per_forward(pipe, methods[name], call, timer)
                results[name + mode]["gpu_kernel_ms_per_forward"] = kernel_ms
                print(name + mode, "GPU kernel ms per forward", kernel_ms, flush=True)
    vidprune.remove(pipe)
    if args.compile:  # one graph per distinct block code path; many more would mean recompiles
        from torch._dynamo.utils import counters

        info["dynamo"] = {"unique_graphs": counters["stats"]["unique_graphs"], "frames": dict(counters["frames"])}
    for mode in modes:
        base = results["unpruned" + mode]  # each mode's speedups are over its own unpruned rows
        for name in methods:
            entry = results[name + mode]
            entry["speedup_forward"] = base["forward_ms_median"] / entry["forward_ms_median"]
            entry["speedup_call"] = base["call_s"] / entry["call_s"]
            entry["speedup_call_over_eager_unpruned"] = results["unpruned"]["call_s"] / entry["call_s"]
        for name, without in (("lip", "lip-noar"), ("lip-dup2", "lip-noar"), ("lip-clean-kv", "lip-noar"),
                              ("lip-tape", "lip-noar-tape")):
            if name in methods and without in methods:
                results[name + mode]["recovery_cost_over_noar"] = (
                    results[name + mode]["forward_ms_median"] / results[without + mode]["forward_ms_median"] - 1)

    args.out.mkdir(parents=True, exist_ok=True)
    name = "lip_speed_1.3b_compiled" if args.compile else "lip_speed_1.3b"
    (args.out / f"{name}.json").write_text(json.dumps({"info": info, "methods": results}, indent=2))
    text = markdown(info, results, args)
    (args.out / f"{name}.md").write_text(text)
    print(text)


def make_call(pipe, source: torch.Tensor, strength: float) -> Callable[[int], torch.Tensor]:
    """call(steps): the pipeline's edit of `source` (1, 16, F, H, W) at `strength`, from latents
    noised to the edit's first step with a fixed noise, random text embeddings, CFG on; returns
    the latents."""
    device, scheduler = source.device, pipe.scheduler
    prompt_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    negative_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def call(steps: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        first = scheduler.timesteps[steps - int(steps * strength)]
        noise = torch.randn(source.shape, generator=torch.Generator(device).manual_seed(0), device=device)
        sigma = first / 1000
        noisy = ((1 - sigma) * source + sigma * noise).to(torch.bfloat16)
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=noisy,
                    strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                    height=source.shape[3] * 8, width=source.shape[4] * 8, output_type="latent").frames

    return call


def kernel_time_per_forward(pipe, config, call, timer: ForwardTimer) -> float:
    """Sum of GPU kernel times per transformer forward (a forward whose wall time is well above
    this is bound by the CPU launching kernels, not by the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    vidprune.remove(pipe)
    if config is not None:
        vidprune.apply(pipe, config)
    with torch.no_grad():
        call(5)
        timer.take()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call(5)
    forwards = len(timer.take())
    total_us = sum(event.self_device_time_total for event in prof.key_averages())
    return total_us / 1000 / forwards


def markdown(info: dict, results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"# LIP speed, WanVideoToVideoPipeline, Wan2.1-1.3B-shaped transformer, {info['device']}"
        + (", eager and with compiled blocks" if args.compile else ""),
        "",
        f"Random weights (latency does not depend on weights), bf16, torch {info['torch']}. Source: real Wan2.1 "
        f"latents {info['latents']} ({info['tokens']} tokens) of a low-motion clip (taehv example files); default "
        f"detection (tau 0.149, tau2 0.3, all clean-up stages) prunes {info['prune_ratio']:.1%} of the tokens. "
        f"{args.steps} steps at strength {args.strength} with CFG (two forwards a step). The -tape rows add TAPE "
        f"at keep {args.tape_keep} among LIP's kept tokens (default schedule; their recovery cost is over "
        "lip-noar-tape). "
        + ("Rows ' (compiled)': the same methods after vidprune.compile_blocks (each block's forward "
           "torch.compiled, dynamic shapes, before vidprune wraps it), in the same process after the eager rows; "
           "compilation happens in the warm-up calls; their speedup is over the compiled unpruned row, the last "
           "column's over the eager one. " if args.compile else "")
        + f"Made by `python benchmarks/lip_speed.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
        "| method | kept | forward ms (median) | GPU kernel ms per forward | speedup | call s | call speedup | recovery cost (over the same without recovery) | peak GiB | call speedup over eager unpruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        cost = e.get("recovery_cost_over_noar")
        lines.append(
            f"| {name} | {e.get('kept_fraction', 1.0):.3f} | {e['forward_ms_median']:.1f} | "
            f"{e.get('gpu_kernel_ms_per_forward', float('nan')):.1f} | {e['speedup_forward']:.2f}x | "
            f"{e['call_s']:.2f} | {e['speedup_call']:.2f}x | {'' if cost is None else f'{cost:+.1%}'} | "
            f"{e['peak_memory_gib']:.1f} | {e['speedup_call_over_eager_unpruned']:.2f}x |"
        )
    lines += ["", "Prune ratio per latent frame: " + ", ".join(f"{r:.2f}" for r in info["prune_ratio_per_frame"])]
    if "dynamo" in info:
        lines += ["", f"torch.compile made {info['dynamo']['unique_graphs']} graph(s) in all (frames: {info['dynamo']['frames']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
