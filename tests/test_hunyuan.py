"""TAPE on HunyuanVideo: a tiny random HunyuanVideoTransformer3DModel (2 dual-stream and 2
single-stream blocks), bare and in a HunyuanVideoPipeline called with prompt embeddings (no text
encoders, no VAE: output_type="latent")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vidprune
from vidprune.adapters import adapter_for
from vidprune.graphs import EagerReplayGraph
from vidprune.patch import _GRAPHS_ATTRIBUTE
from vidprune.runtime import bind_arguments, pruner_of

from conftest import assert_exact_and_pruning, forward_after_dense

FRAMES, HEIGHT, WIDTH = 3, 8, 8  # token grid of the calls below: 192 tokens
TOKENS = FRAMES * HEIGHT * WIDTH
TEXT, PADDING = 7, 2  # text tokens, the last PADDING of them masked out
PIXELS = 128  # 128 px / VAE factor 8 = 16 latents / patch 2 = 8 tokens
# Spans 1-2 (from the last dual-stream into the first single-stream block) and 3.
SPANS = dict(first_pruned_layer=1, reselect_every=2)


def tiny_hunyuan(seed: int = 0, **config) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    # head_dim 16: the 3-D RoPE splits it 4 (time) + 6 + 6 (space)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), **config,
    ).eval()


@pytest.fixture(scope="module")
def pipe() -> HunyuanVideoPipeline:
    pipeline = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan(), vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                    tokenizer_2=None)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    vidprune.remove(pipeline)


def text(prompts: int = 1, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(prompts, TEXT)
    mask[:, TEXT - PADDING:] = 0
    return dict(embeds=torch.randn(prompts, TEXT, 16, generator=generator),
                pooled=torch.randn(prompts, 8, generator=generator), mask=mask)


def generate(pipeline: HunyuanVideoPipeline, prompts: int = 1, true_cfg: bool = False, **overrides) -> torch.Tensor:
    positive, negative = text(prompts), text(prompts, seed=1)
    arguments = dict(prompt_embeds=positive["embeds"], pooled_prompt_embeds=positive["pooled"],
                     prompt_attention_mask=positive["mask"], height=PIXELS, width=PIXELS, num_frames=9,
                     num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    if true_cfg:
        arguments.update(negative_prompt_embeds=negative["embeds"], negative_pooled_prompt_embeds=negative["pooled"],
                         negative_prompt_attention_mask=negative["mask"], true_cfg_scale=4.0)
    return pipeline(**{**arguments, **overrides}).frames


def model_inputs(batch: int = 1, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompt = text(batch, seed)
    return dict(hidden_states=torch.randn(batch, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=generator),
                timestep=torch.full((batch,), 700.0), encoder_hidden_states=prompt["embeds"],
                encoder_attention_mask=prompt["mask"], pooled_projections=prompt["pooled"],
                guidance=torch.full((batch,), 6000.0), return_dict=False)


def count_attention_tokens(model: HunyuanVideoTransformer3DModel) -> tuple[list, list]:
    """Forward pre-hooks on each block's attention, which sees the video tokens apart from the
    text tokens in both block kinds: records (block, video tokens, text tokens)."""
    seen = []
    blocks = adapter_for(model).blocks(model)
    handles = [block.attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.append((i, kw["hidden_states"].shape[1], kw["encoder_hidden_states"].shape[1])),
        with_kwargs=True) for i, block in enumerate(blocks)]
    return seen, handles


@pytest.mark.parametrize("true_cfg", [False, True])
def test_keep_one_and_remove_bit_identical_through_the_pipeline(pipe, true_cfg):
    reference = generate(pipe, true_cfg=true_cfg)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0))
    assert torch.equal(generate(pipe, true_cfg=true_cfg), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, **SPANS))
    seen, handles = count_attention_tokens(pipe.transformer)
    pruned = generate(pipe, true_cfg=true_cfg)
    for handle in handles:
        handle.remove()
    stats = vidprune.stats(pipe)
    assert stats.mean_keep == 0.5
    # true CFG: two transformer calls per step, each its own branch
    assert len(stats.forwards) == 3 * (2 if true_cfg else 1)
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    # Every block sees all text tokens, and the video tokens its span's record states.
    expected = []
    for forward in stats.forwards:
        at = {layer: span.tokens for span in forward.spans for layer in range(span.start, span.end + 1)}
        expected += [(i, at.get(i, TOKENS), TEXT) for i in range(4)]
    assert seen == expected and any(video < TOKENS for _, video, _ in seen)
    vidprune.remove(pipe)
    assert torch.equal(generate(pipe, true_cfg=true_cfg), reference)


def test_sigma_is_the_timestep_over_1000_at_every_step(pipe):
    """HunyuanVideoPipeline passes the flow-matching scheduler's timesteps (sigma * 1000)."""
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **SPANS))
    generate(pipe)
    forwards = vidprune.stats(pipe).forwards
    vidprune.remove(pipe)
    assert [f.step for f in forwards] == [0, 1, 2]
    assert [f.sigma for f in forwards] == pytest.approx(pipe.scheduler.sigmas[:-1].tolist())


def test_bare_transformer_keep_half_across_the_two_block_kinds():
    """TapeConfig.paper on a bare transformer; the span 1-2 runs from a dual-stream block (RoPE as
    freqs_cis) into a single-stream one (image_rotary_emb): both get the kept tokens' tables."""
    model = tiny_hunyuan()
    inputs = model_inputs()
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, **SPANS))
    assert torch.equal(model(**inputs)[0], reference)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **SPANS))
    seen, handles = count_attention_tokens(model)
    outputs = []  # (video, text) tokens each block hands on, after vidprune's scatter
    handles += [block.register_forward_hook(lambda m, a, out: outputs.append((out[0].shape[1], out[1].shape[1])))
                for block in adapter_for(model).blocks(model)]
    out = model(**inputs)[0]
    for handle in handles:
        handle.remove()
    spans = vidprune.stats(model).forwards[-1].spans
    vidprune.remove(model)
    kept = TOKENS // 2
    assert seen == [(0, TOKENS, TEXT), (1, kept, TEXT), (2, kept, TEXT), (3, kept, TEXT)]
    assert outputs == [(TOKENS, TEXT), (kept, TEXT), (TOKENS, TEXT), (TOKENS, TEXT)]
    assert [(s.start, s.end, s.tokens) for s in spans] == [(1, 2, kept), (3, 3, kept)]
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)


def test_gathered_attention_mask_keeps_the_text_padding():
    """The mask over [video; text] loses the pruned video tokens and keeps the text part as it is."""
    model = tiny_hunyuan()
    captured = {}
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: captured.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    model(**model_inputs())
    index = torch.arange(0, TOKENS, 3).unsqueeze(0)
    mask = adapter_for(model).gather_block_inputs(captured, index)["attention_mask"]
    assert mask.shape == (1, 1, 1, index.shape[1] + TEXT)
    assert torch.equal(mask[..., index.shape[1]:], captured["attention_mask"][..., TOKENS:])
    assert mask[..., :index.shape[1] + TEXT - PADDING].all() and not mask[..., -PADDING:].any()


@pytest.mark.parametrize("layer", [0, 2])  # a dual-stream and a single-stream block
@pytest.mark.parametrize("condition", [None, "token_replace"])  # token_replace: the first frame modulated apart
def test_adapter_query_key_equal_the_models_own(monkeypatch, layer, condition):
    model = tiny_hunyuan(seed=3, **({"image_condition_type": condition} if condition else {}))
    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    block_inputs = {}
    block.register_forward_pre_hook(
        lambda m, a, kw: block_inputs.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    model(**model_inputs(batch=2))
    captured = {}
    original = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        captured.setdefault("qk", (query, key))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    block(**block_inputs)  # its one attention call
    query, key = adapter.query_key(block, block_inputs, torch.arange(TOKENS))
    model_query, model_key = captured["qk"]  # (batch, heads, video + text tokens, head_dim)
    torch.testing.assert_close(query, model_query[:, :, :TOKENS], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key, model_key[:, :, :TOKENS], rtol=1e-5, atol=1e-5)
    some = torch.tensor([0, 5, 64, 191])
    sampled, _ = adapter.query_key(block, block_inputs, some)
    torch.testing.assert_close(sampled, query[:, :, some])


def test_block_flops_count_the_blocks_matmuls():
    """The estimate equals the matrix-multiply FLOPs torch counts in one block of each kind, less
    the per-sample modulation projections, on all video tokens and on a pruned subset."""
    model = tiny_hunyuan()
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    captured = {}
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured.update({i: bind_arguments(type(m).forward, a, kw)}), with_kwargs=True)
    model(**model_inputs())
    for layer in (0, 2):
        modulation = sum(2 * m.in_features * m.out_features for name, m in blocks[layer].named_modules()
                         if name.startswith("norm") and isinstance(m, torch.nn.Linear))
        for tokens in (TOKENS, 40):
            index = torch.arange(tokens).unsqueeze(0)
            inputs = {**captured[layer], **adapter.gather_block_inputs(captured[layer], index)}
            # The math kernel runs attention as matmuls, which the counter sees.
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                blocks[layer](**inputs)
            assert adapter.block_flops(model, tokens, context_tokens=TEXT) == counter.get_total_flops() - modulation


def test_samples_selecting_different_tokens_are_refused():
    """The RoPE tables are shared by the batch: per-sample selections cannot be applied."""
    model = tiny_hunyuan()
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, **SPANS))
    with pytest.raises(ValueError, match="RoPE tables have no batch axis"):
        model(**model_inputs(batch=2))
    vidprune.remove(model)


def test_block_cache_is_refused_before_anything_changes(pipe):
    with pytest.raises(ValueError, match=r"cache='block'\) is not supported on HunyuanVideoTransformer3DModel"):
        vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block"))
    assert pruner_of(pipe.transformer) is None and type(pipe) is HunyuanVideoPipeline


def test_token_replace_with_cuda_graphs_is_refused_before_anything_changes():
    """A captured graph would replay the first frame's kept-token count of its own selection."""
    model = tiny_hunyuan(image_condition_type="token_replace")
    setattr(model, _GRAPHS_ATTRIBUTE, lambda: EagerReplayGraph)  # as compile_blocks(graphs=True) marks it
    with pytest.raises(ValueError, match="graphs=True\\) does not support HunyuanVideo's image_condition_type"):
        vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5))
    assert pruner_of(model) is None
    delattr(model, _GRAPHS_ATTRIBUTE)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5))  # eager spans take it
    assert pruner_of(model) is not None
    vidprune.remove(model)


def test_a_reuse_step_adds_both_streams_remembered_residuals(pipe):
    """Joint-attention blocks: on a reuse step the text stream also leaves the span with its
    input plus its remembered residual (its span ran no block)."""
    transformer = pipe.transformer
    vidprune.apply(pipe, vidprune.TapeConfig(budget=[1.0, 0.0], **SPANS))
    span = pruner_of(transformer).spans[0]
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    seen = []  # (text input, text output) of the first span at each forward
    handles = [blocks[span.start].register_forward_pre_hook(
                   lambda m, a, kw: seen.append([bind_arguments(type(m).forward, a, kw)["encoder_hidden_states"]]),
                   with_kwargs=True),
               blocks[span.end].register_forward_hook(lambda m, a, out: seen[-1].append(out[1]))]
    try:
        generate(pipe, num_inference_steps=2)
    finally:
        for handle in handles:
            handle.remove()
        vidprune.remove(pipe)
    (dense_in, dense_out), (reuse_in, reuse_out) = seen
    torch.testing.assert_close(reuse_out, reuse_in + (dense_out - dense_in))
    assert not torch.equal(reuse_in, dense_in)


@pytest.mark.parametrize("condition", [None, "token_replace"])  # token_replace: the first frame modulated apart
@pytest.mark.parametrize("keys", ["replayed", "remembered"])
def test_full_context_with_exact_remembered_states_gives_the_dense_forward(condition, keys):
    """As for Wan (test_full_context.py), over both block kinds (a span crossing from dual- to
    single-stream blocks) with the text padding masked: the kept video and text queries take the
    pruned video tokens' keys, with their own RoPE and modulation; kept-only attention differs."""
    model = tiny_hunyuan(seed=3, **({"image_condition_type": condition} if condition else {}))
    pipeline = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)
    full = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, context="full", context_keys=keys,
                               **SPANS)
    inputs = model_inputs()
    dense, pruned, records = forward_after_dense(pipeline, full, inputs)
    assert records[1].keep == 0.5 and [s.keys for s in records[1].spans] == [TOKENS, TOKENS]
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)
    _, kept, _ = forward_after_dense(pipeline, full.with_(context="kept"), inputs)
    assert (kept - dense).abs().max() > 1e-3


def test_full_context_keep_one_and_remove_bit_identical(pipe):
    assert_exact_and_pruning(pipe, generate, SPANS, context="full")
