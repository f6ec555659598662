"""One rank of the context-parallel tests (test_context_parallel.py spawns two of these on
gloo). Each rank builds the same tiny Wan, runs the single-process references itself, then
enables diffusers' context parallelism and runs the same scenarios; what it saw goes to
`out/rank{r}.pt` for the test process to compare."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

import vidprune
from conftest import SMALL_SPANS, tiny_transformer, transformer_inputs
from vidprune.interframe import reference_index
from vidprune.parallel import balance_keep
from vidprune.tokens import TokenGrid


def cpu_ring_backend() -> None:
    """diffusers 0.42.1 has no context-parallel attention backend that returns the log-sum-exp
    ring attention needs on the CPU (native SDPA refuses return_lse; the others are GPU
    kernels). For the test only: point its native-flash op at torch's CPU flash kernel."""
    from diffusers.models import attention_dispatch

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, scale=scale)[:2]
        out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
        return (out, lse) if return_lse else out

    attention_dispatch._native_flash_attention_forward_op = forward_op


def kept_tokens(model) -> list:
    """Tokens each block's feed-forward saw, in call order (plain torch hooks, rank-local)."""
    seen = []
    for block in model.blocks:
        block.ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    return seen


def lip_mask(frames: int, rng_seed: int = 1) -> torch.Tensor:
    """An uneven keep mask over a (frames, 4, 4) grid: frame 0 whole, later frames sparse, so
    the first rank's chunk holds far more kept tokens than the second's."""
    generator = torch.Generator().manual_seed(rng_seed)
    mask = torch.rand(frames, 4, 4, generator=generator) < 0.3
    mask[0] = True
    return mask


def scenarios(mode: str, frames: int) -> dict:
    """name -> (config or None, inputs); the same on every rank."""
    inputs = transformer_inputs(frames=frames)
    mask = lip_mask(frames)
    # Source latents whose left half stands still after frame 0: LIP's detection prunes there.
    source = transformer_inputs(frames=frames, seed=5)["hidden_states"]
    source[..., 1:, :, :4] = source[..., :1, :, :4]
    detection = vidprune.LipDetection(median=False, cleanup=False, dilate=False)  # a 4 x 4 grid: no dilation
    tape = dict(record_selections=True, **SMALL_SPANS)
    return {
        "unpruned": (None, inputs),
        "tape_1.0": (vidprune.TapeConfig.paper(1.0, **tape), inputs),
        "tape_0.5": (vidprune.TapeConfig.paper(0.5, **tape), inputs),
        "tape_0.5_global": (vidprune.TapeConfig.paper(0.5, per_frame=False, **tape), inputs),
        "lip": (vidprune.LipConfig(mask=mask), inputs),
        "lip_noar": (vidprune.LipConfig(mask=mask, recovery=False), inputs),
        "lip_clean": (vidprune.LipConfig(source_latents=source, kv_source="clean", detection=detection), inputs),
    }


def run_all(model, cases: dict) -> dict:
    results = {}
    for name, (config, inputs) in cases.items():
        seen = kept_tokens(model)
        if config is not None:
            vidprune.apply(model, config)
        with torch.no_grad():
            output = model(**inputs)[0]
        record = vidprune.stats(model).forwards[-1] if config is not None else None
        results[name] = dict(
            output=output,
            block_tokens=list(seen),
            spans=[(s.start, s.tokens, s.index) for s in record.spans] if record is not None else [],
        )
        vidprune.remove(model)
        for block in model.blocks:
            block.ffn._forward_pre_hooks.clear()
    return results


def pipeline_scenarios(world: int) -> dict:
    """TAPE with its cache and refreshing score (state across the steps of a pipeline call),
    single-process and under Ulysses, on a tiny WanPipeline: outputs and kept counts."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from conftest import pipeline_inputs
    from vidprune.demo.random_pipeline import build_random_wan_pipeline

    pipe = build_random_wan_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    config = vidprune.TapeConfig(budget="even", keep=0.5, record_selections=True, **SMALL_SPANS)
    results = {}
    for where in ("single", "parallel"):
        if where == "parallel":
            cp = ContextParallelConfig(ulysses_degree=world)
            cp.mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
            pipe.transformer.enable_parallelism(config=cp)
        seen = kept_tokens(pipe.transformer)
        vidprune.apply(pipe, config)
        frames = pipe(**pipeline_inputs("t2v", num_frames=13)).frames  # 4 latent frames: none split
        forwards = vidprune.stats(pipe).forwards
        results[where] = dict(output=frames, block_tokens=list(seen),
                              spans=[[(s.start, s.tokens, s.index) for s in f.spans] for f in forwards])
        vidprune.remove(pipe)
        for block in pipe.transformer.blocks:
            block.ffn._forward_pre_hooks.clear()
    return results


def worker(rank: int, world: int, port: int, mode: str, frames: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # diffusers picks the rank's device as rank % accelerator count, which is 0 without one.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        if mode == "pipeline":
            results.update(pipeline_scenarios(world))
        else:
            results.update(transformer_scenarios(mode, frames, world))
    except Exception:  # noqa: BLE001 - reported to the test process
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def transformer_scenarios(mode: str, frames: int, world: int) -> dict:
    """The bare-transformer scenarios, single-process then under `mode` attention."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    results: dict = {}
    if mode == "ring":
        cpu_ring_backend()
    model = tiny_transformer()
    if mode == "ring":
        model.set_attention_backend("_native_flash")
    cases = scenarios(mode, frames)
    results["single"] = run_all(model, cases)
    # The LIP references under parallelism prune with the balanced mask: run that
    # mask single-process too.
    grid = TokenGrid(frames, 4, 4)
    keep = lip_mask(frames).flatten()
    balanced = balance_keep(keep, reference_index(keep.view(1, frames, 4, 4))[0], grid, world)
    results["balanced_mask"] = balanced
    results["single"]["lip_balanced"] = run_all(model, {"lip": (vidprune.LipConfig(mask=balanced.view(frames, 4, 4)),
                                                                cases["lip"][1])})["lip"]
    mesh_shape = (world, 1) if mode == "ring" else (1, world)
    config = (ContextParallelConfig(ring_degree=world) if mode == "ring"
              else ContextParallelConfig(ulysses_degree=world))
    config.mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("ring", "ulysses"))
    model.enable_parallelism(config=config)
    results["parallel"] = run_all(model, cases)
    # Applied before enable_parallelism: the hooks are reordered the other way round.
    fresh = tiny_transformer()
    if mode == "ring":
        fresh.set_attention_backend("_native_flash")
    vidprune.apply(fresh, cases["lip"][0])
    fresh.enable_parallelism(config=config)
    with torch.no_grad():
        results["applied_first_lip"] = fresh(**cases["lip"][1])[0]
    vidprune.remove(fresh)
    with torch.no_grad():
        results["removed_unpruned"] = fresh(**cases["unpruned"][1])[0]
    # A combination that cannot work is refused at the first forward.
    vidprune.apply(model, vidprune.LipConfig(mask=lip_mask(frames), tape=vidprune.TapeConfig.paper(0.5)))
    try:
        model(**cases["unpruned"][1])
    except ValueError as error:
        results["refused"] = str(error)
    vidprune.remove(model)
    return results
