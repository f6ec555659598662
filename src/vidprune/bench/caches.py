"""Glue to diffusers' caches: their configurations for the registry's values, FirstBlockCache
with a fixed pattern, MagCache's calibration (read from what diffusers prints)."""

from __future__ import annotations

import ast
import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

from ..adapters import adapter_for
from .models import transformers_of

TAYLOR_MODULES = r"blocks\.\d+\.(attn1|attn2|ffn)"


@dataclass
class MethodContext:
    """What the methods' configurations depend on besides their values."""

    steps: int
    mag_ratios: list[float] | None = None  # calibrated when a "mag" method runs
    lip_grid: tuple[int, int, int] | None = None  # random weights: LIP prunes a fixed mask on this token grid


def cache_config(pipe: Any, kind: str, value: float, setup: MethodContext) -> Any:
    """diffusers' configuration of a cache method (see REGISTRY for what the values mean)."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    n = int(value)
    if kind == "mag":
        return MagCacheConfig(threshold=value, num_inference_steps=setup.steps, mag_ratios=setup.mag_ratios)
    if kind == "mag-fixed":
        return MagCacheConfig(mag_ratios=[1.0] * setup.steps, num_inference_steps=setup.steps, max_skip_steps=n)
    if kind == "taylor":
        return TaylorSeerCacheConfig(cache_interval=n, cache_identifiers=[TAYLOR_MODULES],
                                     taylor_factors_dtype=pipe.transformer.dtype)
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, cross_attention_block_skip_range=2 * n,
            current_timestep_callback=timestep,
        )
    if kind == "faster":
        return FasterCacheConfig(spatial_attention_block_skip_range=n, current_timestep_callback=timestep,
                                 attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True)
    raise ValueError(f"no diffusers cache configuration for {kind!r} (FirstBlockCache: enable_cache_method)")


def enable_cache_method(pipe: Any, kind: str, value: float, setup: MethodContext) -> None:
    """Enable the registry's cache `kind` at `value` on the pipeline (FirstBlockCache on every
    transformer, fixed or by its threshold; the others on `transformer` from cache_config)."""
    if kind in ("fbc", "fbc-fixed"):
        enable_first_block_cache(pipe, value if kind == "fbc" else 0.0, int(value) if kind == "fbc-fixed" else None)
    else:
        pipe.transformer.enable_cache(cache_config(pipe, kind, value, setup))


def fix_first_block_cache(pipe: Any, transformer: torch.nn.Module, every: int) -> None:
    """Replace FirstBlockCache's residual test by a fixed rule: all blocks at every `every`-th step
    of the call, the others only the first block (both CFG branches alike). The step is where the
    pipeline's current timestep sits in its scheduler's timesteps: every family's pipeline sets
    the former, while only Wan's names the step in the cache context."""
    hook = adapter_for(transformer).blocks(transformer)[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)

    def compute_all(residual: torch.Tensor) -> bool:
        return pipe.scheduler.timesteps.tolist().index(float(pipe.current_timestep)) % every == 0

    hook._should_compute_remaining_blocks = compute_all


def enable_first_block_cache(pipe: Any, threshold: float, every: int | None = None) -> None:
    """diffusers' FirstBlockCache on every transformer of the pipeline (Wan2.2 A14B: both
    experts), with the fixed rule of `fix_first_block_cache` when `every` is given."""
    for transformer in transformers_of(pipe):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        if every is not None:
            fix_first_block_cache(pipe, transformer, every)


def calibrate_mag_ratios(pipe: Any, call: Callable[[], Any], steps: int) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, from diffusers' calibration
    mode (one unpruned call), which prints them per CFG branch: the first (conditional) list."""
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            call()
    finally:
        pipe.transformer.disable_cache()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[Mag")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios (diffusers changed?): {printed.getvalue()!r}")
    return [float(r) for r in ast.literal_eval(lists[0])]
