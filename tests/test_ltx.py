"""TAPE on LTX-Video: a tiny random LTXVideoTransformer3DModel, bare and in an LTXPipeline called
with prompt embeddings (no text encoder, no VAE: output_type="latent")."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from diffusers.models.transformers import transformer_ltx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vidprune
from vidprune.adapters import adapter_for
from vidprune.importance import sample_queries
from vidprune.runtime import bind_arguments

from conftest import SMALL_SPANS, assert_exact_and_pruning, forward_after_dense, replay_matches_block

FRAMES, HEIGHT, WIDTH = 3, 8, 8  # token grid of the calls below: 192 tokens, 64 per frame
TEXT = 7


def tiny_ltx(layers: int = 6, seed: int = 0) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    # cross_attention_dim must equal the width: LTX projects the caption to it
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                      cross_attention_dim=24, num_layers=layers, caption_channels=16).eval()


def ltx_inputs(batch: int = 1, seed: int = 0, timestep: float = 700.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, FRAMES * HEIGHT * WIDTH, 8, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=generator),
        timestep=torch.full((batch,), timestep),
        encoder_attention_mask=torch.ones(batch, TEXT),
        num_frames=FRAMES, height=HEIGHT, width=WIDTH, return_dict=False,
    )


@pytest.fixture(scope="module")
def pipe() -> LTXPipeline:
    pipeline = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                           transformer=tiny_ltx())
    # What a VAE compressing 8x in space and 4x in time would set: 9 frames of 64x64 -> 3x8x8 latents.
    pipeline.vae_spatial_compression_ratio, pipeline.vae_temporal_compression_ratio = 8, 4
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    vidprune.remove(pipeline)


def generate(pipeline: LTXPipeline, prompts: int = 1, **overrides) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, prompts, TEXT, 16, generator=generator)
    mask = torch.ones(prompts, TEXT)
    arguments = dict(prompt_embeds=embeds[0], prompt_attention_mask=mask, negative_prompt_embeds=embeds[1],
                     negative_prompt_attention_mask=mask, height=64, width=64, num_frames=9, num_inference_steps=3,
                     output_type="latent", generator=generator)
    return pipeline(**{**arguments, **overrides}).frames


def test_keep_one_and_remove_bit_identical_through_the_pipeline(pipe):
    assert_exact_and_pruning(pipe, generate, SMALL_SPANS)


def test_sigma_is_the_flow_matching_timestep_over_1000(pipe):
    """LTXPipeline passes the scheduler's timestep (sigma * 1000) once per step, both CFG
    branches in one call."""
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, **SMALL_SPANS))
    generate(pipe)
    forwards = vidprune.stats(pipe).forwards
    vidprune.remove(pipe)
    assert [f.step for f in forwards] == [0, 1, 2]
    expected = (pipe.scheduler.timesteps / 1000).tolist()
    assert [f.sigma for f in forwards] == pytest.approx(expected)


def test_batched_cfg_halves_compute_the_same_tokens(pipe):
    """LTXPipeline runs [unconditional; conditional] as one batch: with share_cfg_selection both
    halves compute the conditional half's selection; without, each half selects its own."""
    # refresh_every=0: at this keep the forced refresh alone would pick the tokens, the same in both halves
    config = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, refresh_every=0, record_selections=True, **SMALL_SPANS)
    selections = {}
    for share in (True, False):
        vidprune.apply(pipe, config.with_(share_cfg_selection=share))
        generate(pipe)
        selections[share] = [s.index for f in vidprune.stats(pipe).forwards for s in f.spans if s.index is not None]
    vidprune.remove(pipe)
    assert selections[True] and all(index.shape[0] == 1 for index in selections[True])  # one, for both halves
    assert any(not torch.equal(index[0], index[1]) for index in selections[False])
    # The first pruned span sees the same inputs in both runs: the shared selection is the
    # conditional (second) half's own.
    first_shared, first_own = selections[True][0], selections[False][0]
    assert torch.equal(first_shared[0], first_own[1]) and not torch.equal(first_shared[0], first_own[0])


def test_without_cfg_every_prompt_selects_its_own_tokens(pipe):
    """guidance_scale 1: the batch holds different prompts, not CFG halves, so nothing is shared."""
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, refresh_every=0, record_selections=True,
                                             **SMALL_SPANS))
    generate(pipe, prompts=2, guidance_scale=1.0)
    indices = [s.index for f in vidprune.stats(pipe).forwards for s in f.spans if s.index is not None]
    vidprune.remove(pipe)
    assert indices and any(not torch.equal(index[0], index[1]) for index in indices)


def test_keep_half_computes_half_the_tokens_and_all_text_tokens():
    model = tiny_ltx()
    inputs = ltx_inputs(batch=2)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, first_pruned_layer=1, reselect_every=2))
    assert torch.equal(model(**inputs)[0], reference)
    seen = []  # (block, video tokens into the feed-forward, video tokens and text keys into cross-attention)
    handles = [block.attn2.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.append((i, a[0].shape[1], kw["encoder_hidden_states"].shape[1])), with_kwargs=True)
        for i, block in enumerate(model.transformer_blocks)]
    handles += [block.ff.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[1])))
                for i, block in enumerate(model.transformer_blocks)]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", first_pruned_layer=1,
                                                    reselect_every=2))
    out = model(**inputs)[0]
    for handle in handles:
        handle.remove()
    vidprune.remove(model)
    kept = FRAMES * HEIGHT * WIDTH // 2
    assert sorted(seen) == sorted([(0, 192, TEXT), (0, 192)] + [(i, kept, TEXT) for i in range(1, 6)]
                                  + [(i, kept) for i in range(1, 6)])
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_per_token_timesteps_gather_the_modulation():
    """Image-to-video passes a timestep per token (0 on the conditioning frame): temb is then
    (batch, tokens, 6 * dim) and must be gathered with the kept tokens."""
    model = tiny_ltx()
    inputs = ltx_inputs()
    timestep = torch.full((1, FRAMES * HEIGHT * WIDTH), 700.0)
    timestep[:, : HEIGHT * WIDTH] = 0.0
    inputs["timestep"] = timestep
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, first_pruned_layer=1))
    assert torch.equal(model(**inputs)[0], reference)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", first_pruned_layer=1))
    out = model(**inputs)[0]  # an ungathered per-token temb could not broadcast against the kept tokens
    assert vidprune.stats(model).forwards[-1].sigma == pytest.approx(0.7)
    vidprune.remove(model)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_adapter_query_key_equal_the_models_own(monkeypatch):
    model = tiny_ltx(seed=3)
    captured = {}
    original = transformer_ltx.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        captured.setdefault("qk", (query, key))  # the first call is block 0's self-attention
        return original(query, key, value, **kwargs)

    block_inputs = {}
    block = model.transformer_blocks[0]
    block.register_forward_pre_hook(
        lambda m, a, kw: block_inputs.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    monkeypatch.setattr(transformer_ltx, "dispatch_attention_fn", spy)
    inputs = ltx_inputs(batch=2)
    model(**inputs)
    adapter = adapter_for(model)
    grid = adapter.token_grid(model, inputs)
    query, key = adapter.query_key(block, block_inputs, torch.arange(grid.size))
    model_query, model_key = captured["qk"]  # (batch, tokens, heads, dim)
    torch.testing.assert_close(query, model_query.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key, model_key.transpose(1, 2), rtol=1e-5, atol=1e-5)
    some = sample_queries(grid, 10, seed=0, device=torch.device("cpu"))
    sampled, _ = adapter.query_key(block, block_inputs, some)
    torch.testing.assert_close(sampled, query[:, :, some])


def test_block_replay_is_the_block_on_its_own_branch_outputs():
    model = tiny_ltx(layers=1)
    assert replay_matches_block(model, model.transformer_blocks[0], ltx_inputs())[0]


def test_block_cache_runs_through_the_pipeline(pipe):
    reference = generate(pipe)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block", dense_first=0.3, **SMALL_SPANS))
    out = generate(pipe)
    vidprune.remove(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_block_flops_count_the_blocks_matmuls():
    """The estimate equals the matrix-multiply FLOPs torch counts in one block (projections,
    both attentions, feed-forward), on all tokens and on a pruned subset."""
    model = tiny_ltx(layers=1)
    adapter = adapter_for(model)
    block_inputs = {}
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: block_inputs.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    model(**ltx_inputs())
    for tokens in (192, 40):
        index = torch.arange(tokens).unsqueeze(0)
        inputs = {**block_inputs, **adapter.gather_block_inputs(block_inputs, index)}
        # The math kernel runs attention as matmuls, which the counter sees (CPU's fused one it does not).
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.transformer_blocks[0](**inputs)
        assert adapter.block_flops(model, tokens, context_tokens=TEXT) == counter.get_total_flops()


def test_a_call_without_the_grid_is_refused():
    model = tiny_ltx(layers=2)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, first_pruned_layer=1))
    inputs = {**ltx_inputs(), "num_frames": None}
    with pytest.raises(ValueError, match="num_frames, height and width"):
        model(**inputs)
    with pytest.raises(ValueError, match="192 tokens in hidden_states"):
        model(**{**ltx_inputs(), "num_frames": 2})
    vidprune.remove(model)


@pytest.mark.parametrize("keys", ["replayed", "remembered"])
def test_full_context_with_exact_remembered_states_gives_the_dense_forward(pipe, keys):
    """As for Wan (test_full_context.py): LTX's processor takes the pruned tokens' keys, with its
    RoPE (before the heads split) at their positions and their own modulation."""
    inputs = ltx_inputs(batch=2)
    full = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, context="full", context_keys=keys,
                               **SMALL_SPANS)
    dense, pruned, records = forward_after_dense(pipe, full, inputs)
    assert records[1].keep == 0.5 and records[1].spans[0].keys == FRAMES * HEIGHT * WIDTH
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)
    _, kept, _ = forward_after_dense(pipe, full.with_(context="kept"), inputs)
    assert (kept - dense).abs().max() > 1e-3


def test_full_context_keep_one_and_remove_bit_identical(pipe):
    assert_exact_and_pruning(pipe, generate, SMALL_SPANS, context="full")
