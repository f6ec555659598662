"""Where a TAPE-pruned forward's time goes, per model (random weights, bf16, one GPU): the
blocks, TAPE's selection at each span start, the gather of the kept tokens' block inputs and
the scatter back, each as a profiler range over one real pipeline call (TapeConfig(keep=0.5, budget="even"),
5 steps, prompt embeddings, output_type="latent"), in GPU time per pruned forward.
Written to find why CogVideoX's pruned forward runs at 0.85 of its ideal (family_speed.md).

    python benchmarks/profile_pruned_forward.py --models cogvideox-5b wan-1.3b --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import vidprune
from vidprune.bench import benchmark_shape, build_random_pipeline
from vidprune.runtime import TokenPruner
from vidprune.tape import TapePruner

RANGES = {  # profiler range -> (owner, method) wrapped
    "vidprune.select": (TapePruner, "select"),
    "vidprune.after_block": (TapePruner, "after_block"),
    "vidprune.finish_span": (TapePruner, "finish_span"),
    "vidprune.begin_forward": (TokenPruner, "begin_forward"),
    "vidprune.end_forward": (TokenPruner, "end_forward"),
}


@contextlib.contextmanager
def ranges(adapter: Any) -> Any:
    """Profiler ranges around the runtime's parts (and the adapter's gather), undone after."""
    wrapped: list[tuple[Any, str, Callable]] = []

    def wrap(owner: Any, method: str, name: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            with record_function(name):
                return original(*args, **kwargs)

        wrapped.append((owner, method, original))
        setattr(owner, method, timed)

    for name, (owner, method) in RANGES.items():
        wrap(owner, method, name)
    wrap(type(adapter), "gather_block_inputs", "vidprune.gather")
    try:
        yield
    finally:
        for owner, method, original in wrapped:
            setattr(owner, method, original)


def profile_model(name: str, steps: int) -> dict:
    adapter, shape = benchmark_shape(name)
    pipe = build_random_pipeline(name, "cuda")
    pipe.set_progress_bar_config(disable=True)
    call = adapter.benchmark_call(shape, "cuda", torch.bfloat16, torch.Generator().manual_seed(0))
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5, budget="even"))
    with torch.no_grad():
        pipe(**call, num_inference_steps=steps)  # warm-up
        torch.cuda.synchronize()
        with ranges(adapter), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pipe(**call, num_inference_steps=steps)
            torch.cuda.synchronize()
    stats = vidprune.stats(pipe)
    pruned = sum(1 for f in stats.forwards if f.keep < 1)
    events = {e.key: e for e in prof.key_averages()}
    total_gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
    parts = {key: {"gpu_ms": events[key].device_time_total / 1000, "cpu_ms": events[key].cpu_time_total / 1000,
                   "calls": events[key].count} for key in [*RANGES, "vidprune.gather"] if key in events}
    top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:15]
    del pipe
    torch.cuda.empty_cache()
    return {"model": name, "steps": steps, "forwards": len(stats.forwards), "pruned_forwards": pruned,
            "spans_per_pruned_forward": max(len(f.spans) for f in stats.forwards),
            "total_gpu_ms": total_gpu_ms, "parts": parts,
            "top_kernels": [{"name": e.key[:90], "gpu_ms": e.self_device_time_total / 1000, "calls": e.count}
                            for e in top]}


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Where a TAPE-pruned forward's time goes (random weights, bf16, NVIDIA H200)", "",
             f"One profiled pipeline call per model (TapeConfig(keep=0.5, budget="even"), its steps' forwards). Made by `{command}`.", "",
             "| model | forwards (pruned) | spans | part | GPU ms in the call | CPU ms in the call | calls |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['forwards']} ({r['pruned_forwards']}) | {r['spans_per_pruned_forward']} "
                     f"| all kernels | {r['total_gpu_ms']:.1f} | | |")
        for part, v in r["parts"].items():
            lines.append(f"| | | | {part} | {v['gpu_ms']:.1f} | {v['cpu_ms']:.1f} | {v['calls']} |")
    for r in results:
        lines += ["", f"Top kernels, {r['model']}:", ""] + [
            f"- {k['name']}: {k['gpu_ms']:.1f} ms ({k['calls']} calls)" for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cogvideox-5b", "wan-1.3b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    results = []
    for name in args.models:
        results.append(profile_model(name, args.steps))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_pruned_forward.json").write_text(json.dumps(results, indent=2))
        text = markdown(results, command)
        (args.out / "profile_pruned_forward.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
