"""TAPE through the diffusers Wan pipelines (T2V, I2V, V2V) on small random models."""

from __future__ import annotations

import pytest
import torch

import vidprune
from vidprune.runtime import HOOK_NAME
from vidprune.selection import kept_per_frame
from vidprune.tokens import TokenGrid

from conftest import SMALL_SPANS, block_tokens, run

KINDS = ("t2v", "i2v", "v2v")
GRID = TokenGrid(3, 4, 4)  # 9 frames at 64x64 -> 3 latent frames of 8x8 -> 3 x 4 x 4 tokens


@pytest.mark.parametrize("kind", KINDS)
def test_keep_one_and_remove_are_bit_identical(clean, kind):
    pipe = clean[kind]
    reference = run(pipe, kind)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0, **SMALL_SPANS))
    assert torch.equal(run(pipe, kind), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.6, **SMALL_SPANS))  # v2v runs 2 steps: 1.0, then 0.2
    assert not torch.equal(run(pipe, kind), reference)
    vidprune.remove(pipe)
    assert torch.equal(run(pipe, kind), reference)
    assert type(pipe).__call__ is type(pipe).__mro__[0].__call__ and not hasattr(pipe, "_vidprune_state")


def test_apply_twice_replaces_cleanly(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))
    once = run(pipe, "t2v")
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))
    assert torch.equal(run(pipe, "t2v"), once)
    blocks = pipe.transformer.blocks
    assert all(list(b._diffusers_hook.hooks).count(HOOK_NAME) == 1 for b in blocks[1:])
    assert type(pipe).__mro__[1].__name__ == type(pipe).__name__  # one subclass level, not two


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_see_only_kept_tokens_and_stats_match(clean, kind):
    pipe = clean[kind]
    config = vidprune.TapeConfig.paper(keep=0.5, schedule="linear", **SMALL_SPANS)
    vidprune.apply(pipe, config)
    with block_tokens(pipe.transformer) as seen:
        run(pipe, kind)
    stats = vidprune.stats(pipe)
    steps = len(stats.forwards) // 2  # CFG: two forwards per step
    assert steps == (3 if kind != "v2v" else 2)
    assert stats.mean_keep == pytest.approx(0.5, abs=1e-6)
    keeps = [f.keep for f in stats.forwards[::2]]
    assert keeps == sorted(keeps) and keeps[0] < keeps[-1]  # linear: fewer tokens while noisy
    layers = len(pipe.transformer.blocks)
    for forward_index, record in enumerate(stats.forwards):
        calls = seen[forward_index * layers : (forward_index + 1) * layers]
        expected = kept_per_frame(GRID, record.keep) * GRID.frames
        assert calls[0] == (0, GRID.size)  # layer 0 is before the first span
        assert all(tokens == expected for _, tokens in calls[1:])
        assert [(s.start, s.end, s.tokens) for s in record.spans] == [(1, 2, expected), (3, 4, expected), (5, 5, expected)]
        assert record.flops_saved > 0
    assert [f.shared_selection for f in stats.forwards] == [False, True] * steps


def test_two_calls_with_one_seed_are_identical(clean):
    pipe = clean["t2v"]
    for config in (vidprune.TapeConfig(budget="even", keep=0.4, **SMALL_SPANS), vidprune.TapeConfig.random(0.4)):
        vidprune.apply(pipe, config)
        first = run(pipe, "t2v")
        first_stats = [f.keep for f in vidprune.stats(pipe).forwards]
        second = run(pipe, "t2v")
        assert torch.equal(first, second)
        assert [f.keep for f in vidprune.stats(pipe).forwards] == first_stats  # stats reset per call


def test_batch_of_prompts_with_dense_steps(clean):
    pipe = clean["t2v"]
    config = vidprune.TapeConfig(budget="even", keep=0.6, dense_first=0.25, dense_last=0.25, **SMALL_SPANS)
    vidprune.apply(pipe, config)
    out = run(pipe, "t2v", prompt=["a red circle", "a blue square"], num_inference_steps=4)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    keeps = [f.keep for f in vidprune.stats(pipe).forwards[::2]]
    assert keeps[0] == 1.0 and keeps[-1] == 1.0 and sum(keeps) / 4 == pytest.approx(0.6, abs=1e-6)


def test_stats_of_unpatched_pipeline_is_an_error(clean):
    with pytest.raises(ValueError, match="vidprune.apply"):
        vidprune.stats(clean["t2v"])
