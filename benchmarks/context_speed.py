"""Full context's speed and memory on full-size Wan transformers (random weights, bf16), one GPU.

Latency does not depend on the weights, so random weights give the real speed of the real
architecture. Side by side in one process, for TAPE token steps (budget "even") at each keep:
kept-only attention (context "kept") and full context from replayed states or remembered keys.

1. The ceiling of a pruned forward: the unpatched forward's non-block work plus, per block, the
   block at its kept token count, plus (full context) the extra attention of the kept queries
   over every key and the pruned tokens' key and value projections, each timed alone.
2. WanPipeline calls with CFG: the median pruned forward (forwards at keep < 1), the whole call,
   the peak memory after the warm-up (torch.cuda.max_memory_allocated) and the token memory
   vidprune holds (stats.memory_bytes).

    python benchmarks/context_speed.py --shape wan-1.3b --out benchmarks/results/context
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vidprune
from vidprune.adapters.wan import WAN_SHAPES
from vidprune.bench import ForwardTimer, build_random_pipeline
from vidprune.bench.block_times import BlockTimes
from vidprune.bench.timing import time_ms
from vidprune.budget import plan_keeps
from vidprune.selection import kept_per_frame
from vidprune.tokens import TokenGrid


def configs(keeps: list[float]) -> dict[str, vidprune.TapeConfig | None]:
    table: dict[str, vidprune.TapeConfig | None] = {"unpatched": None}
    for keep in keeps:
        table[f"kept:{keep}"] = vidprune.TapeConfig(keep=keep, budget="even")
        table[f"full-replayed:{keep}"] = vidprune.TapeConfig(keep=keep, budget="even", context="full")
        table[f"full-replayed-f8:{keep}"] = vidprune.TapeConfig(keep=keep, budget="even", context="full",
                                                                context_storage="float8")
        table[f"full-remembered:{keep}"] = vidprune.TapeConfig(keep=keep, budget="even", context="full",
                                                               context_keys="remembered")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan-1.3b", choices=("wan-1.3b", "wan-14b", "wan-tiny"))
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of the script, no memory figures)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the timed call")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps of each method's untimed call (a dense "
                        "step, then token steps)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--methods", nargs="*", help="only these (and unpatched)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/context"))
    args = parser.parse_args()
    device, cuda = args.device, args.device.startswith("cuda")
    torch.manual_seed(0)
    pipe = build_random_pipeline(args.shape, device, torch.bfloat16 if cuda else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    frames, height, width = WAN_SHAPES[args.shape].video
    grid = TokenGrid((frames - 1) // 4 + 1, height // 16, width // 16)
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    dim = heads * head_dim
    dtype = torch.bfloat16 if cuda else torch.float32
    embeds = [torch.randn(1, 512, 4096, device=device, dtype=dtype) for _ in range(2)]
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "shape": args.shape,
            "video": [frames, height, width], "tokens": grid.size, "steps": args.steps,
            "weights": "random (latency does not depend on weights)", "dtype": "bfloat16",
            "command": "python benchmarks/context_speed.py " + " ".join(sys.argv[1:])}
    print(info, flush=True)

    # -- 1. the ceiling ----------------------------------------------------------------------------
    block_times = BlockTimes(transformer, dict(
        hidden_states=torch.randn(1, 16, grid.frames, height // 8, width // 8, device=device, dtype=dtype),
        timestep=torch.tensor([500.0], device=device), encoder_hidden_states=embeds[0]), repeats=10)
    middle = len(transformer.blocks) // 2
    attention_ms: dict[tuple[int, int], float] = {}

    def attention(queries: int, keys: int) -> float:
        if (queries, keys) not in attention_ms:
            q = torch.randn(1, heads, queries, head_dim, device=device, dtype=dtype)
            k = torch.randn(1, heads, keys, head_dim, device=device, dtype=dtype)
            attention_ms[(queries, keys)] = statistics.median(
                time_ms(lambda: F.scaled_dot_product_attention(q, k, k), 10, 2, cuda))
        return attention_ms[(queries, keys)]

    def projections(tokens: int) -> float:  # the pruned tokens' key and value (with norm and modulation, roughly)
        x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
        w = torch.randn(2 * dim, dim, device=device, dtype=dtype)
        return statistics.median(time_ms(lambda: F.linear(x, w), 10, 2, cuda))

    table = configs(args.keeps)
    if args.methods:
        table = {name: config for name, config in table.items() if name == "unpatched" or name in args.methods}
    # The keeps of the token steps (not the call's mean: the dense first steps take their share),
    # each measured before the calls so they meet warm kernels.
    sigmas = [1 - i / args.steps for i in range(args.steps)]
    token_keeps = sorted({k for c in table.values() if c is not None for k in plan_keeps(c, sigmas) if 0 < k < 1})
    ceiling = {}
    for keep in token_keeps:
        kept = kept_per_frame(grid, keep) * grid.frames
        kept_block = block_times.block_ms(middle, kept)
        extra = attention(kept, grid.size) - attention(kept, kept) + projections(grid.size - kept)
        ceiling[kept] = {"keep": keep, "kept_tokens": kept, "block_ms_kept": kept_block,
                         "block_ms_full_context": kept_block + extra, "attention_ms_kept_keys": attention(kept, kept),
                         "attention_ms_all_keys": attention(kept, grid.size)}
        print("ceiling", ceiling[kept], flush=True)
    block_full = block_times.block_ms(middle, grid.size)

    def ideal_blocks_ms(record) -> float:
        """A pruned forward's blocks at their query (and, full context, key) counts."""
        total = len(transformer.blocks) * block_full
        for span in record.spans:
            if span.tokens < grid.size:
                row = ceiling[span.tokens]
                per_block = row["block_ms_full_context" if span.keys == grid.size else "block_ms_kept"]
                total -= (span.end - span.start + 1) * (block_full - per_block)
        return total

    # -- 2. pipeline calls -----------------------------------------------------------------------
    timer = ForwardTimer(transformer)

    def call(steps: int):
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=5.0, height=height,
                    width=width, num_frames=frames, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator(device).manual_seed(0)).frames

    results = {}
    with torch.no_grad():
        for name, config in table.items():
            vidprune.remove(pipe)
            if config is not None:
                vidprune.apply(pipe, config)
            call(args.warmup_steps)  # warm-up: its kernels at the timed call's token counts
            timer.take()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            started = time.perf_counter()
            latents = call(args.steps)
            if cuda:
                torch.cuda.synchronize()
            call_s = time.perf_counter() - started
            forwards = timer.take()
            entry = {"call_s": call_s, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                     "finite_output": bool(torch.isfinite(latents).all())}
            if config is None:
                entry["forward_ms"] = statistics.median(forwards)
            else:
                stats = vidprune.stats(pipe)
                pruned = [(t, f) for t, f in zip(forwards, stats.forwards) if f.keep < 1.0]
                entry.update(forward_ms=statistics.median(t for t, _ in pruned), pruned_forwards=len(pruned),
                             pruned_keep=statistics.median(f.keep for _, f in pruned),
                             mean_keep=stats.mean_keep, token_memory_gib=stats.memory_bytes / 2**30,
                             span_tokens=stats.forwards[-1].spans[-1].tokens, span_keys=stats.forwards[-1].spans[-1].keys,
                             ideal_blocks_ms=statistics.median(ideal_blocks_ms(f) for _, f in pruned))
            results[name] = entry
            print(name, entry, flush=True)
    vidprune.remove(pipe)
    base = results["unpatched"]
    non_block = base["forward_ms"] - len(transformer.blocks) * block_full
    for entry in results.values():
        entry["forward_speedup"] = base["forward_ms"] / entry["forward_ms"]
        entry["call_speedup"] = base["call_s"] / entry["call_s"]
        entry["memory_over_unpatched_gib"] = entry["peak_memory_gib"] - base["peak_memory_gib"]
        if "ideal_blocks_ms" in entry:
            entry["ideal_forward_ms"] = entry["ideal_blocks_ms"] + non_block
            entry["ideal_over_measured"] = entry["ideal_forward_ms"] / entry["forward_ms"]
    report = {"info": info, "block_ms_all_tokens": block_full, "non_block_ms": non_block, "ceiling": ceiling,
              "methods": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"context_speed_{args.shape}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    info = report["info"]
    lines = [
        f"# Full context speed and memory, {info['shape']} shape, {info['device']}",
        "",
        f"Random weights (latency does not depend on weights), bf16, {info['video'][1]}x{info['video'][2]}x"
        f"{info['video'][0]} = {info['tokens']} tokens, WanPipeline with CFG, {info['steps']} steps (budget 'even': "
        f"dense first 20%, token steps after). Made by `{info['command']}`.",
        "",
        "| method | mean keep | pruned forwards' keep | pruned forward ms | forward speedup | ideal ms | ideal / measured | call s | call speedup "
        "| peak GiB | over unpatched GiB | token memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["methods"].items():
        lines.append(
            f"| {name} | {e.get('mean_keep', 1.0):.2f} | {e.get('pruned_keep', 1.0):.3f} | {e['forward_ms']:.1f} | {e['forward_speedup']:.2f}x | "
            f"{e.get('ideal_forward_ms', float('nan')):.1f} | {e.get('ideal_over_measured', float('nan')):.2f} | "
            f"{e['call_s']:.1f} | {e['call_speedup']:.2f}x | {e['peak_memory_gib']:.1f} | "
            f"{e['memory_over_unpatched_gib']:+.1f} | {e.get('token_memory_gib', 0.0):.2f} |")
    lines += ["", f"Block on all tokens {report['block_ms_all_tokens']:.2f} ms; forward's non-block work "
              f"{report['non_block_ms']:.1f} ms.", "", "| keep | kept tokens | block ms kept-only | block ms full context "
              "(ideal) | attention ms kept keys | attention ms all keys |", "|---|---|---|---|---|---|"]
    for c in report["ceiling"].values():
        lines.append(f"| {c['keep']:.3f} | {c['kept_tokens']} | {c['block_ms_kept']:.2f} | {c['block_ms_full_context']:.2f} | "
                     f"{c['attention_ms_kept_keys']:.2f} | {c['attention_ms_all_keys']:.2f} |")
    lines += ["", "Ideal forward (median over the pruned forwards): the unpatched forward's non-block work, unpruned "
              "layers at all tokens, span layers at the token step's kept count (full context: plus the extra attention over every key and the pruned tokens' key and "
              "value projections, each timed alone)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
