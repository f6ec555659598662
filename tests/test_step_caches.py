"""diffusers' step caches enabled after vidprune.apply: FirstBlockCache decides from its first
block's output, so that block must run on all tokens (refused otherwise, before any block runs);
MagCache reads only the first block's input and the last block's output, full length around any
span, so it stacks with every span (tiny random pipelines of three families, and LIP on Wan)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig
from diffusers.hooks import mag_cache

import vidprune
from vidprune.bench import benchmark_shape, build_random_pipeline, enable_first_block_cache

from conftest import run

STEPS = 4
FAMILIES = ["wan-tiny", "ltx-video-tiny", "hunyuanvideo-tiny"]


def tiny_pipeline(name: str):
    """A tiny random pipeline of the family and a function calling it for STEPS steps."""
    adapter, shape = benchmark_shape(name)
    pipe = build_random_pipeline(name, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def call() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe(**adapter.benchmark_call(shape, "cpu", torch.float32, generator), num_inference_steps=STEPS).frames

    return pipe, adapter, call


def tape(first_pruned_layer: int) -> vidprune.TapeConfig:
    return vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, first_pruned_layer=first_pruned_layer, reselect_every=2)


def mag_cache_config(steps: int = STEPS) -> MagCacheConfig:
    """MagCache skipping every other step from the first (constant ratios, no retention)."""
    return MagCacheConfig(mag_ratios=[1.0] * steps, num_inference_steps=steps, max_skip_steps=1, retention_ratio=0.0)


@pytest.fixture
def mag_cache_warnings(monkeypatch) -> list[str]:
    """MagCache's warnings, such as the one it gives when it drops its residual for a shape mismatch."""
    warnings: list[str] = []
    monkeypatch.setattr(mag_cache.logger, "warning", lambda message, *args: warnings.append(message))
    return warnings


def feed_forward(block: torch.nn.Module) -> torch.nn.Module:
    """The block's MLP: a cache that skips the block returns before reaching it, and TAPE's
    scoring (which runs the first norm and attention projections) does not use it."""
    return next(getattr(block, name) for name in ("ffn", "ff", "proj_mlp") if hasattr(block, name))


@contextlib.contextmanager
def block_calls(blocks) -> Iterator[dict[str, int]]:
    """How often the first and the last block computed, counted on their MLPs."""
    calls = {"first": 0, "last": 0}
    handles = [feed_forward(block).register_forward_pre_hook(
        lambda *args, which=which: calls.__setitem__(which, calls[which] + 1))
        for which, block in (("first", blocks[0]), ("last", blocks[-1]))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_first_block_cache_on_a_pruned_first_block_is_refused_before_any_block_runs(name):
    pipe, adapter, call = tiny_pipeline(name)
    vidprune.apply(pipe, tape(first_pruned_layer=0))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with block_calls(adapter.blocks(pipe.transformer)) as calls, pytest.raises(ValueError) as refused:
        call()
    assert calls == {"first": 0, "last": 0}
    message = str(refused.value)
    assert message.startswith("diffusers' FirstBlockCache decides from block 0's output, which vidprune prunes")
    assert "TapeConfig(first_pruned_layer >= 1)" in message and "\n" not in message
    pipe.transformer.disable_cache()
    vidprune.remove(pipe)  # the refusal left the patch removable


def test_first_block_cache_enabled_before_apply_is_refused_too():
    pipe, adapter, call = tiny_pipeline("wan-tiny")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    vidprune.apply(pipe, tape(first_pruned_layer=0))  # vidprune's hook now wraps the cache's
    with pytest.raises(ValueError, match=r"first_pruned_layer >= 1"):
        call()


@pytest.mark.parametrize("name", FAMILIES)
def test_first_block_cache_stacks_when_the_first_block_runs_on_all_tokens(name):
    pipe, adapter, call = tiny_pipeline(name)
    vidprune.apply(pipe, tape(first_pruned_layer=1))
    enable_first_block_cache(pipe, 0.0, every=2)  # all blocks at steps 0 and 2, the first block only at 1 and 3
    with block_calls(adapter.blocks(pipe.transformer)) as calls:
        video = call()
    forwards = vidprune.stats(pipe).forwards
    assert torch.isfinite(video).all()
    assert calls["last"] * 2 == calls["first"] == len(forwards)  # the cache skipped every other step
    assert sum(bool(forward.spans) for forward in forwards) == calls["last"]  # every computed step pruned
    pipe.transformer.disable_cache()
    vidprune.remove(pipe)


@pytest.mark.parametrize("name", FAMILIES)
def test_mag_cache_stacks_with_a_pruned_first_and_last_block(name, mag_cache_warnings):
    pipe, adapter, call = tiny_pipeline(name)
    vidprune.apply(pipe, tape(first_pruned_layer=0))  # spans over every block, the first and the last included
    pipe.transformer.enable_cache(mag_cache_config())
    with block_calls(adapter.blocks(pipe.transformer)) as calls:
        video = call()
    forwards = vidprune.stats(pipe).forwards
    assert torch.isfinite(video).all() and mag_cache_warnings == []
    assert 0 < calls["first"] == calls["last"] < len(forwards)  # some steps skipped, the others computed
    assert sum(forward.spans[0].start == 0 for forward in forwards if forward.spans) == calls["first"]
    pipe.transformer.disable_cache()
    vidprune.remove(pipe)


def test_lip_refuses_first_block_cache_and_stacks_with_mag_cache(clean, mag_cache_warnings):
    """LIP prunes from block 0 whatever its configuration: FirstBlockCache is refused, naming
    MagCache, which stacks."""
    pipe = clean["v2v"]
    vidprune.apply(pipe, vidprune.LipConfig())
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="LIP prunes from block 0, so stack it with MagCache instead"):
        run(pipe, "v2v", num_inference_steps=STEPS)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(mag_cache_config(steps=3))  # strength 0.8 of 4 steps: 3 run
    with block_calls(pipe.transformer.blocks) as calls:
        edited = run(pipe, "v2v", num_inference_steps=STEPS)
    forwards = vidprune.stats(pipe).forwards
    assert torch.isfinite(edited).all() and mag_cache_warnings == []
    assert 0 < calls["first"] < len(forwards) and vidprune.stats(pipe).mean_keep < 1
    pipe.transformer.disable_cache()


def test_first_block_cache_with_reuse_steps_is_refused_before_any_block_runs():
    """TAPE's default budget (reuse steps) already skips whole steps, FirstBlockCache's first block too."""
    pipe, _, call = tiny_pipeline("wan-tiny")
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    ran = []
    handle = feed_forward(pipe.transformer.blocks[0]).register_forward_hook(lambda m, a, o: ran.append(1))
    try:
        with pytest.raises(ValueError, match="both skip whole steps.*use one of them"):
            call()
    finally:
        handle.remove()
        pipe.transformer.disable_cache()
        vidprune.remove(pipe)
    assert ran == []
