"""TAPE on CogVideoX: a tiny random CogVideoXTransformer3DModel, bare and in a CogVideoXPipeline
called with prompt embeddings (no text encoder, no VAE: output_type="latent")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vidprune
from vidprune.adapters import adapter_for
from vidprune.importance import sample_queries
from vidprune.runtime import bind_arguments, pruner_of

from conftest import SMALL_SPANS, assert_exact_and_pruning, forward_after_dense

FRAMES, HEIGHT, WIDTH = 3, 8, 8  # token grid of the calls below: 192 tokens, 64 per frame
TOKENS = FRAMES * HEIGHT * WIDTH
TEXT = 7
PIXELS = 128  # 128 px / VAE factor 8 = 16 latents / patch 2 = 8 tokens


def tiny_cogvideox(layers: int = 6, seed: int = 0, rope: bool = True, **config) -> CogVideoXTransformer3DModel:
    torch.manual_seed(seed)
    # head_dim 16: the 3-D RoPE splits it 4 (time) + 6 + 6 (space)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=layers, sample_width=16, sample_height=16, sample_frames=9,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=rope, **config,
    ).eval()


def tiny_pipeline(rope: bool = True, scheduler=None) -> CogVideoXPipeline:
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_cogvideox(rope=rope),
                                 scheduler=scheduler or CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def model_inputs(model: CogVideoXTransformer3DModel, batch: int = 1, frames: int = FRAMES, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rope = None
    if model.config.use_rotary_positional_embeddings:  # the tables the pipeline would pass
        helper = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                   scheduler=CogVideoXDDIMScheduler())
        rope = helper._prepare_rotary_positional_embeddings(PIXELS, PIXELS, frames, torch.device("cpu"))
    return dict(
        hidden_states=torch.randn(batch, frames, 4, 2 * HEIGHT, 2 * WIDTH, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=generator),
        timestep=torch.full((batch,), 700), image_rotary_emb=rope, return_dict=False,
    )


@pytest.fixture(scope="module")
def pipe() -> CogVideoXPipeline:
    pipeline = tiny_pipeline()
    yield pipeline
    vidprune.remove(pipeline)


def generate(pipeline: CogVideoXPipeline, prompts: int = 1, **overrides) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, prompts, TEXT, 16, generator=generator)
    arguments = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=PIXELS, width=PIXELS,
                     num_frames=9, num_inference_steps=3, max_sequence_length=TEXT, output_type="latent",
                     generator=generator)
    return pipeline(**{**arguments, **overrides}).frames


def test_keep_one_and_remove_bit_identical_through_the_pipeline(pipe):
    assert_exact_and_pruning(pipe, generate, SMALL_SPANS)


@pytest.mark.parametrize("scheduler", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_sigma_is_the_timestep_over_1000_at_every_step(scheduler):
    """CogVideoXPipeline passes the scheduler's integer timestep (in [0, 1000)) once per step, both
    CFG branches in one call; timestep / 1000 falls with the noise, which is all TAPE's
    schedule needs of it, and the default config finds its steps in scheduler.timesteps."""
    pipeline = tiny_pipeline(scheduler=scheduler(timestep_spacing="trailing"))
    vidprune.apply(pipeline, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))
    generate(pipeline)
    forwards = vidprune.stats(pipeline).forwards
    vidprune.remove(pipeline)
    assert [f.step for f in forwards] == [0, 1, 2]
    assert [f.sigma for f in forwards] == pytest.approx((pipeline.scheduler.timesteps / 1000).tolist())


def test_batched_cfg_halves_compute_the_conditional_halfs_tokens():
    """[unconditional; conditional] in one batch: with share_cfg_selection both halves compute the
    conditional half's selection; without, each half its own (possible without RoPE only)."""
    pipeline = tiny_pipeline(rope=False)
    config = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, refresh_every=0, record_selections=True, **SMALL_SPANS)
    selections = {}
    for share in (True, False):
        vidprune.apply(pipeline, config.with_(share_cfg_selection=share))
        generate(pipeline)
        selections[share] = [s.index for f in vidprune.stats(pipeline).forwards for s in f.spans if s.index is not None]
    vidprune.remove(pipeline)
    assert selections[True] and all(index.shape[0] == 1 for index in selections[True])  # one, for both halves
    assert any(not torch.equal(index[0], index[1]) for index in selections[False])
    # Up to the first span whose halves select differently both runs compute the same tokens, so
    # that span sees the same inputs in both: the shared selection is the conditional (second) half's.
    shared, own = selections[True], selections[False]
    first = next(i for i, index in enumerate(own) if not torch.equal(index[0], index[1]))
    assert all(torch.equal(shared[i][0], own[i][0]) and torch.equal(own[i][0], own[i][1]) for i in range(first))
    assert torch.equal(shared[first][0], own[first][1]) and not torch.equal(shared[first][0], own[first][0])


def test_samples_selecting_different_tokens_are_refused_with_rope(pipe):
    """The RoPE tables are shared by the batch: per-sample selections cannot be applied."""
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, refresh_every=0, share_cfg_selection=False,
                                             **SMALL_SPANS))
    with pytest.raises(ValueError, match="RoPE tables have no batch axis"):
        generate(pipe)
    vidprune.remove(pipe)


@pytest.mark.parametrize("rope", [True, False])
def test_keep_half_computes_half_the_video_tokens_and_all_text_tokens(rope):
    model = tiny_cogvideox(rope=rope)
    inputs = model_inputs(model)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, **SMALL_SPANS))
    assert torch.equal(model(**inputs)[0], reference)
    seen = []  # (block, video tokens and text tokens into norm1, joint tokens into the feed-forward)
    blocks = model.transformer_blocks
    handles = [block.norm1.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[1], a[1].shape[1])))
               for i, block in enumerate(blocks)]
    handles += [block.ff.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[1])))
                for i, block in enumerate(blocks)]
    outputs = []  # (video, text) tokens each block hands on, after vidprune's scatter
    handles += [block.register_forward_hook(lambda m, a, out: outputs.append((out[0].shape[1], out[1].shape[1])))
                for block in blocks]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **SMALL_SPANS))
    out = model(**inputs)[0]
    for handle in handles:
        handle.remove()
    vidprune.remove(model)
    kept = TOKENS // 2
    assert sorted(seen) == sorted([(0, TOKENS, TEXT), (0, TOKENS + TEXT)] + [(i, kept, TEXT) for i in range(1, 6)]
                                  + [(i, kept + TEXT) for i in range(1, 6)])
    # Spans 1-2, 3-4, 5: full length leaving each span's last block, the text stream always
    assert outputs == [(TOKENS, TEXT), (kept, TEXT), (TOKENS, TEXT), (kept, TEXT), (TOKENS, TEXT), (TOKENS, TEXT)]
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_cogvideox_1_5_temporal_patches():
    """patch_size_t=2 (CogVideoX 1.5): two latent frames per token frame."""
    model = tiny_cogvideox(patch_size_t=2)
    inputs = model_inputs(model, frames=2 * FRAMES)
    assert adapter_for(model).token_grid(model, inputs).size == TOKENS
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **SMALL_SPANS))
    out = model(**inputs)[0]
    spans = vidprune.stats(model).forwards[-1].spans
    vidprune.remove(model)
    assert [s.tokens for s in spans] == [TOKENS // 2] * 3
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)


@pytest.mark.parametrize("rope", [True, False])
def test_adapter_query_key_equal_the_models_own(monkeypatch, rope):
    model = tiny_cogvideox(seed=3, rope=rope)
    captured = {}
    original = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        captured.setdefault("qk", (query, key))  # the first call is block 0's attention
        return original(query, key, value, **kwargs)

    block_inputs = {}
    block = model.transformer_blocks[0]
    block.register_forward_pre_hook(
        lambda m, a, kw: block_inputs.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(**model_inputs(model, batch=2))
    adapter = adapter_for(model)
    query, key = adapter.query_key(block, block_inputs, torch.arange(TOKENS))
    model_query, model_key = captured["qk"]  # (batch, heads, text + video tokens, head_dim)
    torch.testing.assert_close(query, model_query[:, :, TEXT:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key, model_key[:, :, TEXT:], rtol=1e-5, atol=1e-5)
    some = sample_queries(adapter.token_grid(model, model_inputs(model)), 10, seed=0, device=torch.device("cpu"))
    sampled, _ = adapter.query_key(block, block_inputs, some)
    torch.testing.assert_close(sampled, query[:, :, some])


def test_block_flops_count_the_blocks_matmuls():
    """The estimate equals the matrix-multiply FLOPs torch counts in one block (modulation,
    projections, joint attention, feed-forward), on all video tokens and on a pruned subset."""
    model = tiny_cogvideox(layers=1)
    adapter = adapter_for(model)
    block_inputs = {}
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: block_inputs.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    model(**model_inputs(model))
    for tokens in (TOKENS, 40):
        index = torch.arange(tokens).unsqueeze(0)
        inputs = {**block_inputs, **adapter.gather_block_inputs(block_inputs, index)}
        # The math kernel runs attention as matmuls, which the counter sees (CPU's fused one it does not).
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.transformer_blocks[0](**inputs)
        assert adapter.block_flops(model, tokens, context_tokens=TEXT) == counter.get_total_flops()


def test_block_cache_is_refused_before_anything_changes(pipe):
    with pytest.raises(ValueError, match=r"cache='block'\) is not supported on CogVideoXTransformer3DModel"):
        vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block"))
    assert pruner_of(pipe.transformer) is None and type(pipe) is CogVideoXPipeline


def test_reuse_steps_with_batched_cfg(pipe):
    """Both CFG halves of a batched forward reuse together; the text stream takes its residual."""
    reference = generate(pipe)
    vidprune.apply(pipe, vidprune.TapeConfig(budget=[1.0, 0.0, 1.0], **SMALL_SPANS))
    out = generate(pipe)
    stats = vidprune.stats(pipe)
    vidprune.remove(pipe)
    assert [f.keep for f in stats.forwards] == [1.0, 0.0, 1.0]
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


@pytest.mark.parametrize("rope", [True, False])
def test_full_context_with_exact_remembered_states_gives_the_dense_forward(rope):
    """As for Wan (test_full_context.py): the joint attention's text and kept video queries take
    the pruned video tokens' keys, with their own RoPE and modulation; kept-only attention differs."""
    pipeline = tiny_pipeline(rope=rope)
    inputs = model_inputs(pipeline.transformer)  # one video: with RoPE the samples of a batch share the tokens
    full = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, context="full", **SMALL_SPANS)
    dense, pruned, records = forward_after_dense(pipeline, full, inputs)
    assert records[1].keep == 0.5 and records[1].spans[0].tokens < records[1].spans[0].keys
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)
    _, kept, _ = forward_after_dense(pipeline, full.with_(context="kept"), inputs)
    assert (kept - dense).abs().max() > 1e-3


def test_full_context_keep_one_and_remove_bit_identical(pipe):
    assert_exact_and_pruning(pipe, generate, SMALL_SPANS, context="full")
