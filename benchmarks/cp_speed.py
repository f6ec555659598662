"""Pruning inside diffusers' context parallelism (Ulysses): per-forward speed on a Wan2.1-shaped
transformer (random weights, bf16), launched with torchrun, one process per GPU.

Rows, each at every resolution: unpruned, TAPE at keep 0.5 (TapeConfig.paper(0.5,
schedule="constant"): attention importance, a reselection every 6 layers, the same keep at
every forward, so each forward stands alone), and LIP on the mask that LIP's detection finds
on real Wan2.1 latents (--latents, 16 x 40 x 64: only at that latent size, the "latents"
resolution). Every rank runs the same bare transformer forwards (timestep 700, random text
embeddings); times are medians over --repeats forwards after --warmup, per rank, CUDA events.

Before enabling parallelism, rank 0 runs every row on its GPU alone (the other ranks wait):
that is the one-GPU baseline of the speedups. With world size 1 only that runs, and it checks
that nothing changed on one GPU (vidprune sees no parallelism; its records match).

    torchrun --nproc-per-node 2 benchmarks/cp_speed.py --shape 14b --out $OUT
    torchrun --nproc-per-node 1 benchmarks/cp_speed.py --shape 14b --out $OUT   # one GPU
    torchrun --nproc-per-node 2 benchmarks/cp_speed.py --shape tiny --device cpu --out /tmp/cp  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

import vidprune
from vidprune.bench import ForwardTimer, benchmark_shape, build_transformer

# Latent (frames, height, width) per resolution: 81 frames -> 21 latent frames, 8x spatial.
RESOLUTIONS = {
    "14b": {"480x832x81": (21, 60, 104), "720x1280x81": (21, 90, 160)},
    "1.3b": {"480x832x81": (21, 60, 104), "720x1280x81": (21, 90, 160)},
    "tiny": {"tiny": (4, 8, 8)},
}


def setup(device: str) -> tuple[int, int, torch.device]:
    if device == "cpu":
        # diffusers picks a rank's device as rank % accelerator count, which divides by zero
        # without an accelerator (diffusers 0.42.1): one "device", the CPU.
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def real_latents(path: Path, shape: str) -> torch.Tensor:
    latents = torch.load(path, map_location="cpu").float()  # (1, 16, F, H, W)
    return latents[:, :, :4, :16, :16] if shape == "tiny" else latents


def rows(latents: torch.Tensor, resolution: str) -> dict:
    """name -> config (None: unpruned) for one resolution."""
    found = {"unpruned": None, "tape-0.5": vidprune.TapeConfig.paper(0.5, schedule="constant")}
    if resolution == "latents":
        found["lip"] = vidprune.LipConfig(source_latents=latents)
    return found


def forward_inputs(grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, *grid, generator=generator).to(device, dtype),
        timestep=torch.full((1,), 700.0, device=device),
        encoder_hidden_states=torch.randn(1, *benchmark_shape("wan-1.3b")[1].text, generator=generator).to(device, dtype),
        return_dict=False,
    )


def measure(model, config, inputs: dict, args, world: int) -> dict:
    """Median forward time (ms) of `config` on `model`, its kept tokens per rank and peak memory."""
    vidprune.remove(model)
    if config is not None:
        vidprune.apply(model, config)
    timer = ForwardTimer(model)
    cuda = inputs["hidden_states"].is_cuda
    with torch.no_grad():
        for _ in range(args.warmup):
            model(**inputs)
        timer.take()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            output = model(**inputs)[0]
    times = timer.take()
    timer.remove()
    entry = {"forward_ms": statistics.median(times), "forward_ms_all": [round(t, 2) for t in times],
             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
             "finite_output": bool(torch.isfinite(output).all())}
    if config is not None:
        record = vidprune.stats(model).forwards[-1]
        entry["mean_keep"] = record.keep
        # Span token counts are totals over the ranks; each rank computes an equal part.
        entry["kept_tokens_per_rank"] = sorted({s.tokens // world for s in record.spans})
        entry["video_tokens"] = record.tokens
        vidprune.remove(model)
    return entry


def run_rows(model, cases: dict, args, world: int, device: torch.device) -> dict:
    results = {}
    for resolution, (grid, configs) in cases.items():
        inputs = forward_inputs(grid, device, model.dtype)
        results[resolution] = {name: measure(model, config, inputs, args, world) for name, config in configs.items()}
    return results


def report(single: dict, parallel: list[dict] | None, world: int, info: dict) -> tuple[dict, str]:
    lines = [f"# Context parallelism (Ulysses, degree {world}) + vidprune, per-forward time", "",
             f"{info}", "",
             "| resolution | row | 1 GPU ms | CP ms (rank 0) | speedup vs CP unpruned | speedup vs 1 GPU unpruned "
             "| kept tokens per rank | peak GiB per rank |", "|---|---|---|---|---|---|---|---|"]
    for resolution, entries in single.items():
        base_single = entries["unpruned"]["forward_ms"]
        for name, entry in entries.items():
            ranks = [p[resolution][name] for p in parallel] if parallel else None
            cp_ms = ranks[0]["forward_ms"] if ranks else None
            base_cp = parallel[0][resolution]["unpruned"]["forward_ms"] if parallel else None
            memory = [r["peak_memory_gib"] for r in ranks] if ranks else [entry["peak_memory_gib"]]
            kept = (ranks[0] if ranks else entry).get("kept_tokens_per_rank") or "all"
            cells = [resolution, name, f"{entry['forward_ms']:.1f}",
                     f"{cp_ms:.1f}" if cp_ms else "-",
                     f"{base_cp / cp_ms:.2f}x" if cp_ms else f"{base_single / entry['forward_ms']:.2f}x (1 GPU)",
                     f"{base_single / cp_ms:.2f}x" if cp_ms else "-", str(kept),
                     ", ".join("-" if m is None else f"{m:.1f}" for m in memory)]
            lines.append("| " + " | ".join(cells) + " |")
    return {"info": info, "single": single, "parallel_per_rank": parallel}, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(RESOLUTIONS), default="14b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--latents", type=Path, default=Path("../shared/data/wan21_latents/test_latents_wan.pth"))
    parser.add_argument("--resolutions", nargs="+", help="only these (default: all of the shape's, and latents)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-single", action="store_true", help="skip the one-GPU baseline on rank 0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank, world, device = setup(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    latents = real_latents(args.latents, args.shape)
    grids = {**RESOLUTIONS[args.shape], "latents": tuple(latents.shape[2:])}
    if args.resolutions:
        grids = {name: grid for name, grid in grids.items() if name in args.resolutions}
    cases = {name: (grid, rows(latents.to(device, dtype), name)) for name, grid in grids.items()}
    model = build_transformer(f"wan-{args.shape}", str(device), dtype)
    info = {"shape": args.shape, "world": world, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "dtype": str(dtype), "grids": grids,
            "weights": "random (latency does not depend on weights)"}
    if rank == 0:
        print(info, flush=True)
    single = run_rows(model, cases, args, 1, device) if rank == 0 and (world == 1 or not args.no_single) else None
    parallel = None
    if world > 1:
        from diffusers import ContextParallelConfig

        dist.barrier()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        mine = run_rows(model, cases, args, world, device)
        parallel = [None] * world
        dist.all_gather_object(parallel, mine)
    if rank == 0:
        results, table = report(single or parallel[0], parallel, world, info)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"cp_speed_{args.shape}_world{world}"
        (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"{name}.md").write_text(table)
        print(table, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
