"""TAPE on FramePack: a tiny random HunyuanVideoFramepackTransformer3DModel (2 dual-stream and 2
single-stream blocks, history and image projections) in a HunyuanVideoFramepackPipeline built
offline (tiny HunyuanVideo VAE, tiny SigLIP image encoder, no text encoders: prompt embeddings;
output_type="latent"), and bare with the inputs that pipeline gives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline,
                       HunyuanVideoFramepackTransformer3DModel)
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video_framepack
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

import vidprune
from vidprune.adapters import adapter_for
from vidprune.budget import plan_keeps
from vidprune.config import TapeConfig
from vidprune.graphs import EagerReplayGraph
from vidprune.patch import _GRAPHS_ATTRIBUTE, _STATE_ATTRIBUTE
from vidprune.runtime import bind_arguments, pruner_of
from vidprune.selection import kept_per_frame
from vidprune.tape import token_scores
from vidprune.tokens import TokenGrid

from conftest import assert_exact_and_pruning, forward_after_dense, record_block_calls
from test_hunyuan import count_attention_tokens

PIXELS, WINDOW = 128, 3  # latents 16 x 16 -> 8 x 8 tokens a frame; 3 latent frames a section
GRID = 3 * 8 * 8  # video tokens of a forward
# inverted anti-drifting history (the pipeline's default): 1x the image and 1 frame, 2 x 16 x 16 at
# 2x, 16 x 16 x 16 at 4x -> 2 x 8 x 8 + 1 x 4 x 4 + 4 x 2 x 2 tokens before the video's
PREFIX = 128 + 16 + 16
TEXT, IMAGE = 7, 4  # prompt tokens (none padded: batch 1 trims padding) and SigLIP patches (16 px / 8)
SECTION_FRAMES = (WINDOW - 1) * 4 + 1  # num_frames of one section
SPANS = dict(first_pruned_layer=1, reselect_every=2)  # spans 1-2 (dual- into single-stream) and 3


def tiny_framepack(seed: int = 0) -> HunyuanVideoFramepackTransformer3DModel:
    torch.manual_seed(seed)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True,
        image_proj_dim=8, has_clean_x_embedder=True).eval()


def tiny_pipeline(seed: int = 0) -> HunyuanVideoFramepackPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4).eval()
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=16, patch_size=8)).eval()
    pipeline = HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=tiny_framepack(seed), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        image_encoder=encoder, feature_extractor=SiglipImageProcessorPil(size={"height": 16, "width": 16}))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe() -> HunyuanVideoFramepackPipeline:
    pipeline = tiny_pipeline()
    yield pipeline
    vidprune.remove(pipeline)


def generate(pipeline: HunyuanVideoFramepackPipeline, sections: int = 1, steps: int = 3, true_cfg: bool = False,
             **overrides) -> torch.Tensor:
    """Every section's latents of one call, the image's latent frame included."""
    generator = torch.Generator().manual_seed(0)
    text = lambda: dict(  # noqa: E731
        embeds=torch.randn(1, TEXT, 16, generator=generator), pooled=torch.randn(1, 8, generator=generator))
    positive, negative = text(), text()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8))
    arguments = dict(image=image, prompt_embeds=positive["embeds"], pooled_prompt_embeds=positive["pooled"],
                     prompt_attention_mask=torch.ones(1, TEXT), height=PIXELS, width=PIXELS,
                     num_frames=sections * SECTION_FRAMES, latent_window_size=WINDOW, num_inference_steps=steps,
                     output_type="latent", generator=generator)
    if true_cfg:
        arguments.update(negative_prompt_embeds=negative["embeds"], negative_pooled_prompt_embeds=negative["pooled"],
                         negative_prompt_attention_mask=torch.ones(1, TEXT), true_cfg_scale=4.0)
    return pipeline(**{**arguments, **overrides}).frames[-1]


def forward_inputs(pipeline: HunyuanVideoFramepackPipeline, **overrides) -> dict:
    """The transformer's arguments at the first step of a pipeline call."""
    calls = []
    handle = pipeline.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        generate(pipeline, steps=1, **overrides)
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize("true_cfg", [False, True])
def test_keep_one_and_remove_bit_identical_and_pruning_reaches_the_blocks(pipe, true_cfg):
    """keep=1.0 and remove give the unpatched call bit for bit; at keep 0.5 every block of a span
    attends with the history prefix and the kept video tokens, the others with all."""
    generating = lambda pipeline: generate(pipeline, true_cfg=true_cfg)  # noqa: E731
    assert_exact_and_pruning(pipe, generating, SPANS)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, **SPANS))
    seen, handles = count_attention_tokens(pipe.transformer)
    try:
        generating(pipe)
    finally:
        for handle in handles:
            handle.remove()
        stats = vidprune.stats(pipe)
        vidprune.remove(pipe)
    assert len(stats.forwards) == 3 * (2 if true_cfg else 1)
    expected = []
    for forward in stats.forwards:
        assert forward.tokens == PREFIX + GRID and forward.context_tokens == TEXT + IMAGE
        kept = PREFIX + (GRID if forward.keep == 1.0 else 3 * kept_per_frame(TokenGrid(3, 8, 8), forward.keep))
        assert [(s.start, s.end, s.tokens) for s in forward.spans] == [(1, 2, kept), (3, 3, kept)]
        expected += [(0, PREFIX + GRID, TEXT + IMAGE)] + [(i, kept, TEXT + IMAGE) for i in (1, 2, 3)]
    assert seen == expected and any(f.keep < 1.0 for f in stats.forwards)
    assert 0 < stats.flops_saved < 0.5  # the prefix and the first block run whole


@pytest.mark.parametrize("sampling", ["inverted_anti_drifting", "vanilla"])
@pytest.mark.parametrize("pixels", [PIXELS, 80])  # 80 px: 10 x 10 latents, padded at 2x and 4x
def test_prefix_tokens_are_the_history_the_model_packs(pipe, sampling, pixels):
    inputs = forward_inputs(pipe, sampling_type=sampling, height=pixels, width=pixels)
    seen = {}
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.update(tokens=a[0].shape[1]))
    try:
        pipe.transformer(**inputs)
    finally:
        handle.remove()
    adapter = adapter_for(pipe.transformer)
    grid = adapter.token_grid(pipe.transformer, inputs)
    assert adapter.prefix_tokens(pipe.transformer, inputs) == seen["tokens"] - grid.size > 0
    if pixels == PIXELS and sampling == "inverted_anti_drifting":
        assert adapter.prefix_tokens(pipe.transformer, inputs) == PREFIX


def test_history_is_computed_whole_and_kept_video_tokens_equal_a_manual_span():
    """The paper preset on the bare transformer: span 1-2 runs from a dual-stream block into a
    single-stream one on the history prefix and the kept video tokens, with their RoPE; the kept
    tokens leave it as those blocks give them run by hand, the pruned ones pass unchanged."""
    pipeline = tiny_pipeline(seed=1)
    model, inputs = pipeline.transformer, forward_inputs(pipeline)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", record_selections=True, **SPANS))
    calls, handles = record_block_calls(adapter_for(model).blocks(model))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    span = vidprune.stats(model).forwards[-1].spans[0]
    vidprune.remove(model)
    kept = span.index  # grid positions
    assert span.tokens == PREFIX + kept.shape[1] and kept.shape[1] == GRID // 2
    computed = torch.cat([torch.arange(PREFIX), kept[0] + PREFIX])
    pruned = torch.ones(PREFIX + GRID, dtype=torch.bool)
    pruned[computed] = False
    arguments = calls[1][0]
    assert arguments["attention_mask"] is None  # batch 1
    x, text = arguments["hidden_states"][:, computed], arguments["encoder_hidden_states"]
    rope = tuple(table[computed] for table in arguments["freqs_cis"])
    with torch.no_grad():
        x, text = model.transformer_blocks[1](x, text, arguments["temb"], None, rope)
        x, text = model.single_transformer_blocks[0](x, text, arguments["temb"], None, rope)
    output = calls[2][1][0]  # the span's output as the model gets it, scattered back
    assert torch.equal(output[:, computed], x) and torch.equal(calls[2][1][1], text)
    assert torch.equal(output[:, pruned], arguments["hidden_states"][:, pruned])


def test_importance_is_the_attention_video_tokens_get_among_the_history(monkeypatch):
    """token_scores on FramePack's blocks: the sampled video queries (past the prefix) attend over
    the history and video keys as the model's own attention computes them (text left out, as on
    HunyuanVideo); the scores are the video tokens'."""
    pipeline = tiny_pipeline(seed=2)
    model, inputs = pipeline.transformer, forward_inputs(pipeline)
    block = model.transformer_blocks[1]
    captured = {}
    block.register_forward_pre_hook(
        lambda m, a, kw: captured.update(inputs=bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    original = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        captured.setdefault("qk", (query, key))
        return original(query, key, value, **kwargs)

    with torch.no_grad():
        model(**inputs)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        block(**captured["inputs"])
        queries = torch.tensor([0, 5, 64, 130, 191])  # grid positions
        config = TapeConfig.paper(keep=0.5)
        scores = token_scores(adapter_for(model), block, captured["inputs"], config, queries, 0.7, 1,
                              adapter_for(model).token_grid(model, inputs), prefix=PREFIX)
    query, key = captured["qk"]  # (batch, heads, history + video + text, head_dim)
    logits = query[:, :, queries + PREFIX] @ key[:, :, :PREFIX + GRID].transpose(-1, -2) * query.shape[-1] ** -0.5
    expected = logits.softmax(dim=-1).mean(dim=(1, 2))[:, PREFIX:]
    assert scores.shape == (1, GRID)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_each_section_plans_its_own_steps_with_fresh_memories(pipe, monkeypatch):
    """A two-section call is two denoising loops: each gets its own step plan (dense first steps
    included), even where the sections' schedules differ (the second made 5 steps here), and the
    first forward of each starts with no span memory."""
    retrieve = pipeline_hunyuan_video_framepack.retrieve_timesteps
    schedules = []

    def five_steps_second(scheduler, steps, device, sigmas=None, **kwargs):
        if schedules:  # the second section
            sigmas = np.linspace(1.0, 0.0, 6)[:-1]
        timesteps, count = retrieve(scheduler, steps, device, sigmas=sigmas, **kwargs)
        schedules.append((timesteps / 1000).tolist())
        return timesteps, count

    monkeypatch.setattr(pipeline_hunyuan_video_framepack, "retrieve_timesteps", five_steps_second)
    config = vidprune.TapeConfig(keep=0.5, dense_first=0.25)
    vidprune.apply(pipe, config)
    state = getattr(pipe, _STATE_ATTRIBUTE)
    memories = []  # span memories held when each forward's first block starts
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: memories.append(len(state.memory)))
    try:
        out = generate(pipe, sections=2, steps=4)
    finally:
        handle.remove()
        stats = vidprune.stats(pipe)
        vidprune.remove(pipe)
    assert [len(s) for s in schedules] == [4, 5] and torch.isfinite(out).all()
    steps = [f.step for f in stats.forwards]
    keeps = [f.keep for f in stats.forwards]
    assert steps == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert keeps == plan_keeps(config, schedules[0]) + plan_keeps(config, schedules[1])
    assert keeps[0] == keeps[4] == 1.0 and 0.0 in keeps[:4] and 0.0 in keeps[4:]
    assert memories[0] == memories[4] == 0 and memories[3] > 0


def test_default_config_through_a_two_section_call(pipe):
    """TapeConfig(): per section the first step dense, then dense steps among reuse steps."""
    reference = generate(pipe, sections=2, steps=6)
    vidprune.apply(pipe, vidprune.TapeConfig())
    out = generate(pipe, sections=2, steps=6)
    stats = vidprune.stats(pipe)
    vidprune.remove(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    keeps = [f.keep for f in stats.forwards]
    assert len(keeps) == 12 and keeps[:6] == keeps[6:] and keeps[0] == 1.0
    assert set(keeps) == {0.0, 1.0} and stats.mean_keep == pytest.approx(0.5)
    assert stats.flops_saved == pytest.approx(0.5)


@pytest.mark.parametrize("keys", ["replayed", "remembered"])
def test_full_context_with_exact_remembered_states_gives_the_dense_forward(keys):
    """As on HunyuanVideo: the kept video and text queries also take the pruned video tokens' keys,
    with the history prefix computed: a forward pruned on the memory of the same inputs' dense
    forward gives that forward; kept-only attention does not."""
    pipeline = tiny_pipeline(seed=3)
    inputs = forward_inputs(pipeline)
    full = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, context="full", context_keys=keys, **SPANS)
    dense, pruned, records = forward_after_dense(pipeline, full, inputs)
    assert records[1].keep == 0.5 and [s.keys for s in records[1].spans] == [PREFIX + GRID] * 2
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)
    _, kept, _ = forward_after_dense(pipeline, full.with_(context="kept"), inputs)
    assert (kept - dense).abs().max() > 1e-3


def test_graphed_spans_compute_what_eager_spans_compute():
    pipeline = tiny_pipeline()
    inputs = forward_inputs(pipeline)
    eager, graphs = pipeline.transformer, tiny_framepack()
    config = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **SPANS)
    vidprune.apply(eager, config)
    setattr(graphs, _GRAPHS_ATTRIBUTE, lambda: EagerReplayGraph)  # as compile_blocks(graphs=True) marks it
    vidprune.apply(graphs, config)
    hows = []
    with torch.no_grad():
        for seed in range(4):  # new latents each forward: the static buffers are refilled
            latents = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
            step = {**inputs, "hidden_states": latents}
            assert torch.equal(graphs(**step)[0], eager(**step)[0])
            hows.append([span.graph for span in vidprune.stats(graphs).forwards[-1].spans])
    vidprune.remove(eager)
    vidprune.remove(graphs)
    assert hows == [["eager"] * 2] * 2 + [["captured"] * 2] + [["replayed"] * 2]


def test_lip_and_block_cache_are_refused_before_anything_changes(pipe):
    with pytest.raises(ValueError, match="LIP is not supported on HunyuanVideoFramepackTransformer3DModel"):
        vidprune.apply(pipe, vidprune.LipConfig(mask=torch.ones(3, 8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"cache='block'\) is not supported on HunyuanVideoFramepackTransformer3DModel"):
        vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block"))
    assert pruner_of(pipe.transformer) is None and type(pipe) is HunyuanVideoFramepackPipeline
