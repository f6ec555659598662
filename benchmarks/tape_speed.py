"""TAPE speed on a full-size Wan2.1-shaped transformer (random weights, bf16) on one GPU.

Latency does not depend on the weights, so random weights give the real speed of the real
architecture. Everything is measured side by side in one process:

1. per-block time at every token count used (the ceiling: a pruned forward can at best cost
   the sum of its blocks' times at their token counts, plus the forward's non-block work);
2. median transformer forward per denoising step, inside real WanPipeline calls (CFG on, two
   forwards a step), for: unpatched, TAPE at constant keep, TAPE with the default schedule,
   naive per-frame pruning and random pruning; plus whole-call times;
3. the cost of scoring, gather and scatter, timed alone at the span size.

    python benchmarks/tape_speed.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import vidprune
from vidprune.adapters import adapter_for
from vidprune.bench import ForwardTimer, build_random_pipeline
from vidprune.bench.block_times import BlockTimes
from vidprune.bench.timing import time_ms
from vidprune.importance import attention_received, sample_queries
from vidprune.budget import plan_keeps
from vidprune.selection import kept_per_frame, select_per_frame, smooth_over_time
from vidprune.tokens import TokenGrid, scatter_tokens


def cuda_time(fn, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` runs of fn after two warm-up runs, timed with CUDA events."""
    return time_ms(fn, repeats, warmup=2, cuda=True)


def measure_calls(pipe, config, call, steps: int, timer: ForwardTimer) -> dict:
    """Apply `config` (None: unpatched), warm up, then time two identical calls: the first meets
    new token counts, the second is steady state. Forward times are the second call's."""
    vidprune.remove(pipe)
    if config is not None:
        vidprune.apply(pipe, config)
    call(4)  # warm-up (enough steps for any budget plan)
    timer.take()
    torch.cuda.reset_peak_memory_stats()
    call_s = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        latents = call(steps)
        torch.cuda.synchronize()
        call_s.append(time.perf_counter() - started)
        forwards = timer.take()
    entry = {
        "forward_ms_median": statistics.median(forwards),
        "forward_ms_mean": statistics.mean(forwards),
        "call_s": call_s[1],
        "first_call_s": call_s[0],
        "forwards": len(forwards),
        "forward_ms": [round(t, 2) for t in forwards],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "finite_output": bool(torch.isfinite(latents).all()),
    }
    if config is not None:
        entry["mean_keep"] = vidprune.stats(pipe).mean_keep
        entry["block_flops_saved"] = vidprune.stats(pipe).flops_saved
        entry["token_memory_gib"] = vidprune.stats(pipe).memory_bytes / 2**30
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("1.3b", "14b", "tiny"), default="1.3b", help="a Wan2.1 shape (bench.RANDOM_MODELS)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of each timed pipeline call")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--block-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--profile", action="store_true", help="also profile a TAPE call by operator")
    parser.add_argument("--methods", nargs="*", help="only these methods (and unpatched)")
    parser.add_argument("--name", help="output file name stem (default: tape_speed, or tape_speed_compiled)")
    parser.add_argument("--compile", action="store_true", help="vidprune.compile_blocks for every method, unpatched included")
    args = parser.parse_args()
    args.name = args.name or ("tape_speed_compiled" if args.compile else "tape_speed")
    device = "cuda"
    torch.manual_seed(0)

    pipe = build_random_pipeline(f"wan-{args.shape}", device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        vidprune.compile_blocks(pipe)
    transformer, scheduler = pipe.transformer, pipe.scheduler
    adapter = adapter_for(transformer)
    latent_frames = (args.frames - 1) // 4 + 1
    latents_shape = (1, 16, latent_frames, args.height // 8, args.width // 8)
    grid = TokenGrid(latent_frames, args.height // 16, args.width // 16)
    prompt_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    negative_embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    num_layers = len(transformer.blocks)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": args.shape,
        "video": [args.frames, args.height, args.width],
        "tokens": grid.size,
        "grid": [grid.frames, grid.height, grid.width],
        "weights": "random (latency does not depend on weights)",
        "dtype": "bfloat16",
        "attention": "PyTorch SDPA via diffusers",
        "compiled_blocks": args.compile,
    }
    print(info, flush=True)

    # -- 1. per-block times at each token count ----------------------------------------------
    block_times = BlockTimes(transformer, dict(
        hidden_states=torch.randn(latents_shape, device=device, dtype=torch.bfloat16),
        timestep=torch.tensor([500.0], device=device), encoder_hidden_states=prompt_embeds,
    ), repeats=args.block_repeats)
    block = transformer.blocks[num_layers // 2]  # the block BlockTimes times (Wan's blocks are of one kind)
    captured = block_times.inputs[type(block)]

    def time_block(tokens: int) -> float:
        return block_times.block_ms(num_layers // 2, tokens)

    for ratio in (1.0, 0.75, 0.5, 0.4, 0.3, 0.2):
        time_block(kept_per_frame(grid, ratio) * grid.frames)

    # -- 2. pipeline calls ---------------------------------------------------------------------
    timer = ForwardTimer(transformer)
    methods = {
        "unpatched": None,
        f"tape_default_{args.keep}": vidprune.TapeConfig(keep=args.keep, budget="even"),
        f"tape_block_cache_{args.keep}": vidprune.TapeConfig(keep=args.keep, budget="even", cache="block"),
        f"tape_constant_nodense_{args.keep}": vidprune.TapeConfig(keep=args.keep, budget="even", dense_first=0.0),
        f"paper_{args.keep}": vidprune.TapeConfig.paper(args.keep),
        f"naive_{args.keep}": vidprune.TapeConfig.naive(args.keep),
        f"random_{args.keep}": vidprune.TapeConfig.random(args.keep),
    }
    if args.methods:
        methods = {name: config for name, config in methods.items() if name == "unpatched" or name in args.methods}

    def call(steps: int):
        return pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, guidance_scale=5.0,
            height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps,
            output_type="latent", generator=torch.Generator(device).manual_seed(0),
        ).frames

    results = {}
    with torch.no_grad():
        for name, config in methods.items():
            entry = measure_calls(pipe, config, call, args.steps, timer)
            if config is not None:
                stats = vidprune.stats(pipe)
                # The ceiling: every forward's non-block work plus its blocks at their token counts.
                entry["ideal_blocks_ms_mean"] = statistics.mean(map(block_times.pruned_blocks_ms, stats.forwards))
                entry["keeps"] = [round(r.keep, 4) for r in stats.forwards[::2]]
            results[name] = entry
            print(name, {k: v for k, v in entry.items() if k not in ("keeps", "forward_ms")}, flush=True)
    vidprune.remove(pipe)

    base = results["unpatched"]
    non_block_ms = base["forward_ms_median"] - block_times.blocks_ms()
    for entry in results.values():
        entry["speedup_forward_median"] = base["forward_ms_median"] / entry["forward_ms_median"]
        entry["speedup_call"] = base["call_s"] / entry["call_s"]
        if "ideal_blocks_ms_mean" in entry:
            entry["ideal_forward_ms_mean"] = entry["ideal_blocks_ms_mean"] + non_block_ms
            entry["measured_over_ideal"] = entry["forward_ms_mean"] / entry["ideal_forward_ms_mean"]

    # -- 3. the cost of selection, gather and scatter at one span start ------------------------
    config = vidprune.TapeConfig(keep=args.keep, budget="even")
    queries = sample_queries(grid, config.query_samples, 0, device)
    hidden = captured["hidden_states"]

    def score_and_select():
        q, k = adapter.query_key(block, captured, queries)
        scores = smooth_over_time(attention_received(q, k), grid, config.temporal_sigma, config.temporal_radius)
        return select_per_frame(scores, grid, args.keep)

    with torch.no_grad():
        index = score_and_select()
        kept = adapter.gather_block_inputs(captured, index)["hidden_states"]
        overhead = {
            "select_ms": statistics.median(cuda_time(score_and_select, 10)),
            "gather_ms": statistics.median(cuda_time(lambda: adapter.gather_block_inputs(captured, index), 10)),
            "scatter_ms": statistics.median(cuda_time(lambda: scatter_tokens(hidden, index, kept), 10)),
        }
    spans = len(config.span_starts(num_layers))
    overhead["spans_per_forward"] = spans
    overhead["per_forward_ms"] = spans * (overhead["select_ms"] + overhead["gather_ms"] + overhead["scatter_ms"])
    reference = results.get(f"paper_{args.keep}", next(iter(results.values())))
    overhead["fraction_of_paper_forward"] = overhead["per_forward_ms"] / reference["forward_ms_median"]

    report = {
        "info": info,
        "block_ms": {str(k): v for k, v in block_times.measured()["WanTransformerBlock"].items()},
        "non_block_ms": non_block_ms,
        "methods": results,
        "overhead": overhead,
        "schedule_keeps_default": plan_keeps(config, [t / 1000 for t in scheduler.timesteps.tolist()]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.name}_{args.shape}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report, args))
    print(markdown(report, args))
    if args.profile:
        profile(pipe, call, args.out / f"{stem}_profile.txt")


def profile(pipe, call, path: Path) -> None:
    """Where the time of a TAPE (default schedule) call goes, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    vidprune.apply(pipe, vidprune.TapeConfig(budget="even"))
    with torch.no_grad():
        call(2)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call(2)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    path.write_text(table)
    print(table)
    vidprune.remove(pipe)


def markdown(report: dict, args: argparse.Namespace) -> str:
    info = report["info"]
    lines = [
        f"# TAPE speed, Wan2.1-{info['shape']}-shaped transformer, {info['device']}",
        "",
        f"Random weights (latency does not depend on weights), bf16, {info['attention']}, torch {info['torch']}, "
        f"{info['video'][1]}x{info['video'][2]}x{info['video'][0]} video = {info['tokens']} tokens "
        f"(grid {'x'.join(map(str, info['grid']))}). WanPipeline calls of {args.steps} steps with CFG "
        f"(2 forwards a step), UniPC flow_shift 3.0. "
        + ("Every method, unpatched included, with its blocks compiled (vidprune.compile_blocks, dynamic shapes; "
           "compilation happens in the warm-up call). " if info.get("compiled_blocks") else "")
        + "Made by `python benchmarks/tape_speed.py " + " ".join(sys.argv[1:]) + "`.",
        "",
        "| method | mean keep | forward ms (median) | speedup | ideal forward ms | measured / ideal | call s | call speedup | first call s | peak GiB | token memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["methods"].items():
        lines.append(
            f"| {name} | {e.get('mean_keep', 1.0):.3f} | {e['forward_ms_median']:.1f} | {e['speedup_forward_median']:.2f}x"
            f" | {e.get('ideal_forward_ms_mean', float('nan')):.1f} | {e.get('measured_over_ideal', float('nan')):.3f}"
            f" | {e['call_s']:.2f} | {e['speedup_call']:.2f}x | {e['first_call_s']:.2f} | {e['peak_memory_gib']:.1f}"
            f" | {e.get('token_memory_gib', 0.0):.2f} |"
        )
    lines += [
        "",
        "Ideal forward = the unpatched forward's non-block time + the sum of per-block times at each block's token "
        "count (mean over the call's forwards); measured / ideal compares it with the measured mean forward. "
        "Times are from the second of two identical calls (steady state); the first call's time is shown too.",
        "",
        "| tokens | block ms |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["block_ms"].items()]
    o = report["overhead"]
    lines += [
        "",
        f"Selection (scoring + smoothing + top-k) {o['select_ms']:.2f} ms, gather {o['gather_ms']:.2f} ms, scatter "
        f"{o['scatter_ms']:.2f} ms per span; {o['spans_per_forward']} spans per forward = {o['per_forward_ms']:.2f} ms, "
        f"{o['fraction_of_paper_forward']:.1%} of the paper preset's forward.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
