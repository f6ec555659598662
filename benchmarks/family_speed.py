"""TAPE and FirstBlockCache speed on every model family at its usual size (random weights, one GPU).

Latency does not depend on the weights, so random weights (bf16 on a GPU) give the real speed
of the real architectures (`bench.RANDOM_MODELS`; sizes and sources in the adapters'
benchmark_shapes). Per model, side by side in one process:

1. unpruned: the bare transformer forward on the inputs the family's pipeline passes to its
   first forward (captured from a real pipeline call: CFG batch, RoPE tables, masks), with the
   timestep set mid-schedule; median of --repeats after one warm-up forward;
2. block times (`vidprune.block_times.BlockTimes`): every block kind at the full token count and
   at the token counts of TAPE's schedule, measured before the pipeline calls (so those kernels
   are warm); with the unpruned forward they give the ideal pruned forward;
3. TAPE token steps (TapeConfig(keep=--keep, budget="even")): one real pipeline call of --steps steps
   (prompt embeddings, output_type="latent", no VAE), each forward timed; its dense first step
   and pruned steps are reported apart, with the ideal of each forward and measured / ideal
   speedup (= ideal ms / measured ms, target >= 0.9);
4. diffusers' FirstBlockCache, unpruned and stacked on TAPE (vidprune first, as `vidprune bench`
   stacks them): its residual test means nothing on random weights, so a fixed pattern runs
   (`bench.fix_first_block_cache`: all blocks every --fbc-every steps, the first block only at
   the others).
5. With --full-context: the same TAPE call with TapeConfig(context="full") (kept queries attend
   over every token's keys and values), its pruned forwards and its memory.

Peak memory is torch.cuda.max_memory_allocated of each part. Writes family_speed_<family>.json
per family and one family_speed.md to --out, printing as it goes.

    python benchmarks/family_speed.py --out $OUT                       # one H200, all families
    python benchmarks/family_speed.py --device cpu --shape tiny --out /tmp/fs   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vidprune
from vidprune.adapters import ADAPTERS
from vidprune.bench import (ForwardTimer, benchmark_shape, build_random_pipeline, detach, enable_first_block_cache,
                            environment, transformers_of)
from vidprune.bench.block_times import BlockTimes
from vidprune.bench.timing import time_ms
from vidprune.runtime import bind_arguments
from vidprune.budget import plan_keeps
from vidprune.selection import kept_per_frame

FAMILIES = sorted({shape.family for adapter in ADAPTERS for shape in adapter.benchmark_shapes.values()})


class _Captured(Exception):
    """Stops a pipeline call at its first transformer forward, once its inputs are captured."""


def forward_inputs(pipe: Any, call: dict, steps: int) -> dict[str, Any]:
    """The keyword inputs of the pipeline's first transformer forward for `call` (no forward
    runs), with the timestep of step steps // 2 of the call's schedule."""
    captured: dict[str, Any] = {}

    def capture(module, args, kwargs):
        captured.update(bind_arguments(type(module).forward, args, kwargs))
        raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call, num_inference_steps=steps)
    except _Captured:
        pass
    finally:
        handle.remove()
    middle = pipe.scheduler.timesteps[steps // 2]
    captured["timestep"] = torch.full_like(captured["timestep"], float(middle))
    return captured


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def pipeline_call(pipe: Any, call: dict, steps: int, device: str, warmup_calls: int) -> dict:
    """One timed pipeline call (after `warmup_calls` untimed ones): its forwards' ms, seconds, peak memory."""
    timer = ForwardTimer(*transformers_of(pipe))
    try:
        with torch.no_grad():
            for _ in range(warmup_calls):
                pipe(**call, num_inference_steps=steps)
            timer.take()
            reset_peak(device)
            started = time.perf_counter()
            latents = pipe(**call, num_inference_steps=steps).frames
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        forwards = timer.take()
    finally:
        timer.remove()
    parts = latents if isinstance(latents, list) else [latents]  # FramePack's: one tensor a section
    return {"forward_ms": [round(t, 3) for t in forwards], "forward_ms_mean": statistics.mean(forwards),
            "call_s": seconds, "peak_gib": peak_gib(device), "finite_output": all(bool(part.isfinite().all()) for part in parts)}


def measure(name: str, args: argparse.Namespace) -> dict:
    """Everything of the module docstring for the random-weight model `name`."""
    adapter, shape = benchmark_shape(name)
    device, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    pipe = build_random_pipeline(name, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    call = adapter.benchmark_call(shape, device, dtype, torch.Generator().manual_seed(0))
    transformer = pipe.transformer
    report: dict[str, Any] = {"model": name, "source": shape.source, "notes": list(shape.notes),
                              "video": list(shape.video), "steps": args.steps, "fbc_every": args.fbc_every, "build_s": time.perf_counter() - started,
                              "info": environment(transformer)}
    inputs = forward_inputs(pipe, call, args.steps)
    grid = adapter.token_grid(transformer, inputs)
    report.update(tokens=grid.size, grid=[grid.frames, grid.height, grid.width],
                  batch=inputs["hidden_states"].shape[0], timestep=float(inputs["timestep"].flatten()[0]))
    print(f"{name}: built in {report['build_s']:.1f} s; {grid.size} video tokens, batch {report['batch']}", flush=True)

    reset_peak(device)
    with torch.no_grad():
        unpruned = time_ms(lambda: transformer(**inputs), args.repeats, warmup=1)
    report["unpruned"] = {"forward_ms": unpruned, "forward_ms_median": statistics.median(unpruned),
                          "peak_gib": peak_gib(device)}
    print(f"  unpruned forward {report['unpruned']['forward_ms_median']:.1f} ms", flush=True)

    config = vidprune.TapeConfig(keep=args.keep, budget="even")
    # The schedule's keeps (constant schedule: they do not depend on the noise levels), timed
    # first so the pipeline call meets warm kernels at its token counts.
    keeps = sorted(set(plan_keeps(config, [1 - i / args.steps for i in range(args.steps)])))
    blocks = BlockTimes(transformer, inputs, repeats=args.block_repeats)
    for keep in keeps:
        for layer in range(len(blocks.blocks)):
            blocks.block_ms(layer, kept_per_frame(grid, keep) * grid.frames)
    non_block_ms = report["unpruned"]["forward_ms_median"] - blocks.blocks_ms()

    def tape_call(tape_config: vidprune.TapeConfig) -> tuple[dict, list]:
        """One timed call pruned by `tape_config` (left applied), and its forwards' records."""
        vidprune.apply(pipe, tape_config)
        result = pipeline_call(pipe, call, args.steps, device, args.warmup_calls)
        stats = vidprune.stats(pipe)
        pruned = [(ms, r.keep) for ms, r in zip(result["forward_ms"], stats.forwards) if r.keep < 1]
        result.update(mean_keep=stats.mean_keep, token_memory_gib=stats.memory_bytes / 2**30)
        if pruned:
            result.update(pruned_keep=statistics.mean(keep for _, keep in pruned),
                          pruned_forward_ms_median=statistics.median(ms for ms, _ in pruned))
        return result, list(stats.forwards)

    if args.full_context and adapter.supports_full_context:
        report["tape_full_context"], _ = tape_call(config.with_(context="full"))
    tape, records = tape_call(config)  # left applied for the stacked FirstBlockCache below
    fbc = stacked = None
    if args.no_fbc:
        report["notes"].append("no FirstBlockCache rows (--no-fbc)")
    elif adapter.sets_cache_context:
        enable_first_block_cache(pipe, 0.0, args.fbc_every)
        stacked = pipeline_call(pipe, call, args.steps, device, args.warmup_calls)
        stacked["mean_keep"] = vidprune.stats(pipe).mean_keep
        detach(pipe)
        enable_first_block_cache(pipe, 0.0, args.fbc_every)
        fbc = pipeline_call(pipe, call, args.steps, device, args.warmup_calls)
    else:
        report["notes"].append(f"no FirstBlockCache rows: {type(pipe).__name__} sets no cache context, which diffusers' "
                               "FirstBlockCache needs")
    detach(pipe)

    # Ideal of each TAPE forward, measured with no hooks on the blocks.
    ideal = [blocks.pruned_blocks_ms(record) + non_block_ms for record in records]
    pruned = [(ms, best, r.keep) for ms, best, r in zip(tape["forward_ms"], ideal, records) if r.keep < 1]
    tape["forwards"] = [{"keep": round(r.keep, 4), "ms": ms, "ideal_ms": round(best, 3)}
                        for ms, best, r in zip(tape["forward_ms"], ideal, records)]
    tape["ideal_ms_mean"] = statistics.mean(ideal)
    tape["measured_over_ideal_speedup"] = tape["ideal_ms_mean"] / tape["forward_ms_mean"]
    if pruned:
        tape["pruned_ideal_ms_median"] = statistics.median(best for _, best, _ in pruned)
        tape["pruned_measured_over_ideal_speedup"] = tape["pruned_ideal_ms_median"] / tape["pruned_forward_ms_median"]
    report.update(tape=tape, fbc=fbc, tape_fbc=stacked, non_block_ms=non_block_ms, block_ms=blocks.measured(),
                  total_s=time.perf_counter() - started)
    print(markdown_rows(report), flush=True)
    return report


HEADER = ("| model | video tokens | method | keep | forward ms | speedup | ideal ms | measured / ideal speedup "
          "| call s | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_rows(r: dict) -> str:
    """The table rows of one model."""
    base, tape = r["unpruned"]["forward_ms_median"], r["tape"]
    rows = [("unpruned (bare forward, median)", 1.0, base, None, None, None, r["unpruned"]["peak_gib"]),
            ("TAPE default: whole call, mean forward", tape["mean_keep"], tape["forward_ms_mean"], tape["ideal_ms_mean"],
             tape["measured_over_ideal_speedup"], tape["call_s"], tape["peak_gib"])]
    if "pruned_keep" in tape:
        rows.append(("TAPE default: pruned forwards, median", tape["pruned_keep"], tape["pruned_forward_ms_median"],
                     tape["pruned_ideal_ms_median"], tape["pruned_measured_over_ideal_speedup"], None, None))
    if "tape_full_context" in r:
        full = r["tape_full_context"]
        rows += [("TAPE full context: whole call, mean forward", full["mean_keep"], full["forward_ms_mean"], None, None,
                  full["call_s"], full["peak_gib"]),
                 ("TAPE full context: pruned forwards, median", full["pruned_keep"], full["pruned_forward_ms_median"],
                  None, None, None, None)]
    if r["fbc"] is not None:
        rows += [(f"FirstBlockCache (all blocks every {r['fbc_every']} steps): mean forward", 1.0,
                  r["fbc"]["forward_ms_mean"], None, None, r["fbc"]["call_s"], r["fbc"]["peak_gib"]),
                 ("TAPE + FirstBlockCache: mean forward", r["tape_fbc"]["mean_keep"], r["tape_fbc"]["forward_ms_mean"],
                  None, None, r["tape_fbc"]["call_s"], r["tape_fbc"]["peak_gib"])]
    return "\n".join(
        f"| {r['model']} | {r['tokens']} | {method} | {keep:.3f} | {ms:.1f} | {base / ms:.2f}x | {_f(ideal)} "
        f"| {_f(ratio, 3)} | {_f(call_s, 2)} | {_f(peak, 1)} |"
        for method, keep, ms, ideal, ratio, call_s, peak in rows)


def markdown(reports: list[dict], args: argparse.Namespace) -> str:
    device = reports[0]["info"]["device"] if reports else args.device
    lines = [f"# TAPE and FirstBlockCache per model family, {device}", "",
             f"Random weights ({reports[0]['info']['dtype'] if reports else '?'}), one device, {args.steps}-step "
             "pipeline calls with prompt embeddings (output_type=\"latent\", no VAE), bare forwards at a mid-schedule "
             f"timestep. TAPE = TapeConfig(keep={args.keep}, budget=\"even\"); FirstBlockCache with a fixed pattern (all blocks every "
             f"{args.fbc_every} steps). TAPE full context (--full-context, families that have it): the same TAPE call "
             "with context=\"full\" (no ideal here: benchmarks/context_speed.py has it for Wan). Speedup = unpruned forward / forward. Ideal = the unpruned forward's non-block "
             "time + each block's measured time at its token count; measured / ideal speedup = ideal ms / measured ms "
             "(target >= 0.9). Made by `python benchmarks/family_speed.py " + " ".join(sys.argv[1:]) + "`.", "",
             HEADER]
    lines += [markdown_rows(r) for r in reports]
    lines += [""] + [f"- {r['model']}: {r['source']}; video {'x'.join(map(str, r['video']))} (frames x height x width), "
                     f"token grid {'x'.join(map(str, r['grid']))}, forward batch {r['batch']}; "
                     f"{r['info']['transformer_parameters'] / 1e9:.2f}B parameters per transformer; "
                     + "; ".join(r["notes"] + [f"{r['total_s']:.0f} s in all"]) for r in reports]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=FAMILIES)
    parser.add_argument("--shape", choices=("usual", "tiny"), default="usual",
                        help="the published sizes, or each family's tiny model (CPU checks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps of each pipeline call (5: 1 dense + 4 pruned)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed unpruned forwards")
    parser.add_argument("--block-repeats", type=int, default=5)
    parser.add_argument("--fbc-every", type=int, default=2)
    parser.add_argument("--warmup-calls", type=int, default=0, help="untimed pipeline calls before each timed one")
    parser.add_argument("--full-context", action="store_true", help="also TAPE with context=\"full\"")
    parser.add_argument("--no-fbc", action="store_true", help="no FirstBlockCache calls (4. above)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    for family in args.families:
        names = [name for adapter in ADAPTERS for name, shape in adapter.benchmark_shapes.items()
                 if shape.family == family and shape.tiny == (args.shape == "tiny")]
        family_reports = []
        for name in names:
            family_reports.append(measure(name, args))
            gc.collect()  # the model's hooks hold reference cycles: free it before the next one is built
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        (args.out / f"family_speed_{family}.json").write_text(json.dumps(
            {"family": family, "command": " ".join(sys.argv), "models": family_reports}, indent=2))
        reports += family_reports
        (args.out / "family_speed.md").write_text(markdown(reports, args))  # rewritten as families finish
    print(markdown(reports, args))


if __name__ == "__main__":
    main()
