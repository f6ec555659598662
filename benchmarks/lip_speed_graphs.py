"""`lip_speed.py --graphs`: LIP's pruned forwards eager, then with their spans as CUDA graphs
(vidprune.compile_blocks(pipe, graphs=True, compile=False); with --compile, compile=True), in
one process, in WanVideoToVideoPipeline edits of real latents (random weights, bf16).

Per row: the median forward wall time (CUDA events) of the second of two identical calls, its
speedup over the eager unpruned row, and the GPU kernel time per forward over the forwards
after the fourth of another call (a graphed call's first two forwards run eagerly, its third
captures, see vidprune/graphs.py). Graph rows also give how their spans ran and how far their
output latents are from the eager row's (relative L2; bf16 rounding differs a little between
kernels launched one by one and replayed).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import WanVideoToVideoPipeline

import vidprune
from vidprune.bench import ForwardTimer, build_random_pipeline
from vidprune.graphs import EagerReplayGraph
from vidprune.interframe import keep_mask, prune_report
from vidprune.patch import _GRAPHS_ATTRIBUTE

TARGETS = {"lip-noar": 3.5, "lip": 3.0}  # issue 15: speedup per forward over eager unpruned


def tiny_source(device: torch.device) -> torch.Tensor:
    """Latents (1, 16, 5, 8, 8) for the CPU dry run: frames 1-4 repeat frame 0 but for a moving
    patch, so LIP prunes the static tokens."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(1, 16, 1, 8, 8, generator=generator).repeat(1, 1, 5, 1, 1)
    for frame in range(1, 5):
        source[:, :, frame, 2:4, 2 * frame - 2 : 2 * frame] = torch.randn(1, 16, 2, 2, generator=generator)
    return source.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PROFILED_STEPS = 5  # the warm-up call's steps, and the profiled call's


def measure(pipe: Any, config: Any, call: Callable[[int], torch.Tensor], steps: int, timer: ForwardTimer,
            device: torch.device) -> dict:
    """Apply `config` (None: unpatched), warm up, time two identical calls (the second's forwards)."""
    vidprune.remove(pipe)
    if config is not None:
        vidprune.apply(pipe, config)
    call(PROFILED_STEPS)
    timer.take()
    call_s = []
    for _ in range(2):
        synchronize(device)
        started = time.perf_counter()
        latents = call(steps)
        synchronize(device)
        call_s.append(time.perf_counter() - started)
        forwards = timer.take()
    entry = {"forward_wall_ms": statistics.median(forwards), "call_s": call_s[1], "forwards": len(forwards),
             "latents": latents.float().cpu()}
    if config is not None:
        stats = vidprune.stats(pipe)
        entry["kept_fraction"] = stats.mean_keep
        entry["graph_spans"] = dict(collections.Counter(s.graph for f in stats.forwards for s in f.spans if s.graph))
    return entry


def kernel_ms(call: Callable[[int], torch.Tensor], steps: int, transformer: torch.nn.Module,
              device: torch.device) -> float:
    """Kernel time per forward (on a CPU: operator time, for the dry run) over forwards 5 to
    the last of a call of `steps`: the profiler starts at the fifth
    forward's start, after the call's graph capture (at its third), and stops after the call.
    (A profiler schedule stepped per forward dropped events of some cycles: in the first GPU
    run, the graph rows' unpruned forwards, which replay nothing, read a third of the eager
    row's kernel time.)"""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    profiler = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    seen = [0]

    def start_at_fifth(*_: Any) -> None:
        seen[0] += 1
        if seen[0] == 5:
            synchronize(device)
            profiler.start()

    handle = transformer.register_forward_pre_hook(start_at_fifth)
    try:
        call(steps)
        synchronize(device)
    finally:
        handle.remove()
        if seen[0] >= 5:
            profiler.stop()
    if seen[0] < 5:
        raise RuntimeError(f"the profiled call ran {seen[0]} forwards: kernel time needs at least 5")
    events = profiler.key_averages()
    total_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
    return total_us / 1000 / (seen[0] - 4)


def enable_graphs(pipe: Any, device: torch.device, compile: bool) -> None:
    vidprune.remove(pipe)
    if device.type == "cuda":
        vidprune.compile_blocks(pipe, graphs=True, compile=compile)
        return
    # CPU dry run: the capture logic with the stand-in graph (compile_blocks refuses graphs on
    # the CPU); compiled blocks through dynamo's eager backend (no C++ compiler needed).
    setattr(pipe.transformer, _GRAPHS_ATTRIBUTE, lambda: EagerReplayGraph)
    if compile:
        vidprune.compile_blocks(pipe, backend="eager")


def run_graphs(args: argparse.Namespace, make_call: Callable) -> None:
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    device = torch.device(args.device)
    if (device.type == "cpu") != (args.shape == "tiny"):
        raise SystemExit("--graphs: --shape tiny is for --device cpu (a dry run), 1.3b and 14b for cuda")
    steps = 10 if args.quick else args.steps
    torch.manual_seed(0)
    if args.shape == "tiny":
        source = tiny_source(device)
    else:
        source = torch.load(args.latents, map_location="cpu").to(device=device, dtype=torch.float32)
    pipe = build_random_pipeline(f"wan-{args.shape}", str(device), pipeline=WanVideoToVideoPipeline)
    pipe.set_progress_bar_config(disable=True)
    call = make_call(pipe, source, args.strength)
    report = prune_report(keep_mask(source, (1, 2, 2)))
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "shape": args.shape, "latents": list(source.shape),
        "tokens": source.shape[2] * source.shape[3] * source.shape[4] // 4, "prune_ratio": float(report.overall[0]),
        "steps": steps, "strength": args.strength, "tape_keep": args.tape_keep, "compiled_blocks": args.compile,
        "command": "python benchmarks/lip_speed.py " + " ".join(sys.argv[1:]),
    }
    log(f"built the {args.shape} pipeline; {info}")
    methods = {
        "unpruned": None,
        "lip-noar": vidprune.LipConfig(recovery=False, source_latents=source),
        "lip": vidprune.LipConfig(source_latents=source),
        "lip-noar-tape": vidprune.LipConfig(recovery=False, tape=vidprune.TapeConfig(keep=args.tape_keep, budget="even"),
                                            source_latents=source),
        "lip-tape": vidprune.LipConfig(tape=vidprune.TapeConfig(keep=args.tape_keep, budget="even"), source_latents=source),
    }
    timer = ForwardTimer(pipe.transformer)
    rows, eager_latents = [], {}
    # Compiling cannot be undone, so it comes last; results are written after each mode.
    modes = {"eager": "", "graphs": " (graphs)", **({"graphs, compiled": " (graphs, compiled)"} if args.compile else {})}
    with torch.no_grad():
        for mode, suffix in modes.items():
            if mode != "eager":
                enable_graphs(pipe, device, compile=mode == "graphs, compiled")
            for name, config in methods.items():
                entry = measure(pipe, config, call, steps, timer, device)
                entry["kernel_ms"] = kernel_ms(call, PROFILED_STEPS, pipe.transformer, device)
                latents = entry.pop("latents")
                if mode == "eager":
                    eager_latents[name] = latents
                else:
                    expected = eager_latents[name]
                    entry["output_rel_diff_vs_eager"] = float((latents - expected).norm() / expected.norm())
                entry["speedup"] = (rows[0]["forward_wall_ms"] if rows else entry["forward_wall_ms"]) / entry["forward_wall_ms"]
                rows.append({"method": name + suffix, "mode": mode, **entry})
                log(f"{rows[-1]['method']}: {entry}")
            write(args.out / f"lip_speed_{args.shape}_graphs", info, rows)
            log(f"wrote {args.out}/lip_speed_{args.shape}_graphs.json and .md ({mode} rows done)")
    vidprune.remove(pipe)
    print(markdown(info, rows))


def write(stem: Path, info: dict, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"device": info["device"], "info": info, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(info, rows))


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [
        f"# LIP speed with CUDA graphs, Wan2.1-{info['shape']}-shaped transformer, {info['device']}",
        "",
        (
            f"Random weights, bf16, torch {info['torch']}. Source latents {info['latents']} ({info['tokens']} tokens); LIP's "
            f"default detection prunes {info['prune_ratio']:.1%} of them. WanVideoToVideoPipeline edits of {info['steps']} "
            f"steps at strength {info['strength']}, CFG on; lip-tape adds TAPE at keep {info['tape_keep']} among LIP's kept "
            f"tokens. Rows ' (graphs)': after `vidprune.compile_blocks(pipe, graphs=True, compile=False)`, pruned spans run "
            "as CUDA graphs (captured at a call's third forward); ' (graphs, compiled)': then also "
            "`compile_blocks(pipe, graphs=True)` (blocks torch.compiled, dynamic shapes; compiled in the warm-up calls). "
            "Spans: how the second timed call's spans ran (eager: a shape's first two sightings). Forward wall: "
            "median of the second of two identical calls; speedup over the eager unpruned row; "
            "kernel ms: GPU kernel time per forward over forwards 5 and later of a 5-step call (graph rows: if far below "
            "the eager row's, the profiler did not see the kernels inside graph replays). "
            f"Made by `{info['command']}`."
        ),
        "",
        "| method | kept | forward wall ms | kernel ms | speedup | call s | spans (how they ran) | output rel. diff vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = r.get("output_rel_diff_vs_eager")
        lines.append(
            f"| {r['method']} | {r.get('kept_fraction', 1.0):.3f} | {r['forward_wall_ms']:.1f} | {r['kernel_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['call_s']:.2f} | {r.get('graph_spans', '')} | "
            f"{'' if diff is None else f'{diff:.2e}'} |"
        )
    lines.append("")
    for method, target in TARGETS.items():
        for r in rows:
            if r["method"].split(" ")[0] == method and r["mode"] != "eager":
                met = "met" if r["speedup"] >= target else "not met"
                lines.append(f"- target {method} >= {target}x per forward, {r['mode']}: {r['speedup']:.2f}x ({met})")
    return "\n".join(lines) + "\n"
